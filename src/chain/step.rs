//! One step of a chain, as one invocation runs it (a fresh process, like a fresh
//! container): claim the step, start or restore the program, let it run until the deadline
//! minus the predicted margin, checkpoint it, store the image and the manifest of the next
//! step, hand over. If the program ends first, store the result and hand over nothing.
//!
//! The checkpoint keeps the program frozen until the manifest is written. If the image
//! cannot be stored, the program is let go and the checkpoint tried again while there is
//! time; the previous checkpoint stays the chain's latest, so nothing half-written is ever
//! restored.

use super::margin;
use super::*;
use crate::engine::checkpoint::{After, Request, WriteFailed};
use crate::engine::restore::{restore, restore_stream};
use crate::engine::supervisor::{find_program, Options, Supervisor};
use crate::failpoint;
use crate::store::{ImageAt, Store};
use anyhow::{anyhow, bail, Context, Result};
use limitless_image::file::Source;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How the next step is invoked, and where progress goes: the platform's side.
pub trait Platform {
    /// Invokes step `step` (attempt `attempt`) of `chain`, retrying as the platform
    /// allows; returns an id of the invocation (an activation id).
    fn invoke(&self, chain: &str, step: u32, attempt: u32) -> Result<String>;
    /// Time to keep after the checkpoint for handing over (invocation retries), before the
    /// deadline; added to the predicted margin.
    fn handover_reserve(&self) -> Duration {
        Duration::ZERO
    }
    /// The step plans to checkpoint at this time (for progress displays).
    fn plan(&self, _checkpoint_at_unix_ms: u64) {}
    /// A checkpoint failed for this reason (the program runs on; the step tries again).
    fn checkpoint_failed(&self, _reason: &str) {}
    /// What the step cost, when it ends.
    fn report(&self, _stats: &StepStats) {}
}

/// One invocation.
pub struct StepArgs {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The chain id.
    pub chain: String,
    /// Which step.
    pub step: u32,
    /// Which attempt of it.
    pub attempt: u32,
    /// When the platform kills this invocation.
    pub deadline: SystemTime,
    /// At least this much time is kept for the checkpoint.
    pub margin_floor: Duration,
    /// Environment for a program started in this step that the store must not see (an API
    /// key).
    pub extra_env: Vec<(String, String)>,
}

