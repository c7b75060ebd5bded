//! Test hooks that kill this process at a named point, as a platform kills a container at
//! any moment. Tests set `LIMITLESS_FAILPOINT=<name>:<step>:<attempt>`; the chain step sets
//! which step and attempt this process runs. Without the variable every hook is a no-op.

use std::sync::atomic::{AtomicU32, Ordering};

static STEP: AtomicU32 = AtomicU32::new(u32::MAX);
static ATTEMPT: AtomicU32 = AtomicU32::new(u32::MAX);

/// Says which step and attempt this process runs.
pub fn set_context(step: u32, attempt: u32) {
    STEP.store(step, Ordering::Relaxed);
    ATTEMPT.store(attempt, Ordering::Relaxed);
}

/// Kills this process with `SIGKILL` if the test asked for a kill at `name` in this step.
pub fn hit(name: &str) {
    let Ok(spec) = std::env::var("LIMITLESS_FAILPOINT") else { return };
    let mut it = spec.split(':');
    let (Some(n), Some(s), Some(a)) = (it.next(), it.next(), it.next()) else { return };
    if n == name && s.parse() == Ok(STEP.load(Ordering::Relaxed)) && a.parse() == Ok(ATTEMPT.load(Ordering::Relaxed)) {
        tracing::warn!("failpoint {name}: killing this process");
        // SAFETY: sends SIGKILL to ourselves; nothing runs after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
