//! The `limitless` command line: thin wrappers over the library.

mod inspect;

use crate::engine::api::{self, ApiRequest};
use crate::engine::compress::Compress;
use crate::engine::supervisor::{find_program, Options, Supervisor};
use crate::engine::{restore, EXIT_ERROR};
use crate::util::{bytes, parse_duration};
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

const AFTER_HELP: &str = "\
Exit status of launch and restore: the program's own status (128+N if it was killed by
signal N); 75 after the program was checkpointed and stopped; 125 if limitless itself
failed (the message says why); 126 if the program cannot be executed; 127 if it is not found.

Environment: RUST_LOG sets the log level (default warn); LIMITLESS_CACHE_DIR sets where the
embedded agent and restorer are unpacked.";

/// Run any Linux program past a serverless time limit, by checkpointing and restoring it.
#[derive(Parser, Debug)]
#[command(name = "limitless", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run PROG past any time limit: as a chain of steps, each a fresh process killed at
    /// --limit, checkpointing before the limit and restoring in the next step.
    ///
    /// PROG's stdout and stderr stream through, across steps, in order; a step that dies
    /// and runs again from the last checkpoint does not print them twice. The exit status
    /// is PROG's; the last line on stderr summarises the chain. Checkpoints go to the store;
    /// if limitless itself is stopped (Ctrl-C keeps the chain), `--resume CHAIN` (or
    /// `--resume last`) continues the chain from its last complete checkpoint.
    ///
    /// PROG reads this command's stdin (a pipe, a file, or a terminal in the foreground)
    /// across steps, each byte once; a step that runs again gets the same bytes from its
    /// checkpoint. With --resume, stdin is taken as the same input from its start again: its
    /// bytes up to the checkpoint are skipped.
    Run {
        /// Each step's time limit, like a function's timeout (e.g. 60s, 5m, 1500ms).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        limit: Duration,
        /// The least time kept for the checkpoint at the end of a step; more is kept when
        /// what the checkpoint would store (the program's memory, or with an S3 store what
        /// it wrote since its restore) predicts a longer checkpoint.
        #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
        margin: Duration,
        /// Where checkpoints and chain state go: a directory, or s3://BUCKET/PREFIX (AWS_*
        /// settings and LIMITLESS_KEY from the environment; see docs/store.md) [default:
        /// ~/.local/share/limitless/store, or /tmp/limitless-UID/store].
        #[arg(long, value_name = "PATH|URL")]
        store: Option<String>,
        /// Write a JSON report (per step: wall and CPU time, peak memory, checkpoint,
        /// frozen and restore time, image size; and totals) to FILE.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Continue this chain (an id, or `last`) instead of starting one.
        #[arg(long, value_name = "CHAIN", conflicts_with = "prog")]
        resume: Option<String>,
        /// Keep the last checkpoint image in the store after the chain ends.
        #[arg(long)]
        keep_images: bool,
        /// Before each checkpoint, wait up to DURATION for a moment with no connected TCP
        /// socket (kept in the margin), so that a request in flight is not cut off.
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
        wait_idle: Duration,
        #[command(flatten)]
        carry: CarryArgs,
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, value_name = "PROG [ARGS]...", required_unless_present = "resume")]
        prog: Vec<OsString>,
    },
    /// Serve as an OpenWhisk Docker-action runtime: POST /init and POST /run on --port.
    ///
    /// Each /run runs one step of a chain: a new chain for `bin` (with `bin_args`) or the
    /// action's own `exec`, or the step named by `limitless_chain`/`limitless_step`. Before
    /// the activation's deadline it checkpoints the program into the store and invokes the
    /// action again through the REST API (`__OW_API_HOST`, the activation's api_key: create
    /// the action with `-a provide-api-key true`). The activation in which the program ends
    /// answers with its result: its last stdout line if that is JSON, else
    /// {"output": ..., "exit_status": N}. The store is $LIMITLESS_STORE or the action's
    /// `limitless_store` parameter. `limitless_resume: CHAIN` continues a chain whose step
    /// was lost.
    Serve {
        /// The port to listen on.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Where a zip or binary action is unpacked (its program is `exec` there).
        #[arg(long, value_name = "DIR", default_value = "/action")]
        action_dir: PathBuf,
        /// The least time kept for the checkpoint before the deadline.
        #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
        margin: Duration,
    },
    /// One step of a chain (started by `limitless run`; not for direct use).
    #[command(name = "__step", hide = true)]
    Step {
        #[arg(long)]
        store: String,
        #[arg(long)]
        chain: String,
        #[arg(long)]
        step: u32,
        #[arg(long)]
        attempt: u32,
        #[arg(long)]
        deadline_unix_ms: u64,
        #[arg(long)]
        margin_ms: u64,
    },
    /// Run PROG under the checkpoint engine, in the foreground.
    ///
    /// PROG's stdin, stdout and stderr pass through pipes that limitless owns, so that
    /// output is forwarded in order and nothing is lost at a checkpoint. Checkpoints are
    /// requested with `limitless dump` on the control socket.
    Launch {
        /// Control socket to listen on [default: $XDG_RUNTIME_DIR/limitless/PID.sock, or
        /// /tmp/limitless-UID/limitless/PID.sock, where PID is this limitless process].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[command(flatten)]
        carry: CarryArgs,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, value_name = "PROG [ARGS]...")]
        prog: Vec<OsString>,
    },
    /// Checkpoint a program run by `limitless launch` or `limitless restore`.
    ///
    /// IMAGE is complete and fsync'ed before this returns. Without --leave-running the
    /// program is stopped once the image is durable (its launch/restore exits with 75); with
    /// it, the program continues. If the checkpoint fails the program keeps running and
    /// no image is written.
    Dump {
        /// The control socket of the launch/restore to checkpoint.
        #[arg(long, value_name = "PATH", required_unless_present = "pid")]
        socket: Option<PathBuf>,
        /// Find the control socket at the default path of this limitless process id.
        #[arg(long, value_name = "PID", conflicts_with = "socket")]
        pid: Option<u32>,
        #[command(flatten)]
        what: DumpArgs,
    },
    /// Restore a program from IMAGE as a child of this process, and continue it.
    ///
    /// The program gets this process's stdin, stdout and stderr, and can be checkpointed
    /// again through the control socket. Exits with the program's exit status.
    Restore {
        /// Control socket to listen on [default: as for launch].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        #[command(flatten)]
        carry: CarryArgs,
        /// Track which memory the program writes from IMAGE on, so that a later
        /// `dump --parent IMAGE` skips the rest without reading it (userfaultfd
        /// write-protection, Linux 6.7+). Costs a minor fault at each page's first write
        /// (about 0.27 s per GiB written, measured here).
        #[arg(long)]
        track: bool,
        /// Map the image's page data into the program copy-on-write instead of copying it
        /// in: the restore reads and checks the data once, and the program copies a page
        /// only when it first writes to it. IMAGE must then stay unchanged (and not be
        /// truncated) while the program runs; deleting it is fine. Anonymous,
        /// non-executable memory only; see docs/engine.md.
        #[arg(long)]
        map: bool,
        /// The image to restore.
        image: PathBuf,
    },
    /// Show what an image holds: threads, memory areas, files, sizes, and the kernel and
    /// CPU it needs. Checks every checksum unless --no-verify.
    Inspect {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Skip checking the page data checksums (faster on large images).
        #[arg(long)]
        no_verify: bool,
        /// List every memory area too: addresses, protection, kind, file, bytes mapped and
        /// bytes stored (what makes an image as large as it is).
        #[arg(long)]
        areas: bool,
        /// The image.
        image: PathBuf,
    },
    /// Remove old chains and unused chunks from a store.
    ///
    /// A chain goes when nothing of it was written for --older-than (a running chain writes
    /// every step, so only finished or abandoned chains qualify); then, in an S3 store, every
    /// chunk that no remaining image names and that is older than --grace (so that the
    /// chunks of a checkpoint being uploaded right now stay).
    Gc {
        /// The store (a directory, file:///path or s3://bucket/prefix); default: the local
        /// default store.
        store: Option<String>,
        /// Remove chains with nothing written for this long (e.g. 7d, 12h, 30m).
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        older_than: Duration,
        /// Keep unnamed chunks younger than this (at least 1h: checkpoints reuse chunks up
        /// to 30 minutes old).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        grace: Duration,
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What checkpoints carry in the image besides the process.
#[derive(clap::Args, Debug, Default)]
struct CarryArgs {
    /// Carry this directory's files in every image and write them back at restore (for
    /// scratch space such as /tmp, which a fresh container does not have). It may not exist
    /// yet. Repeatable.
    #[arg(long, value_name = "DIR")]
    carry: Vec<PathBuf>,
    /// Also carry every regular file the program has open for writing.
    #[arg(long)]
    carry_written: bool,
}

impl CarryArgs {
    fn to_carry(&self) -> Result<crate::engine::carry::Carry, String> {
        let mut dirs = Vec::new();
        for d in &self.carry {
            let a = std::path::absolute(d).map_err(|e| format!("bad --carry {}: {e}", d.display()))?;
            if a.exists() && !a.is_dir() {
                return Err(format!("--carry {} is not a directory", d.display()));
            }
            dirs.push(a);
        }
        Ok(crate::engine::carry::Carry { dirs, written: self.carry_written })
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("limitless: {e}");
    EXIT_ERROR
}

/// Runs the command line; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_logging();
    match cli.command {
        Cmd::Run { limit, margin, store, report, resume, keep_images, wait_idle, carry, prog } => match carry.to_carry() {
            Ok(c) => run_cmd(limit, margin, store, report, resume, keep_images, wait_idle, c, prog),
            Err(e) => fail(e),
        },
        Cmd::Step { store, chain, step, attempt, deadline_unix_ms, margin_ms } => {
            step_cmd(store, chain, step, attempt, deadline_unix_ms, margin_ms)
        }
        Cmd::Launch { socket, carry, prog } => match carry.to_carry() {
            Ok(c) => launch(socket, c, prog),
            Err(e) => fail(e),
        },
        Cmd::Serve { port, action_dir, margin } => {
            match crate::openwhisk::server::serve(crate::openwhisk::server::ServeOptions { port, action_dir, margin }) {
                Ok(()) => 0,
                Err(e) => fail(format!("{e:#}")),
            }
        }
        Cmd::Dump { socket, pid, what } => dump(socket, pid, what),
        Cmd::Restore { socket, carry, track, map, image } => match carry.to_carry() {
            Ok(c) => restore_cmd(socket, c, track, map, image),
            Err(e) => fail(e),
        },
        Cmd::Inspect { json, no_verify, areas, image } => match inspect::run(&image, json, !no_verify, areas) {
            Ok(()) => 0,
            Err(e) => fail(format!("{e:#}")),
        },
        Cmd::Gc { store, older_than, grace, dry_run, json } => gc_cmd(store, older_than, grace, dry_run, json),
    }
}

fn gc_cmd(store: Option<String>, older_than: Duration, grace: Duration, dry_run: bool, json: bool) -> i32 {
    let url = store.unwrap_or_else(|| crate::store::default_location().display().to_string());
    let run = || -> anyhow::Result<()> {
        let st = crate::store::open(&url)?;
        let r = crate::store::gc::collect(&*st, &crate::store::gc::Options { older_than, grace, dry_run })?;
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{}: {verb} {} chains ({} objects) and {} chunks ({}); kept {} chains and {} chunks",
                st.describe(),
                r.chains.len(),
                r.chain_objects,
                r.chunks,
                bytes(r.chunk_bytes),
                r.chains_kept,
                r.chunks_kept
            );
        }
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(e) => fail(format!("{e:#}")),
    }
}

