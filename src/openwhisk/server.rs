//! `limitless serve`: the Docker-action runtime. `POST /init` prepares the action (a zip or
//! binary is unpacked into the action directory; a plain `--docker` action has no code);
//! `POST /run` runs one step of a chain (a new chain, or the one named in the parameters)
//! until the activation's deadline minus the predicted margin, then hands over to a new
//! activation of the same action through the REST API. The activation in which the
//! program ends answers with its result.

use super::invoke::OwPlatform;
use super::protocol::*;
use crate::chain::step::{run_step, StepArgs, StepDone};
use crate::chain::{keys, new_chain_id, now_unix_ms, Outcome, Spec, FORMAT};
use crate::store::Store;
use anyhow::{anyhow, Context, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use warp::http::StatusCode;
use warp::Filter;

/// How `serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The port (OpenWhisk uses 8080).
    pub port: u16,
    /// Where a zip or binary action is unpacked; its `exec` is the program.
    pub action_dir: PathBuf,
    /// The margin floor for checkpoints.
    pub margin: Duration,
}

struct State {
    opts: ServeOptions,
    initialized: bool,
    /// Init-marked parameters (environment of the program).
    init_env: Vec<(String, String)>,
}

type Shared = Arc<Mutex<State>>;

fn reply(status: StatusCode, body: Value) -> warp::reply::WithStatus<warp::reply::Json> {
    warp::reply::with_status(warp::reply::json(&body), status)
}

/// Ends an activation's logs, as the invoker expects.
fn sentinels() {
    let _ = writeln!(std::io::stdout(), "{SENTINEL}");
    let _ = std::io::stdout().flush();
    let _ = writeln!(std::io::stderr(), "{SENTINEL}");
    let _ = std::io::stderr().flush();
}

/// Runs the server until the process is killed.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the runtime")?;
    rt.block_on(async move {
        let port = opts.port;
        let state: Shared = Arc::new(Mutex::new(State { opts, initialized: false, init_env: Vec::new() }));
        let s1 = state.clone();
        let init = warp::path("init")
            .and(warp::path::end())
            .and(warp::post())
            .and(warp::body::bytes())
            .map(move |b: bytes::Bytes| handle_init(&s1, &b));
        let s2 = state.clone();
        // One activation at a time: the invoker sends one per container; a second concurrent
        // one waits for the first.
        let run_lock = Arc::new(tokio::sync::Mutex::new(()));
        let run = warp::path("run").and(warp::path::end()).and(warp::post()).and(warp::body::bytes()).then(move |b: bytes::Bytes| {
            let (s, l) = (s2.clone(), run_lock.clone());
            async move {
                let _g = l.lock().await;
                let (tx, rx) = tokio::sync::oneshot::channel();
                // A plain thread: the step blocks, and invokes the next step with a blocking
                // HTTP client, which must not run inside the async runtime.
                std::thread::spawn(move || {
                    let _ = tx.send(handle_run(&s, &b));
                });
                let (status, body) = rx.await.unwrap_or((StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "the step thread failed"})));
                sentinels();
                reply(status, body)
            }
        });
        let routes = init.or(run);
        tracing::info!("listening on port {port}");
        warp::serve(routes).run(([0, 0, 0, 0], port)).await;
    });
    Ok(())
}

fn handle_init(state: &Shared, body: &[u8]) -> warp::reply::WithStatus<warp::reply::Json> {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let allow_reinit = std::env::var("PROXY_ALLOW_REINIT").as_deref() == Ok("1");
    if st.initialized && !allow_reinit {
        eprintln!("{REINIT_ERROR}");
        return reply(StatusCode::FORBIDDEN, json!({"error": REINIT_ERROR}));
    }
    let msg: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            sentinels();
            return reply(StatusCode::BAD_REQUEST, json!({"error": format!("the /init body is not JSON: {e}")}));
        }
    };
    let value: InitValue = match msg.get("value").cloned().map(serde_json::from_value).unwrap_or(Ok(InitValue::default())) {
        Ok(v) => v,
        Err(e) => {
            sentinels();
            return reply(StatusCode::NOT_FOUND, json!({"error": format!("the /init value is not an object: {e}")}));
        }
    };
    if let Some(code) = &value.code {
        if let Err(e) = install_code(&st.opts.action_dir, code, value.binary) {
            eprintln!("limitless: /init: {e:#}");
            sentinels();
            return reply(StatusCode::BAD_GATEWAY, json!({"error": NO_BINARY_ERROR}));
        }
    }
    st.init_env = value
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
        .collect();
    st.initialized = true;
    warp::reply::with_status(warp::reply::json(&"OK"), StatusCode::OK)
}

