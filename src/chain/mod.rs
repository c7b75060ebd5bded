//! The chain: a program run as a sequence of steps, each a fresh process with a time
//! limit, handing over through checkpoint images in a store.
//!
//! Store layout (one chain):
//!
//! ```text
//! chains/<chain>/spec                 what to run (created once)
//! chains/<chain>/claim-<n>.<attempt>  created once by the invocation that runs step n
//! chains/<chain>/step-<n>.manifest    the image step n restores (created once, by step n-1)
//! chains/<chain>/stats-<n>.<attempt>  what step n cost (for reports)
//! chains/<chain>/result               created once, by the step in which the program ended
//! images/<chain>/<n>.<attempt>.img    the image step n restores (written by that attempt of
//!                                     step n-1, so that two attempts never share a key)
//! ```
//!
//! Claims, manifests and the result are created only if absent, so a duplicate or late
//! invocation loses cleanly: a second invocation of a step sees its claim and runs nothing;
//! of two attempts that checkpoint the same step, one writes the manifest and the other
//! discards its image; the first result is the chain's result.

pub mod controller;
pub mod input;
pub mod margin;
pub mod output;
pub mod report;
pub mod step;

use serde::{Deserialize, Serialize};

/// Version of the chain records.
pub const FORMAT: u32 = 1;

/// Store keys of a chain.
pub mod keys {
    /// What to run.
    pub fn spec(chain: &str) -> String {
        format!("chains/{chain}/spec")
    }
    /// The claim of one attempt of a step.
    pub fn claim(chain: &str, step: u32, attempt: u32) -> String {
        format!("chains/{chain}/claim-{step}.{attempt}")
    }
    /// The manifest of the image step `step` restores.
    pub fn manifest(chain: &str, step: u32) -> String {
        format!("chains/{chain}/step-{step}.manifest")
    }
    /// What one attempt of a step cost.
    pub fn stats(chain: &str, step: u32, attempt: u32) -> String {
        format!("chains/{chain}/stats-{step}.{attempt}")
    }
    /// What a controller that was interrupted had printed of the program's stdout
    /// (`stream` "out") or stderr ("err") since the last checkpoint.
    pub fn printed(chain: &str, stream: &str) -> String {
        format!("chains/{chain}/printed-{stream}")
    }
    /// The chain's result.
    pub fn result(chain: &str) -> String {
        format!("chains/{chain}/result")
    }
    /// The image step `step` restores, as written by attempt `attempt` of the step before.
    pub fn image(chain: &str, step: u32, attempt: u32) -> String {
        format!("images/{chain}/{step}.{attempt}.img")
    }
}

/// What a chain runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Record format version (`FORMAT`).
    pub format: u32,
    /// The chain id.
    pub chain: String,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Where it starts.
    pub cwd: String,
    /// Each step's time limit.
    pub limit_ms: u64,
    /// The smallest time kept for checkpointing at the end of a step.
    pub margin_ms: u64,
    /// When the chain was created.
    pub created_unix_ms: u64,
    /// Environment the program starts with, besides the step process's own.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Directories every checkpoint carries (`--carry`).
    #[serde(default)]
    pub carry: Vec<String>,
    /// Every checkpoint carries the files open for writing (`--carry-written`).
    #[serde(default)]
    pub carry_written: bool,
    /// Wait up to this long for no connected TCP socket before each checkpoint.
    #[serde(default)]
    pub wait_idle_ms: u64,
}

/// One measured checkpoint, for predicting the next one.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct CostSample {
    /// Resident memory when the checkpoint started.
    pub rss_bytes: u64,
    /// Checkpoint plus store time.
    pub ms: f64,
    /// What the checkpoint had to read and store, estimated when it started: the resident
    /// memory, less memory not written since a tracked restore (whose chunks the store
    /// takes unread). Absent in manifests of earlier versions, meaning `rss_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_bytes: Option<u64>,
}

impl CostSample {
    /// The bytes this checkpoint had to read and store.
    pub fn send(&self) -> u64 {
        self.send_bytes.unwrap_or(self.rss_bytes)
    }
}