fn socket_or_default(s: Option<PathBuf>) -> PathBuf {
    s.unwrap_or_else(|| api::default_socket(std::process::id()))
}

fn launch(socket: Option<PathBuf>, carry: crate::engine::carry::Carry, prog: Vec<OsString>) -> i32 {
    let path = match find_program(std::path::Path::new(&prog[0])) {
        Ok(p) => p,
        Err((code, msg)) => {
            eprintln!("limitless: {msg}");
            return code;
        }
    };
    if let Err(why) = crate::engine::supervisor::check_dynamic(&path) {
        eprintln!("limitless: warning: {why}; it runs, but checkpoints will fail");
    }
    let opts = Options { socket: Some(socket_or_default(socket)), carry, track: false, map: false };
    match Supervisor::launch(&path, &prog[1..], &opts) {
        Ok(sup) => sup.wait().unwrap_or_else(fail),
        Err(e) => fail(format!("{e:#}")),
    }
}

/// What to checkpoint to (`limitless dump`).
#[derive(clap::Args, Debug)]
struct DumpArgs {
    /// Where to write the image: a file path (an existing file there is replaced once the
    /// new image is complete; a device, FIFO or directory is refused).
    #[arg(long, short, value_name = "IMAGE")]
    output: PathBuf,
    /// Keep the program running after the checkpoint.
    #[arg(long)]
    leave_running: bool,
    /// How long to wait for every thread to stop.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    freeze_timeout: Duration,
    /// Wait up to DURATION for a moment with no connected TCP socket before freezing, so
    /// that a request in flight is not cut off (connected sockets come back closed).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    wait_idle: Duration,
    /// Write a delta image: memory unchanged since the image PARENT (same pages, same
    /// contents) is referred to, not copied. Restoring it needs PARENT, and the images
    /// PARENT refers to, unchanged at their paths. If PARENT is the image this program's
    /// last --leave-running checkpoint wrote, unchanged memory is not even read (dirty-page
    /// tracking; LIMITLESS_TRACK=0 in the environment of launch/restore turns it off)
    #[arg(long, value_name = "PARENT")]
    parent: Option<PathBuf>,
    /// Compress memory with zstd where a sample shows it pays. `idle` (the default)
    /// compresses only while the disk falls behind the checkpoint (the image's data from
    /// 96 MiB ago not yet written): then it costs no time and makes the checkpoint faster;
    /// on a disk that keeps up, the image is stored raw. `all` compresses every record that
    /// pays, however long that takes. Compressed images restore more slowly. Also
    /// LIMITLESS_COMPRESS=1 or =all in the environment of launch/restore
    #[arg(long, value_enum, value_name = "WHEN", num_args = 0..=1, require_equals = true, default_missing_value = "idle")]
    compress: Option<Compress>,
    /// Store the program's and its libraries' pages in the image too (a few MiB more), so
    /// that it restores where those files are missing or different; without it they are
    /// mapped from the files again, which must be the same (size, time, ELF build-id).
    #[arg(long)]
    self_contained: bool,
    /// Store every changed page whole. By default a page that differs in few words from
    /// the file mapped there, or from zeros (library data, stacks, a sparse heap), is
    /// stored as those words, and a restore reads the rest from that file again. Also
    /// LIMITLESS_DIFF=0 in the environment of launch/restore
    #[arg(long)]
    whole_pages: bool,
}