/// Writes the action's code into `dir`: a base64 zip is unpacked, a base64 binary or a
/// text script becomes `exec`; `exec` must end up executable.
fn install_code(dir: &Path, code: &str, binary: bool) -> Result<()> {
    use base64::Engine;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let exec = dir.join("exec");
    if binary {
        let bytes = base64::engine::general_purpose::STANDARD.decode(code.trim()).context("the code is not base64")?;
        if bytes.starts_with(b"PK\x03\x04") {
            zip::ZipArchive::new(std::io::Cursor::new(bytes))?.extract(dir).context("cannot unpack the zip")?;
        } else {
            std::fs::write(&exec, bytes)?;
        }
    } else {
        std::fs::write(&exec, code)?;
    }
    let md = std::fs::metadata(&exec).map_err(|_| anyhow!("the action has no file named exec"))?;
    std::fs::set_permissions(&exec, std::fs::Permissions::from_mode(md.permissions().mode() | 0o755))?;
    Ok(())
}

fn handle_run(state: &Shared, body: &[u8]) -> (StatusCode, Value) {
    let (opts, init_env) = {
        let st = state.lock().unwrap_or_else(|e| e.into_inner());
        (st.opts.clone(), st.init_env.clone())
    };
    let msg: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return (StatusCode::NOT_FOUND, json!({"error": BAD_ARGS_ERROR})),
        Err(e) => return (StatusCode::BAD_REQUEST, json!({"error": format!("the /run body is not JSON: {e}")})),
    };
    let params = msg.get("value").cloned().unwrap_or(Value::Object(Map::new()));
    if !(params.is_object() || params.is_array()) {
        return (StatusCode::NOT_FOUND, json!({"error": BAD_ARGS_ERROR}));
    }
    let exec = opts.action_dir.join("exec");
    let exec = exec.is_file().then(|| exec.display().to_string());
    let job = match job(&params, exec.as_deref()) {
        Ok(j) => j,
        Err(BadParams(m)) => return (StatusCode::BAD_GATEWAY, json!({"error": m})),
    };
    match run_job(&opts, &init_env, &msg, &params, job) {
        Ok(v) => (StatusCode::OK, v),
        Err(e) => {
            eprintln!("limitless: {e:#}");
            (StatusCode::OK, json!({"error": format!("{e:#}")}))
        }
    }
}

fn param_str<'a>(params: &'a Value, k: &str) -> Option<&'a str> {
    params.get(k).and_then(Value::as_str)
}

