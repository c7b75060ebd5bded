//! The control protocol between the supervisor and the agent.
//!
//! One `SOCK_SEQPACKET` socket pair; each packet is a [`CtlHeader`] and a fixed payload, so
//! message boundaries need no framing. File descriptors (the image stream) travel with
//! `SCM_RIGHTS`.
//!
//! A checkpoint: supervisor `CHECKPOINT` (+ stream fd) -> agent `FROZEN` -> the agent writes
//! the stream and closes it -> agent `DONE` (or `FAILED`, program resumed) -> supervisor
//! `RESUME` (leave running or the image could not be stored) or kills the program.
//! After a restore the agent sends `RESTORED`.
//!
//! A snapshot checkpoint (flags `LEAVE_RUNNING | SNAPSHOT`): after `FROZEN` the supervisor
//! drains the program's output, copies its unread input and sends `STDIO_SAVED`; the agent
//! makes a copy-on-write child process that writes the stream, waits for `STDIO_SAVED` (or
//! `RESUME`), lets the threads go and sends `RELEASED`; once the child has written the
//! stream, `DONE` as before. When the agent cannot take a snapshot it says why in a `NOTE`
//! and writes the stream frozen, as without the flag.

use crate::wire;

/// `b"LMTC"` as a little-endian u32.
pub const CTL_MAGIC: u32 = u32::from_le_bytes(*b"LMTC");
/// Version of this protocol.
pub const CTL_VERSION: u16 = 1;
/// Largest packet.
pub const MAX_PACKET: usize = 4096;

/// Message kinds.
pub mod msg {
    /// agent -> supervisor, once at start: [`Hello`](super::Hello).
    pub const HELLO: u16 = 1;
    /// supervisor -> agent: [`Checkpoint`](super::Checkpoint) + the stream fd.
    pub const CHECKPOINT: u16 = 2;
    /// agent -> supervisor: every thread is stopped: [`Frozen`](super::Frozen).
    pub const FROZEN: u16 = 3;
    /// agent -> supervisor: the stream is complete: [`Done`](super::Done).
    pub const DONE: u16 = 4;
    /// agent -> supervisor: the checkpoint failed, the program runs on: text payload.
    pub const FAILED: u16 = 5;
    /// supervisor -> agent: let the program continue.
    pub const RESUME: u16 = 6;
    /// agent -> supervisor, after a restore: [`Restored`](super::Restored).
    pub const RESTORED: u16 = 7;
    /// supervisor -> agent, in a snapshot checkpoint: the output written before the freeze
    /// is out and the unread input is copied; the threads may run again.
    pub const STDIO_SAVED: u16 = 8;
    /// agent -> supervisor: the threads run again while a copy-on-write child writes the
    /// stream: [`Released`](super::Released).
    pub const RELEASED: u16 = 9;
    /// agent -> supervisor: a remark for the log (text), such as why a snapshot was not
    /// possible.
    pub const NOTE: u16 = 10;
}

wire! {
    /// Starts every packet.
    pub struct CtlHeader {
        pub magic: u32,
        pub version: u16,
        pub kind: u16,
        pub len: u32,
        pub seq: u32,
    }
}

wire! {
    /// The agent announces itself.
    pub struct Hello {
        pub pid: u32,
        pub agent_version: u32,
        pub ctl_fd: i32,
        pub sig_ckpt: u32,
    }
}

/// Checkpoint flags.
pub mod ckpt_flags {
    /// Keep the program running after the image is written.
    pub const LEAVE_RUNNING: u32 = 1;
    /// With `LEAVE_RUNNING`: let the threads run while a copy-on-write snapshot of the
    /// process writes the stream (the supervisor then sends `STDIO_SAVED`). Older agents
    /// ignore it.
    pub const SNAPSHOT: u32 = 2;
    /// Store every page of private file mappings too (read through `/proc/self/mem`), so
    /// that the image needs none of the files: they are restored as anonymous memory.
    /// Older agents ignore it.
    pub const SELF_CONTAINED: u32 = 4;
    /// Track which pages the program writes from now on (userfaultfd write-protect), so
    /// that a later delta image need not read unchanged memory. Older agents ignore it.
    pub const TRACK: u32 = 8;
}