fn dump(socket: Option<PathBuf>, pid: Option<u32>, what: DumpArgs) -> i32 {
    let DumpArgs { output, leave_running, freeze_timeout, wait_idle, parent, compress, self_contained, whole_pages } = what;
    let sock = match (socket, pid) {
        (Some(s), _) => s,
        (None, Some(p)) => api::default_socket(p),
        (None, None) => return fail("give --socket PATH or --pid PID"),
    };
    let output = match std::path::absolute(&output) {
        Ok(p) => p,
        Err(e) => return fail(format!("bad output path {}: {e}", output.display())),
    };
    let req = ApiRequest::Dump {
        output: output.clone(),
        leave_running,
        freeze_timeout_ms: Some(freeze_timeout.as_millis() as u64),
        wait_idle_ms: Some(wait_idle.as_millis() as u64),
        parent: match parent.map(|p| std::path::absolute(&p).map_err(|e| (p, e))).transpose() {
            Ok(p) => p,
            Err((p, e)) => return fail(format!("bad parent path {}: {e}", p.display())),
        },
        compress: compress.unwrap_or_default(),
        self_contained,
        whole_pages,
    };
    match api::request(&sock, &req) {
        Ok(r) if r.ok => {
            if let Some(s) = r.stats {
                if let Some(n) = &s.note {
                    eprintln!("limitless: {n}");
                }
                let mut delta =
                    if s.referenced_bytes > 0 { format!(", {} taken from the parent", bytes(s.referenced_bytes)) } else { String::new() };
                if s.unchanged_pages > 0 {
                    delta += &format!(" ({} found unchanged without reading it)", bytes(s.unchanged_pages * 4096));
                }
                if compress.is_some_and(|c| c != Compress::Off) {
                    delta += &format!(", {} of {} page records compressed", s.compressed_records, s.page_records);
                }
                eprintln!(
                    "limitless: checkpointed {} thread(s) to {} ({}{delta}) in {:.1} ms, program frozen {:.1} ms{}",
                    s.threads,
                    output.display(),
                    bytes(s.image_bytes),
                    s.total_ms,
                    s.frozen_ms,
                    match (s.left_running, s.snapshot) {
                        (true, true) => ", still running (snapshot)",
                        (true, false) => ", still running",
                        _ => ", stopped",
                    }
                );
            }
            0
        }
        Ok(r) => fail(r.error.unwrap_or_else(|| "the checkpoint failed".into())),
        Err(e) => fail(format!("{e:#}")),
    }
}