/// Where a step's image is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRef {
    /// Store key of the image.
    pub key: String,
    /// Image size.
    pub bytes: u64,
    /// The image's trailer hash, which covers every byte of it (hex).
    pub trailer_hash: String,
}

/// The handover from step n-1 to step n.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Record format version.
    pub format: u32,
    /// The chain id.
    pub chain: String,
    /// The step that restores this image.
    pub step: u32,
    /// The attempt of step n-1 that wrote it.
    pub by_attempt: u32,
    /// The image to restore.
    pub image: ImageRef,
    /// When the manifest was written.
    pub created_unix_ms: u64,
    /// Recent checkpoint costs, newest last.
    pub history: Vec<CostSample>,
    /// How many bytes the program had written to stdout, over the whole chain, when this
    /// checkpoint froze it: where the output of a step restored from it starts, so that
    /// output a killed attempt already printed is not printed again. Absent in manifests
    /// of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_bytes: Option<u64>,
    /// The same for stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err_bytes: Option<u64>,
    /// How many bytes of its stdin stream the program had been given, over the whole
    /// chain, when this checkpoint froze it (what it read, and what the image carries
    /// unread): where a step restored from it takes its input from. Absent in manifests
    /// of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_bytes: Option<u64>,
}

/// How a chain ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResultRecord {
    /// Record format version.
    pub format: u32,
    /// The chain id.
    pub chain: String,
    /// The step in which the program ended.
    pub step: u32,
    /// The attempt of that step.
    pub attempt: u32,
    /// The program's exit status (128+N for signal N).
    pub exit_status: i32,
    /// The last line the program wrote to stdout.
    pub last_line: String,
    /// When the program ended.
    pub finished_unix_ms: u64,
}

/// How a step ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The program was checkpointed and the next step invoked.
    Checkpointed,
    /// The program ended in this step; the result is stored.
    Finished,
    /// Another invocation had claimed this step; nothing ran.
    Duplicate,
    /// The chain had already ended; nothing ran.
    AlreadyFinished,
    /// Another attempt of this step handed over first; this one's image was discarded.
    Superseded,
}

/// What one step cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepStats {
    /// The step.
    pub step: u32,
    /// The attempt (0 first; a step that died is run again as the next attempt).
    pub attempt: u32,
    /// How it ended (none if it died).
    pub outcome: Option<Outcome>,
    /// From the step's start to its end.
    pub wall_ms: f64,
    /// Fetching, checking and restoring the image (steps after the first).
    pub restore_ms: Option<f64>,
    /// The program's CPU time in this step.
    pub cpu_ms: f64,
    /// The program's peak resident memory in this step.
    pub peak_rss_bytes: u64,
    /// How long the program ran in this step (between restore and checkpoint or end).
    pub run_ms: f64,
    /// Checkpoint, image durable.
    pub checkpoint_ms: Option<f64>,
    /// How long the program was frozen by the checkpoint.
    pub frozen_ms: Option<f64>,
    /// Storing the image and manifest.
    pub store_ms: Option<f64>,
    /// Size of the image it wrote.
    pub image_bytes: Option<u64>,
    /// Bytes sent to the store for that image (less than the image when the store already
    /// held some of its chunks).
    #[serde(default)]
    pub stored_bytes: Option<u64>,
    /// Bytes of that image's page data taken from the previous image unread, where dirty
    /// tracking found the memory unchanged since the restore (a store that can).
    #[serde(default)]
    pub copied_bytes: Option<u64>,
    /// Checkpoints that failed and were retried (a socket open at that moment, ...).
    pub checkpoint_retries: u32,
    /// Why the last of those failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_failure: Option<String>,
}

/// Milliseconds since the epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A new chain id: 16 hex digits from the kernel's random source.
pub fn new_chain_id() -> String {
    let mut b = [0u8; 8];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        b = (now_unix_ms() ^ ((std::process::id() as u64) << 40)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks a chain id given by a user (it becomes part of store keys).
pub fn valid_chain_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}
