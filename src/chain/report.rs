//! What a chain cost: the JSON report (`--report`), the summary line, the progress line on
//! a terminal, and the check that the limit leaves the program time to run.

use super::*;
use crate::engine::stdio::write_all_fd;
use crate::store::Store;
use crate::util::bytes;
use anyhow::Result;
use serde::Serialize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The report of a finished chain.
#[derive(Serialize, Debug)]
pub struct Report {
    /// The chain id.
    pub chain: String,
    /// The program and its arguments.
    pub program: Vec<String>,
    /// Each step's limit.
    pub limit_ms: u64,
    /// The program's exit status.
    pub exit_status: i32,
    /// The last line of the program's stdout.
    pub last_line: String,
    /// Every attempt of every step that ran, in order.
    pub steps: Vec<StepStats>,
    /// Sums over the steps.
    pub totals: Totals,
}

/// Chain totals (the paper's figures: execution time, invocations, CPU and memory use).
#[derive(Serialize, Debug, Default)]
pub struct Totals {
    /// Steps that ran the program (duplicates and late attempts left out).
    pub steps: u32,
    /// Invocations, duplicates and retries included.
    pub invocations: u32,
    /// From the start of `run` to the end.
    pub wall_ms: f64,
    /// Checkpointing and storing, all steps.
    pub checkpoint_ms: f64,
    /// Restoring, all steps.
    pub restore_ms: f64,
    /// Time the program was frozen, all steps.
    pub frozen_ms: f64,
    /// The largest image.
    pub largest_image_bytes: u64,
    /// The program's CPU time, all steps.
    pub cpu_ms: f64,
    /// CPU time per step.
    pub cpu_ms_per_step: f64,
    /// The program's largest peak resident memory in any step.
    pub peak_rss_bytes: u64,
}

/// Reads every step's statistics from the store and adds them up.
pub fn collect(store: &dyn Store, chain: &str, r: &ResultRecord, wall: Duration, limit: Duration) -> Result<Report> {
    let spec: Option<Spec> = store.get(&keys::spec(chain))?.and_then(|b| serde_json::from_slice(&b).ok());
    let mut steps: Vec<StepStats> = Vec::new();
    for k in store.list(&format!("chains/{chain}/stats-"))? {
        if let Some(b) = store.get(&k)? {
            if let Ok(s) = serde_json::from_slice::<StepStats>(&b) {
                steps.push(s);
            }
        }
    }
    steps.sort_by_key(|s| (s.step, s.attempt));
    let mut t = Totals { invocations: steps.len() as u32, wall_ms: wall.as_secs_f64() * 1000.0, ..Default::default() };
    for s in &steps {
        if !matches!(s.outcome, Some(Outcome::Checkpointed) | Some(Outcome::Finished)) {
            continue;
        }
        t.steps += 1;
        t.checkpoint_ms += s.checkpoint_ms.unwrap_or(0.0) + s.store_ms.unwrap_or(0.0);
        t.restore_ms += s.restore_ms.unwrap_or(0.0);
        t.frozen_ms += s.frozen_ms.unwrap_or(0.0);
        t.largest_image_bytes = t.largest_image_bytes.max(s.image_bytes.unwrap_or(0));
        t.cpu_ms += s.cpu_ms;
        t.peak_rss_bytes = t.peak_rss_bytes.max(s.peak_rss_bytes);
    }
    if t.steps > 0 {
        t.cpu_ms_per_step = t.cpu_ms / t.steps as f64;
    }
    Ok(Report {
        chain: chain.to_string(),
        program: spec.map(|s| s.argv).unwrap_or_default(),
        limit_ms: limit.as_millis() as u64,
        exit_status: r.exit_status,
        last_line: r.last_line.clone(),
        steps,
        totals: t,
    })
}

