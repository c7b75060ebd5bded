//! The Limitless checkpoint image format, shared by the agent, the restorer and the
//! `limitless` supervisor.
//!
//! Without features the crate is `no_std` and allocation-free: fixed-layout structures
//! ([`wire`]), the records of an image ([`format`]), the agent control protocol ([`ctl`]),
//! the restorer's input ([`plan`]) and CPU features ([`cpu`]). With the `std` feature it
//! also reads, validates and writes whole image files ([`file`]); an image is untrusted
//! input and every field is checked there before anything uses it.
#![cfg_attr(not(feature = "std"), no_std)]
// Field-level documentation of the wire structures lives in docs/image-format.md.

pub mod wire;

pub mod cpu;
pub mod ctl;
pub mod diff;
pub mod format;
pub mod plan;
pub mod xxh;

#[cfg(feature = "std")]
pub mod file;

pub use format::*;
