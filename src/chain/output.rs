//! The program's stdout (or stderr) over a chain, printed once.
//!
//! A step that dies before it hands over (killed by its limit, crashed) is run again from
//! the last checkpoint, so the program prints again what it printed after that checkpoint.
//! Each manifest says how many bytes of stdout (and of stderr) the program had written when
//! it was frozen ([`super::Manifest::out_bytes`], [`super::Manifest::err_bytes`]); the
//! controller knows how many it has printed. A re-run's output is compared with what was
//! printed from that position, and only what goes beyond it is printed. If the re-run prints something else (a program that does not repeat
//! itself exactly), the rest of its output is printed from the start of the line where it
//! differs, after a warning: what was printed cannot be taken back.
//!
//! The bytes printed since the last checkpoint are kept for the comparison, at most
//! [`KEEP_MAX`]; beyond that, a re-run's output is skipped by count alone.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

/// The most bytes of printed output kept for comparing a re-run with.
pub const KEEP_MAX: usize = 64 << 20;
/// A re-run that differs mid-line prints that line again from its start, if it is no
/// longer than this.
const LINE_MAX: usize = 4096;

/// What has been printed of one of the program's output streams.
#[derive(Default)]
pub struct Ledger {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bytes of the stream printed (a position in the program's output over the chain).
    printed: u64,
    /// The printed bytes from position `kept_from` up to `printed`, or a tail of them.
    kept: Vec<u8>,
    kept_from: u64,
}

/// One step's output on the stream.
pub struct StepOut {
    ledger: Arc<Ledger>,
    /// The position in the program's output of this step's next byte.
    pos: u64,
    /// Up to here its output was printed already (by an attempt that died).
    skip_to: u64,
    /// Its output differed from what was printed: print the rest as it comes.
    diverged: bool,
}

impl Ledger {
    /// Nothing printed yet.
    pub fn new() -> Arc<Ledger> {
        Arc::new(Ledger::default())
    }

    /// The output of a step whose program's output starts at position `from` (`None`: not
    /// known, from a manifest of an earlier version; all of it is printed).
    pub fn stream(self: &Arc<Self>, from: Option<u64>) -> StepOut {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (pos, skip_to) = match from {
            None => (st.printed, st.printed),
            // Nothing from there on was printed: a step after a hand-over, or the first of
            // a resumed chain. What is kept can go.
            Some(c) if c >= st.printed => {
                st.printed = c;
                st.kept.clear();
                st.kept_from = c;
                (c, c)
            }
            // A re-run from a checkpoint before what was printed.
            Some(c) => {
                if c >= st.kept_from {
                    let k = ((c - st.kept_from) as usize).min(st.kept.len());
                    st.kept.drain(..k);
                    st.kept_from = c;
                }
                (c, st.printed)
            }
        };
        StepOut { ledger: self.clone(), pos, skip_to, diverged: false }
    }

    /// What was printed since the last checkpoint, for a controller that resumes the chain
    /// ([`load`](Self::load)): the position of the kept bytes (8 bytes, little-endian), then
    /// the bytes. They end where the printing ended.
    pub fn save(&self) -> Vec<u8> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut b = Vec::with_capacity(8 + st.kept.len());
        b.extend_from_slice(&st.kept_from.to_le_bytes());
        b.extend_from_slice(&st.kept);
        b
    }

    /// A ledger of what an earlier controller printed, from [`save`](Self::save)'s bytes
    /// (`None` if they are not such).
    pub fn load(b: &[u8]) -> Option<Arc<Ledger>> {
        let kept_from = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let kept = b[8..].to_vec();
        if kept.len() > KEEP_MAX {
            return None;
        }
        let printed = kept_from.checked_add(kept.len() as u64)?;
        Some(Arc::new(Ledger { state: Mutex::new(State { printed, kept, kept_from }) }))
    }

    #[cfg(test)]
    fn printed(&self) -> u64 {
        self.state.lock().unwrap().printed
    }
}