fn run_job(opts: &ServeOptions, init_env: &[(String, String)], msg: &Map<String, Value>, params: &Value, job: Job) -> Result<Value> {
    // The store: the container's environment, or a (default) parameter of the action.
    let mut carry = Map::new();
    let store_url = match std::env::var("LIMITLESS_STORE").ok().filter(|s| !s.is_empty()) {
        Some(s) => s,
        None => {
            let s = param_str(params, "limitless_store").ok_or_else(|| {
                anyhow!("no store: set LIMITLESS_STORE in the container or give the action a limitless_store default parameter")
            })?;
            carry.insert("limitless_store".into(), json!(s));
            s.to_string()
        }
    };
    // The MAC key: the container's LIMITLESS_KEY, an init parameter LIMITLESS_KEY, or the
    // action's limitless_key default parameter (merged into every invocation by OpenWhisk,
    // so it is never passed on).
    let init_key = init_env.iter().find(|(k, _)| k == "LIMITLESS_KEY").map(|(_, v)| v.as_str());
    let key = match (crate::store::seal::Sealer::from_env()?, init_key.or_else(|| param_str(params, "limitless_key"))) {
        (Some(k), _) => Some(k),
        (None, Some(k)) if !k.is_empty() => Some(crate::store::seal::Sealer::new(k.as_bytes())?),
        _ => None,
    };
    // S3 settings may also come as init parameters (AWS_ENDPOINT_URL, ...).
    let store: Arc<dyn Store> = crate::store::open_with(&store_url, key, init_env)?;
    let deadline_ms: u64 = msg
        .get("deadline")
        .and_then(|d| d.as_str().map(str::to_owned).or_else(|| d.as_u64().map(|n| n.to_string())))
        .ok_or_else(|| anyhow!("the /run body has no deadline"))?
        .parse()
        .context("the deadline is not a number of milliseconds")?;
    let deadline = UNIX_EPOCH + Duration::from_millis(deadline_ms);
    let api_host = std::env::var("__OW_API_HOST").unwrap_or_default();
    let api_key = msg.get("api_key").and_then(Value::as_str).unwrap_or_default().to_string();
    let action_name = msg.get("action_name").and_then(Value::as_str).unwrap_or_default();
    let (namespace, action) =
        split_action_name(action_name).ok_or_else(|| anyhow!("the /run body has no usable action_name (`{action_name}`)"))?;
    let ow_env = ow_env(msg);
    let (chain, step, attempt) = match job {
        Job::Start { argv } => {
            let chain = new_chain_id();
            let cwd = if opts.action_dir.is_dir() { opts.action_dir.display().to_string() } else { "/".into() };
            // The API key stays out of the store; the first attempt gets it in its environment.
            // Secrets (the store's key and credentials) stay out of the store too.
            let secret = |k: &str| ["__OW_API_KEY", "LIMITLESS_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"].contains(&k);
            let env: Vec<(String, String)> = init_env.iter().chain(ow_env.iter()).filter(|(k, _)| !secret(k)).cloned().collect();
            let carry = crate::engine::carry::Carry::from_env();
            let spec = Spec {
                format: FORMAT,
                chain: chain.clone(),
                argv,
                cwd,
                limit_ms: 0,
                margin_ms: opts.margin.as_millis() as u64,
                created_unix_ms: now_unix_ms(),
                env,
                carry: carry.dirs.iter().map(|d| d.display().to_string()).collect(),
                carry_written: carry.written,
                wait_idle_ms: std::env::var("LIMITLESS_WAIT_IDLE")
                    .ok()
                    .and_then(|v| crate::util::parse_duration(&v).ok())
                    .map_or(0, |d| d.as_millis() as u64),
            };
            if !store.put_if_absent(&keys::spec(&chain), serde_json::to_string(&spec)?.as_bytes())? {
                anyhow::bail!("chain id {chain} is taken");
            }
            (chain, 0, 0)
        }
        Job::Continue { chain, step, attempt } => (chain, step, attempt),
        Job::Resume { chain } => {
            let step = crate::chain::controller::last_manifest(&*store, &chain)?;
            let attempt = crate::chain::controller::next_attempt(&*store, &chain, step)?;
            (chain, step, attempt)
        }
    };
    if !crate::chain::valid_chain_id(&chain) {
        anyhow::bail!("`{chain}` is not a chain id");
    }
    let platform = OwPlatform {
        api_host: api_host.clone(),
        api_key: api_key.clone(),
        namespace,
        action,
        carry,
        give_up_at: deadline,
        insecure: std::env::var("LIMITLESS_OW_INSECURE").as_deref() == Ok("1"),
    };
    if api_host.is_empty() || api_key.is_empty() {
        tracing::warn!("no __OW_API_HOST or api_key: this activation can run its step but not invoke the next one");
    }
    let extra_env: Vec<(String, String)> = ow_env.into_iter().filter(|(k, _)| k == "__OW_API_KEY").collect();
    let a = StepArgs { store, chain: chain.clone(), step, attempt, deadline, margin_floor: opts.margin, extra_env };
    let done: StepDone = run_step(&a, &platform)?;
    let base = json!({"chain": chain, "step": step, "attempt": attempt});
    Ok(match done.outcome {
        Outcome::Finished => match done.result {
            Some(r) => program_result(&r.last_line, r.exit_status),
            None => json!({"limitless": base}),
        },
        Outcome::AlreadyFinished => {
            let mut b = base;
            b["outcome"] = json!("already_finished");
            if let Some(r) = done.result {
                b["exit_status"] = json!(r.exit_status);
            }
            json!({ "limitless": b })
        }
        o => {
            let mut b = base;
            b["outcome"] = serde_json::to_value(o)?;
            if o == Outcome::Checkpointed {
                b["next_step"] = json!(step + 1);
                b["next_activation"] = json!(done.next_activation);
            }
            json!({ "limitless": b })
        }
    })
}
