//! The checkpoint engine's supervisor side: launching a program under the agent, taking
//! checkpoints into image files, restoring them, and the pieces those share.

pub mod api;
pub mod carry;
pub mod checkpoint;
pub mod compress;
pub mod diff;
pub mod early;
pub mod elf;
pub mod embedded;
pub mod fds;
pub mod host;
pub mod link;
pub mod objects;
pub mod plan;
pub mod restore;
pub mod spawn;
pub mod stdio;
pub mod supervisor;

/// Exit status of `launch`/`restore` after the program was checkpointed and stopped.
pub const EXIT_CHECKPOINTED: i32 = 75;
/// Exit status when limitless itself fails (bad input, failed restore).
pub const EXIT_ERROR: i32 = 125;
/// The real-time signal the agent uses to freeze threads (`SIGRTMAX - 3`).
pub const SIG_CKPT: i32 = 61;
