//! When to checkpoint: the time kept at the end of a step for the checkpoint, the store
//! write and the handover, predicted from the program's resident memory and the cost of
//! earlier checkpoints, never less than the user's `--margin`.

use super::CostSample;
use std::time::Duration;

/// Assumed checkpoint-and-store speed before anything was measured (conservative).
const DEFAULT_BYTES_PER_MS: f64 = 100_000.0; // 100 MB/s
/// Fixed cost of a checkpoint before anything was measured.
const DEFAULT_FIXED_MS: f64 = 60.0;
/// Predictions are multiplied by this, and this much is added, for safety.
const SAFETY_FACTOR: f64 = 1.5;
const SAFETY_MS: f64 = 300.0;

/// Predicts how long a checkpoint of a program with `rss_bytes` resident takes (checkpoint,
/// store and handover), from `history` (newest last).
pub fn predict(rss_bytes: u64, history: &[CostSample]) -> Duration {
    let (fixed, per_byte) = match history.len() {
        0 => (DEFAULT_FIXED_MS, 1.0 / DEFAULT_BYTES_PER_MS),
        _ => {
            // The slowest recent cost per byte (noise makes single samples optimistic), with
            // the smallest recent checkpoint as the fixed part.
            let recent = &history[history.len().saturating_sub(4)..];
            let fixed = recent.iter().map(|s| s.ms).fold(f64::INFINITY, f64::min).min(2000.0);
            let per = recent.iter().map(|s| (s.ms - fixed).max(0.0) / (s.rss_bytes.max(1) as f64)).fold(0.0, f64::max);
            (fixed, per.max(1.0 / 4_000_000.0)) // never faster than 4 GB/s
        }
    };
    let ms = SAFETY_FACTOR * (fixed + per_byte * rss_bytes as f64) + SAFETY_MS;
    Duration::from_secs_f64(ms / 1000.0)
}

/// The margin to keep: the prediction, at least `floor`.
pub fn margin(rss_bytes: u64, history: &[CostSample], floor: Duration) -> Duration {
    predict(rss_bytes, history).max(floor)
}

/// Adds a sample, keeping the last eight.
pub fn remember(history: &mut Vec<CostSample>, s: CostSample) {
    history.push(s);
    if history.len() > 8 {
        history.remove(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_memory_and_learns_from_history() {
        let small = predict(1 << 20, &[]);
        let big = predict(1 << 30, &[]);
        assert!(big > small * 10, "{small:?} {big:?}");
        // Measured: 1 GiB took 2 s; predict 2 GiB at about twice that, with safety.
        let h = [CostSample { rss_bytes: 1 << 30, ms: 2000.0 }];
        let p = predict(2 << 30, &h).as_secs_f64();
        assert!(p > 3.9 && p < 6.5, "{p}");
        // Fast small checkpoints learn a small fixed cost.
        let h = [CostSample { rss_bytes: 2 << 20, ms: 8.0 }, CostSample { rss_bytes: 3 << 20, ms: 9.0 }];
        assert!(predict(3 << 20, &h) < Duration::from_millis(350));
    }

    #[test]
    fn floor_applies() {
        let h = [CostSample { rss_bytes: 1 << 20, ms: 5.0 }];
        assert_eq!(margin(1 << 20, &h, Duration::from_secs(3)), Duration::from_secs(3));
    }

    #[test]
    fn history_is_bounded() {
        let mut h = Vec::new();
        for i in 0..20 {
            remember(&mut h, CostSample { rss_bytes: i, ms: i as f64 });
        }
        assert_eq!(h.len(), 8);
        assert_eq!(h[7].rss_bytes, 19);
    }
}
