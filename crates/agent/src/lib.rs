//! The Limitless agent: a `cdylib` loaded into the program with `LD_PRELOAD`.
//!
//! At load it installs the checkpoint signal handler and starts a manager thread that
//! waits on the control socket from the supervisor. On a checkpoint request the manager
//! freezes every other thread in the signal handler ([`freeze`]), describes the process and
//! streams its memory to the supervisor ([`checkpoint`]), then lets the threads go or waits
//! to be killed. In a restored process the restorer jumps into [`restart`], which recreates
//! the threads from their saved contexts.
//!
//! Nothing on the checkpoint and restart paths uses the program's allocator, stdio or locks:
//! memory comes from `mmap`, system calls are raw ([`limitless_sys`]), and libc is called
//! only at load time and in the interposed functions ([`wrappers`]), which run on the
//! program's own threads.
#![no_std]

mod arch;
mod checkpoint;
mod cputime;
mod ctl;
mod fds;
mod freeze;
mod global;
mod libc;
mod mapped;
mod maps;
mod objects;
mod process;
mod restart;
mod scan;
mod scratch;
mod snapshot;
mod stream;
mod tids;
mod track;
mod wrappers;
mod zombies;

use core::sync::atomic::Ordering;
use global::*;
use limitless_sys as sys;

/// Version of the agent, reported in `HELLO` and recorded in images. 2: takes over the
/// dirty tracking a restorer armed (`RestartArgs` version 2) and reports its epoch.
pub const AGENT_VERSION: u32 = 2;

/// The environment variable the supervisor sets:
/// `LIMITLESS_AGENT=fd=NNNNN,pid=NNNNNNNNNN,sig=NN` (fixed widths, so the agent can update
/// the pid in place after a restore).
const ENV_NAME: &[u8] = b"LIMITLESS_AGENT=";
const ENV_FD: usize = 3; // offset of the 5 fd digits after the name
const ENV_PID: usize = 13; // offset of the 10 pid digits
const ENV_SIG: usize = 28; // offset of the 2 signal digits
const ENV_LEN: usize = 30;

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn(i32, *const *const u8, *const *const u8) = init;

/// Runs when the library is loaded, before the program's `main`.
extern "C" fn init(_argc: i32, _argv: *const *const u8, envp: *const *const u8) {
    // SAFETY: the dynamic loader passes the process's environment array.
    let Some(slot) = (unsafe { find_env(envp) }) else { return };
    // SAFETY: `slot` points at ENV_LEN bytes of the environment string (checked in find_env).
    let s = unsafe { core::slice::from_raw_parts_mut(slot as *mut u8, ENV_LEN) };
    let (Some(fd), Some(pid), Some(sig)) =
        (digits(&s[ENV_FD..ENV_FD + 5]), digits(&s[ENV_PID..ENV_PID + 10]), digits(&s[ENV_SIG..ENV_SIG + 2]))
    else {
        return;
    };
    let me = sys::getpid() as u64;
    if pid != 0 && pid != me {
        // A child of the managed program: the control socket belongs to the parent.
        let _ = sys::close(fd as i32);
        return;
    }
    let mut st = sys::Stat::default();
    if sys::fstat(fd as i32, &mut st).is_err() || st.mode & sys::S_IFMT != sys::S_IFSOCK || !(34..=64).contains(&sig) {
        return;
    }
    if pid == 0 {
        write_digits(&mut s[ENV_PID..ENV_PID + 10], me);
    }
    CTL_FD.store(fd as i32, Ordering::Relaxed);
    SIG.store(sig as i32, Ordering::Relaxed);
    // SAFETY: load time, single-threaded as far as the agent is concerned.
    let sv = unsafe { saved() };
    sv.env_slot = slot;
    libc::init(sv);
    if freeze::install_handler().is_err() {
        return;
    }
    ACTIVE.store(true, Ordering::Release);
    checkpoint::start_manager();
}

/// Finds `LIMITLESS_AGENT=` in `envp`; returns the address just after the name.
///
/// # Safety
/// `envp` must be a NULL-terminated array of NUL-terminated strings.
unsafe fn find_env(envp: *const *const u8) -> Option<usize> {
    if envp.is_null() {
        return None;
    }
    let mut i = 0;
    loop {
        // SAFETY: the array is NULL-terminated.
        let p = unsafe { *envp.add(i) };
        if p.is_null() {
            return None;
        }
        let mut n = 0;
        // SAFETY: each string is NUL-terminated; we read at most ENV_NAME.len() + ENV_LEN bytes
        // and stop at the NUL.
        while n < ENV_NAME.len() + ENV_LEN && unsafe { *p.add(n) } != 0 {
            n += 1;
        }
        // SAFETY: the first n bytes were just read.
        let s = unsafe { core::slice::from_raw_parts(p, n) };
        if n == ENV_NAME.len() + ENV_LEN && s.starts_with(ENV_NAME) {
            return Some(p as usize + ENV_NAME.len());
        }
        i += 1;
    }
}

fn digits(s: &[u8]) -> Option<u64> {
    match sys::parse_u64(s) {
        Some((v, n)) if n == s.len() => Some(v),
        _ => None,
    }
}

fn write_digits(s: &mut [u8], mut v: u64) {
    for b in s.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Updates the pid in the environment string (after a restore), so that an `exec` of the
/// same process keeps the agent active.
pub(crate) fn env_set_pid(pid: u64) {
    // SAFETY: the restarting thread owns the saved state.
    let slot = unsafe { saved() }.env_slot;
    if slot != 0 {
        // SAFETY: `slot` is the environment string found at load time; it is still mapped
        // (restored memory) and ENV_LEN bytes long.
        let s = unsafe { core::slice::from_raw_parts_mut(slot as *mut u8, ENV_LEN) };
        write_digits(&mut s[ENV_PID..ENV_PID + 10], pid);
    }
}

/// Updates the control fd in the environment string.
pub(crate) fn env_set_fd(fd: i32) {
    // SAFETY: called by the thread that moves the control fd, with the state it owns.
    let slot = unsafe { saved() }.env_slot;
    if slot != 0 {
        // SAFETY: as in `env_set_pid`.
        let s = unsafe { core::slice::from_raw_parts_mut(slot as *mut u8, ENV_LEN) };
        write_digits(&mut s[ENV_FD..ENV_FD + 5], fd as u64);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    let _ = sys::write(2, b"limitless agent: internal error (panic)\n");
    sys::exit_group(120)
}