fn secs(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

/// The final line on stderr.
pub fn summary(r: &Report) -> String {
    let t = &r.totals;
    format!(
        "limitless: {} step{}, {} total, {} checkpointing, {} restoring, largest image {} (exit status {})",
        t.steps,
        if t.steps == 1 { "" } else { "s" },
        secs(t.wall_ms),
        secs(t.checkpoint_ms),
        secs(t.restore_ms),
        bytes(t.largest_image_bytes),
        r.exit_status
    )
}

/// If the last three steps each ran the program for less than a twentieth of the limit,
/// the limit is too short for this program: returns a message and the least limit to use.
pub fn too_short(store: &dyn Store, chain: &str, limit: Duration) -> Result<Option<(String, String)>> {
    let mut recent: Vec<StepStats> = Vec::new();
    for k in store.list(&format!("chains/{chain}/stats-"))? {
        if let Some(s) = store.get(&k)?.and_then(|b| serde_json::from_slice::<StepStats>(&b).ok()) {
            if s.outcome == Some(Outcome::Checkpointed) {
                recent.push(s);
            }
        }
    }
    recent.sort_by_key(|s| (s.step, s.attempt));
    let last: Vec<&StepStats> = recent.iter().rev().take(3).collect();
    let lim = limit.as_secs_f64() * 1000.0;
    if last.len() < 3 || last.iter().any(|s| s.run_ms >= lim / 20.0) {
        return Ok(None);
    }
    let overhead =
        last.iter().map(|s| s.restore_ms.unwrap_or(0.0) + s.checkpoint_ms.unwrap_or(0.0) + s.store_ms.unwrap_or(0.0)).fold(0.0, f64::max);
    let least = format!("{}s", ((overhead * 4.0).max(1000.0) / 1000.0).ceil());
    Ok(Some((
        format!(
            "the limit {} leaves this program almost no time to run: each step spends about {} restoring and checkpointing; use --limit of at least {least}",
            secs(lim),
            secs(overhead)
        ),
        least,
    )))
}

/// Why steps keep being killed by the limit, with the least limit that would work,
/// estimated from the checkpoint and restore speed of earlier steps and the largest
/// memory the program reached.
pub fn why_killed(store: &dyn Store, chain: &str, limit: Duration) -> Result<String> {
    let (mut ckpt_per_byte, mut restore_per_byte, mut size) = (0.0f64, 0.0f64, 0u64);
    for k in store.list(&format!("chains/{chain}/stats-"))? {
        if let Some(s) = store.get(&k)?.and_then(|b| serde_json::from_slice::<StepStats>(&b).ok()) {
            size = size.max(s.peak_rss_bytes);
            if let Some(img) = s.image_bytes.filter(|&b| b > 0) {
                ckpt_per_byte = ckpt_per_byte.max((s.checkpoint_ms.unwrap_or(0.0) + s.store_ms.unwrap_or(0.0)) / img as f64);
                if let Some(r) = s.restore_ms {
                    restore_per_byte = restore_per_byte.max(r / img as f64);
                }
            }
        }
    }
    let lim = limit.as_secs_f64() * 1000.0;
    if ckpt_per_byte == 0.0 || size == 0 {
        return Ok(format!("no step could checkpoint within --limit {}: the program's memory is too large to checkpoint in that time; use a longer --limit", secs(lim)));
    }
    // A restore reads what a checkpoint wrote; without a measured restore, assume it costs
    // as much as the checkpoint.
    let restore_per_byte = if restore_per_byte > 0.0 { restore_per_byte } else { ckpt_per_byte };
    let (c, r) = (ckpt_per_byte * size as f64, restore_per_byte * size as f64);
    Ok(format!(
        "the program reached {} of memory, which takes about {} to checkpoint and {} to restore, more than --limit {} leaves; use --limit of at least {}s",
        bytes(size),
        secs(c),
        secs(r),
        secs(lim),
        ((c + r) * 4.0 / 1000.0).ceil().max(2.0)
    ))
}

/// The progress line on a terminal: step, elapsed time, next checkpoint.
pub struct Progress {
    on: bool,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    shown: bool,
    /// The text on screen (redrawn only when it changes).
    last: String,
    step: u32,
    started: Option<Instant>,
    plan_unix_ms: u64,
}

impl Progress {
    /// A progress line, drawn only if `on`.
    pub fn new(on: bool) -> Progress {
        Progress { on, state: Mutex::new(ProgressState { shown: false, last: String::new(), step: 0, started: None, plan_unix_ms: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new step started.
    pub fn set_step(&self, step: u32, chain_start: Instant) {
        let mut g = self.lock();
        g.step = step;
        g.started.get_or_insert(chain_start);
        g.plan_unix_ms = 0;
    }

    /// The step plans its checkpoint at this time.
    pub fn set_plan(&self, at_unix_ms: u64) {
        self.lock().plan_unix_ms = at_unix_ms;
    }

    /// Redraws the line.
    pub fn draw(&self) {
        if !self.on {
            return;
        }
        let mut g = self.lock();
        let elapsed = g.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let next = if g.plan_unix_ms > 0 { (g.plan_unix_ms as f64 - now_unix_ms() as f64) / 1000.0 } else { f64::NAN };
        let line = if next.is_finite() && next > 0.0 {
            format!("\r\x1b[K[limitless] step {} · {elapsed:.1} s elapsed · next checkpoint in {next:.1} s", g.step)
        } else {
            format!("\r\x1b[K[limitless] step {} · {elapsed:.1} s elapsed", g.step)
        };
        if g.shown && line == g.last {
            return;
        }
        let _ = write_all_fd(2, line.as_bytes());
        g.shown = true;
        g.last = line;
    }

    /// Removes the line.
    pub fn clear(&self) {
        let mut g = self.lock();
        if g.shown {
            let _ = write_all_fd(2, b"\r\x1b[K");
            g.shown = false;
        }
    }

    /// Writes program output to `fd`, clearing the progress line first.
    pub fn write_through(&self, fd: i32, b: &[u8]) -> std::io::Result<()> {
        let mut g = self.lock();
        if g.shown {
            let _ = write_all_fd(2, b"\r\x1b[K");
            g.shown = false;
        }
        write_all_fd(fd, b)
    }
}
