//! The supervisor's side of the control socket to the agent (`SOCK_SEQPACKET`, one packet
//! per message, the image stream's fd passed with `SCM_RIGHTS`).

use limitless_image::ctl::{self, msg, Done, Frozen, Hello, Released, Restored, MAX_PACKET};
use limitless_image::wire::Wire;
use rustix::net::{
    recvmsg, sendmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    SocketFlags, SocketType,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// A message from the agent.
#[derive(Debug, Clone)]
pub enum AgentMsg {
    /// The agent started in the program.
    Hello(Hello),
    /// Every thread is stopped.
    Frozen(Frozen),
    /// The threads run again while a snapshot child writes the stream.
    Released(Released),
    /// A remark for the log (why a snapshot was not possible...).
    Note(String),
    /// The image stream is complete.
    Done(Done),
    /// The checkpoint (or a restart) failed; the text says why.
    Failed(String),
    /// The program was restored and runs.
    Restored(Restored),
    /// The agent's side of the socket closed (the program exited or was killed).
    Closed,
}

/// The supervisor's end of the control socket.
pub struct Link {
    sock: OwnedFd,
    seq: AtomicU32,
}

impl Link {
    /// A connected pair: the link, and the end to hand to the program.
    pub fn pair() -> io::Result<(Link, OwnedFd)> {
        let (a, b) = socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
        Ok((Link { sock: a, seq: AtomicU32::new(1) }, b))
    }

    /// Sends a message, optionally with one fd.
    pub fn send(&self, kind: u16, payload: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut pkt = [0u8; MAX_PACKET];
        let n = ctl::encode(kind, self.seq.fetch_add(1, Ordering::Relaxed), payload, &mut pkt)
            .ok_or_else(|| io::Error::other("control message too large"))?;
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        let fds;
        if let Some(f) = fd {
            fds = [f];
            anc.push(SendAncillaryMessage::ScmRights(&fds));
        }
        sendmsg(&self.sock, &[IoSlice::new(&pkt[..n])], &mut anc, SendFlags::NOSIGNAL)?;
        Ok(())
    }

    /// Sends a wire structure.
    pub fn send_wire<T: Wire>(&self, kind: u16, v: &T, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut b = vec![0u8; T::SIZE];
        v.put(&mut b);
        self.send(kind, &b, fd)
    }

    /// Waits for the next message.
    pub fn recv(&self) -> io::Result<AgentMsg> {
        loop {
            let mut buf = [0u8; MAX_PACKET];
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let r = match recvmsg(&self.sock, &mut [IoSliceMut::new(&mut buf)], &mut anc, RecvFlags::CMSG_CLOEXEC) {
                Ok(r) => r,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            // The agent sends no fds; close any that came anyway.
            for m in anc.drain() {
                if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = m {
                    fds.for_each(drop);
                }
            }
            if r.bytes == 0 {
                return Ok(AgentMsg::Closed);
            }
            let Some((h, body)) = ctl::decode(&buf[..r.bytes]) else {
                return Err(io::Error::other("malformed message from the agent"));
            };
            return Ok(match h.kind {
                msg::HELLO => AgentMsg::Hello(Hello::decode(body).ok_or_else(|| io::Error::other("short HELLO"))?),
                msg::FROZEN => AgentMsg::Frozen(Frozen::decode(body).ok_or_else(|| io::Error::other("short FROZEN"))?),
                msg::DONE => AgentMsg::Done(Done::decode(body).ok_or_else(|| io::Error::other("short DONE"))?),
                msg::RESTORED => AgentMsg::Restored(restored(body).ok_or_else(|| io::Error::other("short RESTORED"))?),
                msg::RELEASED => AgentMsg::Released(Released::decode(body).ok_or_else(|| io::Error::other("short RELEASED"))?),
                msg::NOTE => AgentMsg::Note(String::from_utf8_lossy(body).into_owned()),
                msg::FAILED => AgentMsg::Failed(String::from_utf8_lossy(body).into_owned()),
                _ => continue,
            });
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Decodes `RESTORED`: agents before version 2 send it without `epoch` (then 0).
fn restored(body: &[u8]) -> Option<Restored> {
    const OLD: usize = 16;
    let mut b = [0u8; Restored::SIZE];
    let n = body.len().min(Restored::SIZE);
    b[..n].copy_from_slice(&body[..n]);
    (body.len() >= OLD).then(|| Restored::decode(&b)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_from_an_older_agent_has_no_epoch() {
        let new = Restored { pid: 7, threads: 3, restore_ns: 11, epoch: 5 };
        let mut b = vec![0u8; Restored::SIZE];
        new.put(&mut b);
        let full = restored(&b).expect("a whole RESTORED");
        assert_eq!((full.pid, full.threads, full.restore_ns, full.epoch), (7, 3, 11, 5));
        // An agent before version 2 sends the first 16 bytes only.
        let old = restored(&b[..16]).expect("an older agent's RESTORED");
        assert_eq!((old.pid, old.threads, old.restore_ns, old.epoch), (7, 3, 11, 0));
        assert!(restored(&b[..15]).is_none(), "a cut RESTORED was taken");
    }
}