wire! {
    /// Take a checkpoint into the attached fd.
    pub struct Checkpoint {
        pub flags: u32,
        /// How long to wait for every thread to stop, in milliseconds.
        pub freeze_timeout_ms: u32,
        /// Inodes of the supervisor's stdin, stdout and stderr pipes (0: not a pipe), so the
        /// agent can tell them from the program's own pipes.
        pub stdio_ino: [u64; 3],
        /// Wait up to this many milliseconds for a moment with no connected TCP socket
        /// before freezing (0: do not wait). Older agents ignore it.
        pub wait_idle_ms: u32,
        /// The epoch (`Done::epoch`) of this agent's checkpoint whose image is the parent
        /// of this one, or 0. With it the agent may send page windows unchanged since then
        /// as references (a `PAGES` record with the `REF` flag and only its header).
        pub parent_epoch: u32,
    }
}

wire! {
    /// Every thread is stopped.
    pub struct Frozen {
        pub threads: u32,
        pub reserved: u32,
        pub freeze_ns: u64,
    }
}

wire! {
    /// The stream is complete.
    pub struct Done {
        pub bytes: u64,
        pub pages: u64,
        pub write_ns: u64,
        /// This checkpoint's tracking epoch (0: no dirty tracking), for a later
        /// `Checkpoint::parent_epoch`.
        pub epoch: u64,
        /// Pages sent as unchanged since the parent (not read).
        pub unchanged_pages: u64,
    }
}

wire! {
    /// The threads run again; a snapshot child writes the stream.
    pub struct Released {
        /// From the checkpoint request to the threads running again (the time the program
        /// was stopped, as `Frozen::freeze_ns` plus the time until the release).
        pub frozen_ns: u64,
        /// Time the copy-on-write `clone` took.
        pub clone_ns: u64,
        /// Pid of the snapshot child.
        pub child_pid: u32,
        pub reserved: u32,
    }
}

wire! {
    /// The program was restored and runs.
    pub struct Restored {
        pub pid: u32,
        pub threads: u32,
        pub restore_ns: u64,
        /// The dirty-tracking epoch whose baseline is the restored image (0: not tracking),
        /// for a later `Checkpoint::parent_epoch`. Agents before version 2 do not send it.
        pub epoch: u64,
    }
}

/// Encodes a packet into `out`; returns its length.
pub fn encode(kind: u16, seq: u32, payload: &[u8], out: &mut [u8]) -> Option<usize> {
    let n = CtlHeader::SIZE + payload.len();
    if n > out.len() || n > MAX_PACKET {
        return None;
    }
    let h = CtlHeader { magic: CTL_MAGIC, version: CTL_VERSION, kind, len: payload.len() as u32, seq };
    h.encode(out)?;
    out[CtlHeader::SIZE..n].copy_from_slice(payload);
    Some(n)
}

/// Decodes a packet: its header and payload.
pub fn decode(packet: &[u8]) -> Option<(CtlHeader, &[u8])> {
    let h = CtlHeader::decode(packet)?;
    if h.magic != CTL_MAGIC || h.version != CTL_VERSION {
        return None;
    }
    let end = CtlHeader::SIZE.checked_add(h.len as usize)?;
    if end != packet.len() {
        return None;
    }
    Some((h, &packet[CtlHeader::SIZE..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip() {
        let mut p = [0u8; 64];
        let mut b = [0u8; Frozen::SIZE];
        Frozen { threads: 5, reserved: 0, freeze_ns: 1234 }.encode(&mut b).unwrap();
        let n = encode(msg::FROZEN, 9, &b, &mut p).unwrap();
        let (h, body) = decode(&p[..n]).unwrap();
        assert_eq!((h.kind, h.seq), (msg::FROZEN, 9));
        assert_eq!(Frozen::decode(body).unwrap().threads, 5);
        assert!(decode(&p[..n - 1]).is_none(), "length must match the packet");
        p[0] ^= 1;
        assert!(decode(&p[..n]).is_none(), "bad magic");
    }

    #[test]
    fn released_round_trips() {
        let mut p = [0u8; 64];
        let mut b = [0u8; Released::SIZE];
        Released { frozen_ns: 66_600_000, clone_ns: 15_000_000, child_pid: 4242, reserved: 0 }.encode(&mut b).unwrap();
        let n = encode(msg::RELEASED, 3, &b, &mut p).unwrap();
        let (h, body) = decode(&p[..n]).unwrap();
        assert_eq!(h.kind, msg::RELEASED);
        let r = Released::decode(body).unwrap();
        assert_eq!((r.frozen_ns, r.clone_ns, r.child_pid), (66_600_000, 15_000_000, 4242));
        assert!(Released::decode(&body[..Released::SIZE - 1]).is_none(), "short payload");
        // STDIO_SAVED has no payload.
        let n = encode(msg::STDIO_SAVED, 4, &[], &mut p).unwrap();
        assert_eq!(decode(&p[..n]).unwrap().0.kind, msg::STDIO_SAVED);
    }
}
