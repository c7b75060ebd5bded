//! When to checkpoint: the time kept at the end of a step for the checkpoint, the store
//! write and the handover, predicted from what the checkpoint would have to read and store
//! now and the cost of earlier checkpoints, never less than the user's `--margin`.
//!
//! What a checkpoint has to store is the program's resident memory, less (with dirty
//! tracking, [`crate::engine::supervisor::Supervisor::send_estimate`]) the memory it has
//! not written since its restore. So the prediction follows what the program writes while
//! it runs: a step that suddenly writes all of its memory gets the margin of a full
//! checkpoint, however cheap the checkpoints before it were.

use super::CostSample;
use std::time::Duration;

/// Assumed checkpoint-and-store speed before anything was measured (conservative).
const DEFAULT_BYTES_PER_MS: f64 = 100_000.0; // 100 MB/s
/// Fixed cost of a checkpoint before anything was measured.
const DEFAULT_FIXED_MS: f64 = 60.0;
/// Predictions are multiplied by this, and this much is added, for safety.
const SAFETY_FACTOR: f64 = 1.5;
const SAFETY_MS: f64 = 300.0;
/// Samples that stored less than this fraction of what is to be stored now do not set the
/// cost per byte (their few milliseconds of noise, scaled up, would), unless there is no
/// other.
const COMPARABLE: u64 = 4;
/// Samples kept, and how many of the newest ones the prediction uses (besides the one that
/// stored the most).
const KEPT: usize = 8;
const RECENT: usize = 4;

/// Predicts how long a checkpoint that has to read and store `send_bytes` takes (checkpoint,
/// store and handover), from `history` (newest last).
///
/// The fixed part is the cheapest recent checkpoint's time. The rest is scaled from the
/// slowest of the recent checkpoints and the one in the history that stored the most (noise
/// makes single samples optimistic), counting only those that stored at least a quarter of
/// `send_bytes`, or else the largest. The largest is there because after a tracked restore
/// the recent checkpoints may all have stored little, and say nothing about the cost of
/// storing much.
pub fn predict(send_bytes: u64, history: &[CostSample]) -> Duration {
    let (fixed, per_byte) = match history.len() {
        0 => (DEFAULT_FIXED_MS, 1.0 / DEFAULT_BYTES_PER_MS),
        n => {
            let recent = &history[n.saturating_sub(RECENT)..];
            let fixed = recent.iter().map(|s| s.ms).fold(f64::INFINITY, f64::min).min(2000.0);
            let per_byte = |s: &CostSample| (s.ms - fixed).max(0.0) / (s.send().max(1) as f64);
            let big = largest(history);
            let per = recent
                .iter()
                .chain(big)
                .filter(|s| s.send().saturating_mul(COMPARABLE) >= send_bytes)
                .map(per_byte)
                .fold(big.map_or(0.0, per_byte), f64::max);
            (fixed, per.max(1.0 / 4_000_000.0)) // never faster than 4 GB/s
        }
    };
    let ms = SAFETY_FACTOR * (fixed + per_byte * send_bytes as f64) + SAFETY_MS;
    Duration::from_secs_f64(ms / 1000.0)
}

/// The newest of the samples that stored the most.
fn largest(history: &[CostSample]) -> Option<&CostSample> {
    // `max_by_key` returns the last of equal elements.
    history.iter().max_by_key(|s| s.send())
}

/// The margin to keep: the prediction, at least `floor`.
pub fn margin(send_bytes: u64, history: &[CostSample], floor: Duration) -> Duration {
    predict(send_bytes, history).max(floor)
}