fn restore_cmd(socket: Option<PathBuf>, carry: crate::engine::carry::Carry, track: bool, map: bool, image: PathBuf) -> i32 {
    let opts = Options { socket: Some(socket_or_default(socket)), carry, track, map };
    match restore::restore(&image, &opts) {
        Ok((sup, stats)) => {
            tracing::info!("restored {} thread(s) in {:.1} ms ({} of page data)", stats.threads, stats.total_ms, bytes(stats.data_bytes));
            if track && !stats.tracked {
                eprintln!(
                    "limitless: warning: --track could not start dirty tracking (it needs userfaultfd write-protection, Linux 6.7+, \
                     and an image taken by this version); a delta on top of {} will read all memory",
                    image.display()
                );
            }
            sup.wait().unwrap_or_else(fail)
        }
        Err(e) => fail(format!("{e:#}")),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_cmd(
    limit: Duration,
    margin: Duration,
    store: Option<String>,
    report: Option<PathBuf>,
    resume: Option<String>,
    keep_images: bool,
    wait_idle: Duration,
    carry: crate::engine::carry::Carry,
    prog: Vec<OsString>,
) -> i32 {
    use crate::chain::controller::{self, RunOptions, MIN_LIMIT};
    if limit < MIN_LIMIT {
        return fail(format!(
            "--limit {} is too short: a step needs time to start, run and checkpoint; use at least {}s",
            crate::util::human_duration(limit),
            MIN_LIMIT.as_secs()
        ));
    }
    if margin * 2 >= limit {
        return fail(format!(
            "--margin {} leaves no time to run within --limit {}; use a margin below half the limit",
            crate::util::human_duration(margin),
            crate::util::human_duration(limit)
        ));
    }
    if resume.is_none() {
        match find_program(std::path::Path::new(&prog[0])) {
            Err((code, msg)) => {
                eprintln!("limitless: {msg}");
                return code;
            }
            Ok(p) => {
                if let Err(why) = crate::engine::supervisor::check_dynamic(&p) {
                    return fail(format!("{why}; limitless run needs a dynamically linked program"));
                }
            }
        }
    }
    let url = store.unwrap_or_else(|| crate::store::default_location().display().to_string());
    let st = match crate::store::open(&url) {
        Ok(s) => s,
        Err(e) => return fail(format!("{e:#}")),
    };
    let url = st.describe();
    let progress = controller::is_terminal(&std::io::stderr());
    let opts = RunOptions { store: st, store_url: url, limit, margin, report, progress, keep_images, carry, wait_idle };
    let r = match resume {
        Some(c) => controller::resume(&c, &opts),
        None => controller::run_new(&prog, &opts),
    };
    r.unwrap_or_else(|e| fail(format!("{e:#}")))
}

fn step_cmd(store: String, chain: String, step: u32, attempt: u32, deadline_unix_ms: u64, margin_ms: u64) -> i32 {
    use crate::chain::step::{run_step, StepArgs};
    let run = || -> anyhow::Result<i32> {
        let link = crate::chain::controller::LocalLink::from_fd3()?;
        crate::chain::controller::messages_from_fd4()?;
        if !crate::chain::valid_chain_id(&chain) {
            anyhow::bail!("bad chain id `{chain}`");
        }
        let a = StepArgs {
            store: crate::store::open(&store)?,
            chain,
            step,
            attempt,
            deadline: std::time::UNIX_EPOCH + Duration::from_millis(deadline_unix_ms),
            margin_floor: Duration::from_millis(margin_ms),
            extra_env: Vec::new(),
        };
        let done = run_step(&a, &link)?;
        tracing::info!("step {step} attempt {attempt}: {:?}", done.outcome);
        Ok(0)
    };
    run().unwrap_or_else(|e| {
        eprintln!("limitless: step {step}: {e:#}");
        EXIT_ERROR
    })
}
