//! Limitless: run any Linux program past a serverless platform's time limit.
//!
//! The library holds the checkpoint engine's supervisor side ([`engine`]): launching a
//! program under the agent, checkpointing it into an image, restoring an image, and
//! inspecting one; the chain of steps that runs a program past a time limit ([`chain`]);
//! and the store the steps hand over through ([`store`]). The image format itself is the `limitless-image` crate, re-exported as
//! [`image`]. The `limitless` binary is a thin CLI over this ([`cli`]).
#![warn(missing_docs)]

pub mod chain;
pub mod cli;
pub mod engine;
pub mod failpoint;
pub mod openwhisk;
pub mod store;
pub mod util;

pub use limitless_image as image;