impl StepOut {
    /// Of `chunk`, the next bytes of this step's output, the part to print (the rest was
    /// printed before), recorded as printed; and whether the output differs here for the
    /// first time from what was printed before.
    pub fn take<'a>(&mut self, chunk: &'a [u8]) -> (Cow<'a, [u8]>, bool) {
        let mut st = self.ledger.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut rest = chunk;
        let mut now_diverged = false;
        // After a divergence: the start of the differing line, printed again whole.
        let mut line_head: Vec<u8> = Vec::new();
        if !self.diverged && self.pos < self.skip_to {
            let k = rest.len().min((self.skip_to - self.pos) as usize);
            let kept_end = st.kept_from + st.kept.len() as u64;
            // Compared where the printed bytes are kept; skipped by count elsewhere.
            let same = if self.pos >= st.kept_from && self.pos + k as u64 <= kept_end {
                let at = (self.pos - st.kept_from) as usize;
                rest[..k].iter().zip(&st.kept[at..at + k]).position(|(a, b)| a != b).unwrap_or(k)
            } else {
                k
            };
            self.pos += same as u64;
            rest = &rest[same..];
            if same < k {
                self.diverged = true;
                now_diverged = true;
                // The bytes before it on its line were compared, so they are kept.
                let upto = (self.pos - st.kept_from) as usize;
                let from = st.kept[..upto].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if upto - from <= LINE_MAX {
                    line_head = st.kept[from..upto].to_vec();
                    self.pos -= line_head.len() as u64;
                }
            }
        }
        if rest.is_empty() && line_head.is_empty() {
            return (Cow::Borrowed(rest), now_diverged);
        }
        // New output at `pos`. After a divergence that is before what was printed: the
        // kept bytes from there on are this attempt's no longer.
        if self.pos < st.kept_from {
            st.kept.clear();
            st.kept_from = self.pos;
        } else {
            let k = (self.pos - st.kept_from) as usize;
            st.kept.truncate(k);
        }
        st.kept.extend_from_slice(&line_head);
        st.kept.extend_from_slice(rest);
        if st.kept.len() > KEEP_MAX {
            let drop = st.kept.len() - KEEP_MAX / 2;
            st.kept.drain(..drop);
            st.kept_from += drop as u64;
        }
        self.pos += (line_head.len() + rest.len()) as u64;
        st.printed = self.pos;
        if line_head.is_empty() {
            (Cow::Borrowed(rest), now_diverged)
        } else {
            line_head.extend_from_slice(rest);
            (Cow::Owned(line_head), now_diverged)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to `out`; returns what it printed and whether it diverged.
    fn feed(out: &mut StepOut, chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut printed = Vec::new();
        let mut diverged = false;
        for c in chunks {
            let (p, d) = out.take(c);
            printed.extend_from_slice(&p);
            diverged |= d;
        }
        (printed, diverged)
    }

    #[test]
    fn a_rerun_prints_only_what_the_killed_attempt_did_not() {
        let l = Ledger::new();
        // Step 0 prints "a\nb\n" and checkpoints at 4 bytes; step 1 prints "c\nd\n" and
        // is killed; its re-run prints "c\nd\ne\n" in other chunks.
        assert_eq!(feed(&mut l.stream(Some(0)), &[b"a\n", b"b\n"]).0, b"a\nb\n");
        assert_eq!(feed(&mut l.stream(Some(4)), &[b"c\nd", b"\n"]).0, b"c\nd\n");
        let (p, d) = feed(&mut l.stream(Some(4)), &[b"c", b"\nd\ne", b"\n"]);
        assert_eq!((p.as_slice(), d), (&b"e\n"[..], false));
        assert_eq!(l.printed(), 10);
        // Killed again, and the next re-run stops short of it all: it prints nothing.
        assert_eq!(feed(&mut l.stream(Some(4)), &[b"c\n"]).0, b"");
        // The step after it starts where everything was printed.
        assert_eq!(feed(&mut l.stream(Some(10)), &[b"f\n"]).0, b"f\n");
        assert_eq!(l.printed(), 12);
    }

    #[test]
    fn a_step_zero_rerun_is_compared_from_the_start() {
        let l = Ledger::new();
        assert_eq!(feed(&mut l.stream(Some(0)), &[b"READY\ntick 0\n"]).0, b"READY\ntick 0\n");
        assert_eq!(feed(&mut l.stream(Some(0)), &[b"READY\n", b"tick 0\ntick 25\n"]).0, b"tick 25\n");
    }

    #[test]
    fn a_rerun_that_prints_something_else_is_printed_from_where_it_differs() {
        let l = Ledger::new();
        feed(&mut l.stream(Some(0)), &[b"t=1\nt=2\n"]);
        let (p, d) = feed(&mut l.stream(Some(0)), &[b"t=1\nt", b"=3\nt=4\n"]);
        assert!(d);
        // From the start of the line that differs.
        assert_eq!(p, b"t=3\nt=4\n");
        // A later re-run is compared with what that attempt printed.
        let (p, d) = feed(&mut l.stream(Some(4)), &[b"t=3\nt=4\nt=5\n"]);
        assert_eq!((p.as_slice(), d), (&b"t=5\n"[..], false));
    }

    #[test]
    fn unknown_positions_print_everything_and_a_resumed_chain_starts_where_its_manifest_says() {
        let l = Ledger::new();
        assert_eq!(feed(&mut l.stream(None), &[b"x\n"]).0, b"x\n");
        assert_eq!(feed(&mut l.stream(None), &[b"x\n"]).0, b"x\n");
        let l = Ledger::new();
        assert_eq!(feed(&mut l.stream(Some(100)), &[b"y\n"]).0, b"y\n");
        assert_eq!(l.printed(), 102);
        assert_eq!(feed(&mut l.stream(Some(100)), &[b"y\nz\n"]).0, b"z\n");
    }

    #[test]
    fn a_resuming_controller_does_not_print_again_what_the_interrupted_one_printed() {
        let l = Ledger::new();
        feed(&mut l.stream(Some(0)), &[b"a\n"]);
        // Checkpoint at 2; step 1 prints two lines, then the controller is interrupted.
        feed(&mut l.stream(Some(2)), &[b"b\nc\n"]);
        let saved = l.save();
        assert_eq!(&saved[..8], &2u64.to_le_bytes());
        let again = Ledger::load(&saved).expect("loads");
        assert_eq!(again.printed(), 6);
        let (p, d) = feed(&mut again.stream(Some(2)), &[b"b\nc\nd\n"]);
        assert_eq!((p.as_slice(), d), (&b"d\n"[..], false));
        // Bad bytes are refused, not trusted.
        assert!(Ledger::load(b"short").is_none());
        assert!(Ledger::load(&[0xff; 9]).is_none());
    }

    #[test]
    fn beyond_what_is_kept_a_rerun_is_skipped_by_count() {
        let l = Ledger::new();
        let big = vec![b'a'; KEEP_MAX + 10];
        feed(&mut l.stream(Some(0)), &[&big]);
        // Differs in its first byte, which is no longer kept: skipped by count.
        let mut other = big.clone();
        other[0] = b'b';
        other.extend_from_slice(b"end");
        let (p, d) = feed(&mut l.stream(Some(0)), &[&other]);
        assert_eq!((p.as_slice(), d), (&b"end"[..], false));
    }
}