/// Adds a sample, keeping the last few and the one that stored the most.
pub fn remember(history: &mut Vec<CostSample>, s: CostSample) {
    history.push(s);
    if history.len() > KEPT {
        // Drop the oldest, unless it is the one that stored the most (and the newest such).
        let oldest_is_largest = largest(history).is_some_and(|b| std::ptr::eq(b, &history[0]));
        history.remove(if oldest_is_largest { 1 } else { 0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss_bytes: u64, send: Option<u64>, ms: f64) -> CostSample {
        CostSample { rss_bytes, ms, send_bytes: send }
    }

    #[test]
    fn grows_with_memory_and_learns_from_history() {
        let small = predict(1 << 20, &[]);
        let big = predict(1 << 30, &[]);
        assert!(big > small * 10, "{small:?} {big:?}");
        // Measured: 1 GiB took 2 s; predict 2 GiB at about twice that, with safety.
        let h = [sample(1 << 30, None, 2000.0)];
        let p = predict(2 << 30, &h).as_secs_f64();
        assert!(p > 3.9 && p < 6.5, "{p}");
        // Fast small checkpoints learn a small fixed cost.
        let h = [sample(2 << 20, None, 8.0), sample(3 << 20, None, 9.0)];
        assert!(predict(3 << 20, &h) < Duration::from_millis(350));
    }

    /// A full checkpoint of 256 MiB that took 900 ms, then tracked ones of the same
    /// program that stored `send` bytes each (the rest taken unread) in `ms`.
    fn after_a_full_one(send: u64, ms: &[f64]) -> Vec<CostSample> {
        let mut h = vec![sample(256 << 20, None, 900.0)];
        for &ms in ms {
            remember(&mut h, sample(256 << 20, Some(send), ms));
        }
        h
    }

    #[test]
    fn a_burst_of_writes_after_cheap_tracked_checkpoints_gets_the_cost_of_a_full_one() {
        // Four tracked checkpoints stored 3 MiB each in about 30 ms.
        let mut h = after_a_full_one(3 << 20, &[32.0, 34.0, 30.0, 26.0]);
        // Writing little, the margin stays small.
        let little = predict(3 << 20, &h).as_secs_f64();
        assert!(little < 0.4, "{little}");
        // Having written all of it, the margin covers a full checkpoint again.
        let all = predict(256 << 20, &h).as_secs_f64();
        assert!(all > 0.9 * 1.5, "{all}");
        // The full checkpoint's sample outlives the eight kept.
        for _ in 0..20 {
            remember(&mut h, sample(256 << 20, Some(3 << 20), 30.0));
        }
        assert_eq!(h.len(), KEPT);
        assert_eq!(h.iter().filter(|s| s.send() == 256 << 20).count(), 1);
        assert!(predict(256 << 20, &h).as_secs_f64() > 0.9 * 1.5);
    }

    #[test]
    fn a_checkpoint_of_a_few_pages_does_not_make_a_cost_per_byte_of_its_noise() {
        // Tracked checkpoints that stored 10 MB in 60-220 ms (S3 round trips vary):
        // scaled per byte, the 160 ms of noise would predict 4 s for 256 MiB.
        let h = after_a_full_one(10 << 20, &[105.0, 183.0, 223.0, 61.0]);
        let all = predict(256 << 20, &h).as_secs_f64();
        assert!(all > 0.9 * 1.5 && all < 2.0, "{all}");
        // And for the 10 MB they stored, the slowest of them counts.
        let little = predict(10 << 20, &h).as_secs_f64();
        assert!(little > 0.223 * 1.5 && little < 1.0, "{little}");
    }

    #[test]
    fn samples_of_earlier_versions_count_their_resident_memory() {
        let old: CostSample = serde_json::from_str(r#"{"rss_bytes": 1048576, "ms": 9.5}"#).unwrap();
        assert_eq!(old.send(), 1 << 20);
        assert!(!serde_json::to_string(&old).unwrap().contains("send_bytes"));
    }

    #[test]
    fn floor_applies() {
        let h = [sample(1 << 20, None, 5.0)];
        assert_eq!(margin(1 << 20, &h, Duration::from_secs(3)), Duration::from_secs(3));
    }

    #[test]
    fn history_is_bounded() {
        let mut h = Vec::new();
        for i in 0..20 {
            remember(&mut h, sample(i, None, i as f64));
        }
        assert_eq!(h.len(), KEPT);
        assert_eq!(h[7].rss_bytes, 19);
    }
}