/// How a step ended.
pub struct StepDone {
    /// What happened.
    pub outcome: Outcome,
    /// The chain's result, if the program ended (in this step or before).
    pub result: Option<ResultRecord>,
    /// The invocation of the next step, if this step handed over.
    pub next_activation: Option<String>,
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The trailer hash of an image file (it covers every byte of the image).
pub fn trailer_hash(src: &dyn Source) -> Result<String> {
    let len = src.size()?;
    let n = limitless_image::format::Trailer::SIZE;
    if len < n as u64 {
        bail!("not a complete image ({len} bytes)");
    }
    let mut b = vec![0u8; n];
    src.read_exact_at(&mut b, len - n as u64)?;
    Ok(b[n - 32..].iter().map(|x| format!("{x:02x}")).collect())
}

/// Runs one step.
pub fn run_step(a: &StepArgs, platform: &dyn Platform) -> Result<StepDone> {
    let t0 = Instant::now();
    failpoint::set_context(a.step, a.attempt);
    let store = &*a.store;
    let mut stats = StepStats { step: a.step, attempt: a.attempt, ..Default::default() };
    if let Some(r) = read_result(store, &a.chain)? {
        return Ok(StepDone { outcome: Outcome::AlreadyFinished, result: Some(r), next_activation: None });
    }
    let claim = serde_json::json!({ "pid": std::process::id(), "started_unix_ms": now_unix_ms() });
    if !store.put_if_absent(&keys::claim(&a.chain, a.step, a.attempt), claim.to_string().as_bytes())? {
        return Ok(StepDone { outcome: Outcome::Duplicate, result: None, next_activation: None });
    }
    let spec: Spec = serde_json::from_slice(
        &store.get(&keys::spec(&a.chain))?.ok_or_else(|| anyhow!("chain {} does not exist in the store {}", a.chain, store.describe()))?,
    )
    .context("the chain's spec is unreadable")?;

    // Start or restore the program.
    let opts = Options {
        socket: None,
        carry: crate::engine::carry::Carry { dirs: spec.carry.iter().map(Into::into).collect(), written: spec.carry_written },
        // Every step stores a whole image, never a delta. Where the store can take the
        // memory unchanged since the previous image from that image's chunks, dirty
        // tracking says which (at the cost of a fault at each page's first write);
        // elsewhere it would only cost the faults.
        track: store.takes_unchanged() && std::env::var_os("LIMITLESS_TRACK").is_none_or(|v| v != "0"),
        // A step's image is a downloaded copy that the next step replaces: copy it in.
        map: false,
    };
    let mut restored_from: Option<String> = None;
    // The program's stdout and stderr bytes, and the bytes of its input it had been given,
    // before this step (over the whole chain), if known.
    let mut out_base = [Some(0); 2];
    let mut in_base = Some(0);
    let (mut sup, mut history) = if a.step == 0 {
        let prog = find_program(std::path::Path::new(&spec.argv[0])).map_err(|(_, m)| anyhow!(m))?;
        let args: Vec<std::ffi::OsString> = spec.argv[1..].iter().map(Into::into).collect();
        std::env::set_current_dir(&spec.cwd).with_context(|| format!("cannot enter {}", spec.cwd))?;
        let env: Vec<(String, String)> = spec.env.iter().chain(a.extra_env.iter()).cloned().collect();
        let sup = Supervisor::launch_with_env(&prog, &args, &env, &opts)?;
        (sup, Vec::new())
    } else {
        let m: Manifest = serde_json::from_slice(
            &store.get(&keys::manifest(&a.chain, a.step))?.ok_or_else(|| anyhow!("step {} has no manifest in the store", a.step))?,
        )
        .context("the manifest is unreadable")?;
        // Restoring includes fetching the image (a download from a remote store, or a
        // stream of its chunks straight into the restore).
        let t = Instant::now();
        let key = &m.image.key;
        let check = |got: String| {
            if got != m.image.trailer_hash {
                bail!("the image {key} is not the one its manifest names (hash {got}, manifest {})", m.image.trailer_hash);
            }
            Ok(())
        };
        let (sup, _) = match store.open_image(key)? {
            ImageAt::Missing => bail!("the image {key} is missing from the store"),
            ImageAt::File(path) => {
                check(trailer_hash(&std::fs::File::open(&path)?)?)?;
                restore(&path, &opts)?
            }
            ImageAt::Stream(src) => {
                check(trailer_hash(&*src)?)?;
                restore_stream(src, &crate::store::image_name(store, key), &opts)?
            }
        };
        stats.restore_ms = Some(ms(t.elapsed()));
        restored_from = Some(m.image.key);
        out_base = [m.out_bytes, m.err_bytes];
        in_base = m.in_bytes;
        (sup, m.history)
    };
    let running_since = Instant::now();
    // At most a quarter of this step's time goes to the hand-over reserve.
    let reserve = platform.handover_reserve().min(until(a.deadline) / 4);
    let mut retries = 0;
    let mut told = String::new();
    let mut last_plan = 0;
    let outcome = loop {
        if let Some(code) = sup.try_wait()? {
            stats.run_ms = ms(running_since.elapsed());
            break finish(a, store, &sup, code, &mut stats)?;
        }
        let ps = sup.proc_stats();
        stats.cpu_ms = stats.cpu_ms.max(ps.cpu_ms);
        stats.peak_rss_bytes = stats.peak_rss_bytes.max(ps.peak_rss_bytes);
        let extra = reserve + Duration::from_millis(spec.wait_idle_ms);
        let floor = a.margin_floor.saturating_sub(reserve);
        let start_for = |send: u64| a.deadline.checked_sub(margin::margin(send, &history, floor) + extra).unwrap_or(UNIX_EPOCH);
        // When storing all of the resident memory would have to start.
        let mut at = start_for(ps.rss_bytes);
        // With dirty tracking, only what the program wrote since its restore has to be
        // read and stored. From that point on, the margin follows what it has written (a
        // page-table walk of about 3 ms per GiB, in the last second or so of the step).
        // Writes in the last moments can still outrun it: an attempt after one that died
        // keeps the margin of storing everything.
        let estimate = (a.attempt == 0 && until(at).is_zero()).then(|| sup.send_estimate(ps.rss_bytes));
        if let Some(e) = estimate {
            at = start_for(e);
        }
        let plan = unix_ms(at);
        if plan.abs_diff(last_plan) > 200 {
            platform.plan(plan);
            last_plan = plan;
        }
        if running_since.elapsed() > Duration::from_millis(100) {
            failpoint::hit("step.running");
        }
        let wait = until(at);
        if !wait.is_zero() {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            continue;
        }
        stats.run_ms = ms(running_since.elapsed());
        // (Past `at`, the first attempt has just estimated it.)
        let send = estimate.unwrap_or_else(|| sup.send_estimate(ps.rss_bytes));
        tracing::info!(
            "step {}: checkpoint with {:.1} MB to store ({:.1} MB resident), {} ms before the deadline",
            a.step,
            send as f64 / 1e6,
            ps.rss_bytes as f64 / 1e6,
            until(a.deadline).as_millis()
        );
        match checkpoint(
            a,
            &sup,
            CostSample { rss_bytes: ps.rss_bytes, ms: 0.0, send_bytes: (send != ps.rss_bytes).then_some(send) },
            &mut history,
            &mut stats,
            Origin { image: restored_from.as_deref(), out_bytes: out_base, in_bytes: in_base },
            spec.wait_idle_ms,
        )? {
            Some(o) => break o,
            None => {
                // The checkpoint could not be taken or stored; the program runs on. Try again
                // while the deadline allows; the platform kills this step otherwise. Each
                // reason is told once.
                retries += 1;
                stats.checkpoint_retries = retries;
                let reason = stats.checkpoint_failure.clone().unwrap_or_default();
                if reason != told {
                    eprintln!("limitless: step {}: {reason}; the program runs on and the checkpoint is tried again", a.step);
                    platform.checkpoint_failed(&reason);
                    told = reason;
                }
                if until(a.deadline) < Duration::from_millis(300) {
                    sup.inner.kill();
                    let _ = sup.wait();
                    bail!(
                        "no checkpoint could be taken before the step's time limit ({}); the chain can be resumed from the last checkpoint",
                        stats.checkpoint_failure.as_deref().unwrap_or("no reason given")
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let result = match outcome {
        Outcome::Finished | Outcome::AlreadyFinished => read_result(store, &a.chain)?,
        _ => None,
    };
    stats.outcome = Some(outcome);
    stats.wall_ms = ms(t0.elapsed());
    let _ = store.put(&keys::stats(&a.chain, a.step, a.attempt), serde_json::to_string(&stats)?.as_bytes());
    platform.report(&stats);
    let mut next_activation = None;
    if outcome == Outcome::Checkpointed {
        failpoint::hit("step.handover");
        let id = platform
            .invoke(&a.chain, a.step + 1, 0)
            .map_err(|e| e.context(format!("could not invoke step {}; the chain can be resumed from its last checkpoint", a.step + 1)))?;
        next_activation = Some(id);
    }
    if outcome == Outcome::Checkpointed || outcome == Outcome::Superseded {
        let _ = sup.wait();
    }
    Ok(StepDone { outcome, result, next_activation })
}

/// The chain's result, if there is one.
pub fn read_result(store: &dyn Store, chain: &str) -> Result<Option<ResultRecord>> {
    match store.get(&keys::result(chain))? {
        Some(b) => Ok(Some(serde_json::from_slice(&b).context("the chain's result is unreadable")?)),
        None => Ok(None),
    }
}

/// The program ended in this step: store the result (first one wins).
fn finish(a: &StepArgs, store: &dyn Store, sup: &Supervisor, code: i32, stats: &mut StepStats) -> Result<Outcome> {
    let ps = sup.proc_stats();
    stats.cpu_ms = stats.cpu_ms.max(ps.cpu_ms);
    let r = ResultRecord {
        format: FORMAT,
        chain: a.chain.clone(),
        step: a.step,
        attempt: a.attempt,
        exit_status: code,
        last_line: String::from_utf8_lossy(&sup.inner.out.last_line()).into_owned(),
        finished_unix_ms: now_unix_ms(),
    };
    if store.put_if_absent(&keys::result(&a.chain), serde_json::to_string(&r)?.as_bytes())? {
        Ok(Outcome::Finished)
    } else {
        Ok(Outcome::AlreadyFinished)
    }
}

/// What a step started from.
struct Origin<'a> {
    /// The image it restored, if any.
    image: Option<&'a str>,
    /// The program's stdout and stderr bytes before the step (over the whole chain), if
    /// known.
    out_bytes: [Option<u64>; 2],
    /// The bytes of its stdin stream the program had been given before the step, if known.
    in_bytes: Option<u64>,
}

/// Checkpoints, stores and hands over. `Ok(None)`: not this time (the program runs on).
/// `cost` describes the program as the checkpoint starts (its time is measured here).
/// `from.image`, the image this step started from, is deleted once the next one is the
/// chain's latest.
fn checkpoint(
    a: &StepArgs,
    sup: &Supervisor,
    cost: CostSample,
    history: &mut Vec<CostSample>,
    stats: &mut StepStats,
    from: Origin,
    wait_idle_ms: u64,
) -> Result<Option<Outcome>> {
    let restored_from = from.image;
    let store = &*a.store;
    let next = a.step + 1;
    let image_key = keys::image(&a.chain, next, a.attempt);
    let t = Instant::now();
    let freeze_timeout =
        until(a.deadline).saturating_sub(Duration::from_millis(200)).clamp(Duration::from_millis(100), Duration::from_secs(10));
    let wait_idle = Duration::from_millis(wait_idle_ms);
    // (The caller tells why, once.)
    let store_failed = |stats: &mut StepStats, e: &anyhow::Error| {
        stats.checkpoint_failure = Some(format!("storing the checkpoint failed, the previous checkpoint is kept: {e:#}"));
    };
    // A store that takes a stream gets the image while it is written (no local copy);
    // otherwise it is written to a staging file and then stored.
    // The image the program was restored from is of use only if its dirty tracking
    // started there (not where the userfaultfd was refused).
    let tracked = sup.inner.tracked.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    let sink = match store.image_sink(&image_key, restored_from.filter(|_| tracked)) {
        Ok(s) => s,
        Err(e) => {
            store_failed(stats, &e);
            return Ok(None);
        }
    };
    let streamed = sink.is_some();
    let staging = if streamed { PathBuf::new() } else { store.staging_path("image")? };
    let req = Request { freeze_timeout, wait_idle, ..Request::new(staging.clone(), After::Hold) };
    let r = match sink {
        Some(sink) => sup.inner.checkpoint_to(&req, sink),
        None => sup.inner.checkpoint(&req),
    };
    let cs = match r {
        Ok(cs) => cs,
        Err(e) if streamed && e.downcast_ref::<WriteFailed>().is_some() => {
            store_failed(stats, &e);
            return Ok(None);
        }
        Err(e) => {
            stats.checkpoint_failure = Some(format!("{e:#}"));
            return Ok(None);
        }
    };
    stats.checkpoint_ms = Some(cs.total_ms);
    stats.image_bytes = Some(cs.image_bytes);
    let ts = Instant::now();
    let hash = cs.trailer_hash.clone();
    failpoint::hit("store.image");
    if streamed {
        stats.stored_bytes = cs.sent_bytes;
        stats.copied_bytes = Some(cs.copied_bytes);
    } else {
        match store.put_file(&image_key, &staging) {
            Ok(sent) => stats.stored_bytes = Some(sent),
            Err(e) => {
                store_failed(stats, &e);
                let _ = std::fs::remove_file(&staging);
                sup.inner.release(true);
                return Ok(None);
            }
        }
    }
    failpoint::hit("store.manifest");
    margin::remember(history, CostSample { ms: ms(t.elapsed()) + 20.0, ..cost });
    let m = Manifest {
        format: FORMAT,
        chain: a.chain.clone(),
        step: next,
        by_attempt: a.attempt,
        image: ImageRef { key: image_key.clone(), bytes: cs.image_bytes, trailer_hash: hash },
        created_unix_ms: now_unix_ms(),
        history: history.clone(),
        // The checkpoint drained the frozen program's stdout and stderr: all of it is counted.
        out_bytes: from.out_bytes[0].map(|b| b + sup.inner.out.bytes.load(std::sync::atomic::Ordering::SeqCst)),
        err_bytes: from.out_bytes[1].map(|b| b + sup.inner.err.bytes.load(std::sync::atomic::Ordering::SeqCst)),
        // The program's input is paused: what it was given is what it read, and what the
        // image carries unread.
        in_bytes: from.in_bytes.map(|b| b + sup.inner.input.fed()),
    };
    let won = match store.put_if_absent(&keys::manifest(&a.chain, next), serde_json::to_string(&m)?.as_bytes()) {
        Ok(w) => w,
        Err(e) => {
            stats.checkpoint_failure = Some(format!("storing the manifest of step {next} failed: {e:#}"));
            sup.inner.release(true);
            return Ok(None);
        }
    };
    stats.store_ms = Some(ms(ts.elapsed()));
    stats.frozen_ms = Some(cs.frozen_ms + ms(ts.elapsed()));
    // The program's state now lives in the store (or another attempt's does): stop it.
    sup.inner.release(false);
    if !won {
        // Another attempt of this step handed over first: ours is not needed.
        let _ = store.delete(&image_key);
        return Ok(Some(Outcome::Superseded));
    }
    if let Some(old) = restored_from {
        let _ = store.delete(old);
    }
    Ok(Some(Outcome::Checkpointed))
}
