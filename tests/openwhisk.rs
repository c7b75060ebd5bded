//! `limitless serve` as an OpenWhisk Docker-action runtime, against a test controller that
//! plays OpenWhisk's part: it serves the REST invoke endpoint (Basic auth, 202 with an
//! activation id, 429 when throttled, 401 on a wrong key), runs every activation in a fresh
//! `limitless serve` process (a fresh container), calls `/init` then `/run` with the JSON
//! the invoker sends, kills the process with SIGKILL at the action's time limit, and
//! records each activation's response and logs.

mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use warp::Filter;

const KEY: &str = "23bc46b1-71f6-4ed5-8c54-816aa4f8c502:123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP";
const ACTION: &str = "/guest/job";

struct Activation {
    id: String,
    params: Value,
}

/// What one activation did.
#[derive(Debug, Clone)]
struct Record {
    id: String,
    #[allow(dead_code)]
    params: Value,
    #[allow(dead_code)]
    status: Option<u16>,
    body: Option<Value>,
    /// The controller killed it at its time limit.
    timed_out: bool,
    stdout: String,
    stderr: String,
}

#[derive(Default)]
struct Api {
    queue: Mutex<VecDeque<Activation>>,
    arrived: Condvar,
    /// Answer this many invocations with 429 first.
    throttle: AtomicU32,
    throttled: AtomicU32,
    unauthorized: AtomicU32,
    /// The key the API accepts (another one gets 401).
    key: Mutex<String>,
    seq: AtomicU32,
}

struct FakeOpenWhisk {
    api: Arc<Api>,
    api_port: u16,
    user: User,
    dir: PathBuf,
    limit: Duration,
    /// Deliver this activation (by order, 1-based) twice.
    duplicate: Option<u32>,
    /// Put LIMITLESS_STORE in each container's environment (else a parameter carries it).
    store_in_env: bool,
    /// The action's default parameters, merged into every activation (as OpenWhisk does).
    defaults: serde_json::Map<String, Value>,
    /// Environment of every container (as the image's ENV).
    env: Vec<(&'static str, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl FakeOpenWhisk {
    fn start(user: User, name: &str, limit: Duration) -> FakeOpenWhisk {
        let api = Arc::new(Api::default());
        *api.key.lock().unwrap() = KEY.to_string();
        let api_port = free_port();
        let a = api.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let route = warp::path!("api" / "v1" / "namespaces" / String / "actions" / String)
                    .and(warp::post())
                    .and(warp::query::<std::collections::HashMap<String, String>>())
                    .and(warp::header::optional::<String>("authorization"))
                    .and(warp::body::json())
                    .map(
                        move |_ns: String,
                              _action: String,
                              q: std::collections::HashMap<String, String>,
                              auth: Option<String>,
                              params: Value| {
                            let want =
                                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(a.key.lock().unwrap().as_bytes()));
                            if auth.as_deref() != Some(want.as_str()) {
                                a.unauthorized.fetch_add(1, Ordering::SeqCst);
                                return warp::reply::with_status(
                                    warp::reply::json(&json!({"error": "The supplied authentication is invalid"})),
                                    warp::http::StatusCode::UNAUTHORIZED,
                                );
                            }
                            assert_eq!(q.get("blocking").map(String::as_str), Some("false"), "self-invocation must be non-blocking");
                            if a.throttle.load(Ordering::SeqCst) > 0 {
                                a.throttle.fetch_sub(1, Ordering::SeqCst);
                                a.throttled.fetch_add(1, Ordering::SeqCst);
                                return warp::reply::with_status(
                                    warp::reply::json(&json!({"error": "Too many requests in the last minute"})),
                                    warp::http::StatusCode::TOO_MANY_REQUESTS,
                                );
                            }
                            let n = a.seq.fetch_add(1, Ordering::SeqCst);
                            let id = format!("{:032x}", 0xabc0_0000u64 + n as u64);
                            a.queue.lock().unwrap().push_back(Activation { id: id.clone(), params });
                            a.arrived.notify_all();
                            warp::reply::with_status(warp::reply::json(&json!({"activationId": id})), warp::http::StatusCode::ACCEPTED)
                        },
                    );
                warp::serve(route).run(([127, 0, 0, 1], api_port)).await;
            });
        });
        // Wait for the API to listen.
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", api_port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "fake API did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        let dir = workdir(name, user);
        std::fs::create_dir_all(dir.join("store")).unwrap();
        let _ = std::fs::set_permissions(dir.join("store"), std::os::unix::fs::PermissionsExt::from_mode(0o777));
        FakeOpenWhisk {
            api,
            api_port,
            user,
            dir,
            limit,
            duplicate: None,
            store_in_env: true,
            defaults: Default::default(),
            env: Vec::new(),
        }
    }

    /// The user's `wsk action invoke job -p ...`.
    fn invoke(&self, params: Value) {
        let n = self.api.seq.fetch_add(1, Ordering::SeqCst);
        self.api.queue.lock().unwrap().push_back(Activation { id: format!("{:032x}", 0x1000 + n as u64), params });
        self.api.arrived.notify_all();
    }

    fn next_activation(&self, wait: Duration) -> Option<Activation> {
        let end = Instant::now() + wait;
        let mut q = self.api.queue.lock().unwrap();
        loop {
            if let Some(a) = q.pop_front() {
                return Some(a);
            }
            let now = Instant::now();
            if now >= end {
                return None;
            }
            q = self.api.arrived.wait_timeout(q, end - now).unwrap().0;
        }
    }

    /// Runs activations until none arrives for a while; returns what each did.
    fn run_all(&self, max: usize) -> Vec<Record> {
        let mut out = Vec::new();
        let mut n = 0u32;
        while let Some(a) = self.next_activation(Duration::from_secs(5)) {
            n += 1;
            let r = self.activate(&a);
            out.push(r);
            if self.duplicate == Some(n) {
                // The platform delivers the same activation again (a retry).
                out.push(self.activate(&Activation { id: format!("{}-again", a.id), params: a.params.clone() }));
            }
            assert!(out.len() <= max, "too many activations: {out:#?}");
        }
        out
    }

    /// One activation in a fresh container.
    fn activate(&self, a: &Activation) -> Record {
        let port = free_port();
        let mut c = command(self.user, limitless());
        c.args(["serve", "--port", &port.to_string(), "--action-dir"]).arg(self.dir.join("action"));
        c.env("__OW_API_HOST", format!("http://127.0.0.1:{}", self.api_port));
        if self.store_in_env {
            c.env("LIMITLESS_STORE", self.dir.join("store"));
        } else {
            c.env_remove("LIMITLESS_STORE");
        }
        c.env_remove("LIMITLESS_KEY");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.current_dir(&self.dir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child: Child = c.spawn().expect("start limitless serve");
        let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = so.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = se.read_to_string(&mut s);
            s
        });
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "limitless serve did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        let http = reqwest::blocking::Client::builder().timeout(self.limit + Duration::from_secs(5)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        // A plain --docker action: /init carries no code.
        let init = http
            .post(format!("{base}/init"))
            .json(&json!({"value": {"name": "job", "main": "main", "binary": false, "env": {}}}))
            .send()
            .expect("/init");
        assert_eq!(init.status().as_u16(), 200, "/init");
        let deadline = SystemTime::now() + self.limit;
        let deadline_ms = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis();
        let mut params = self.defaults.clone();
        if let Value::Object(m) = &a.params {
            params.extend(m.clone());
        }
        let body = json!({
            "value": params,
            "namespace": "guest",
            "action_name": ACTION,
            "action_version": "0.0.1",
            "activation_id": a.id,
            "transaction_id": format!("tid-{}", a.id),
            "deadline": deadline_ms.to_string(),
            "api_key": KEY,
        });
        // The invoker's time limit: when it passes, the container goes (docker rm -f).
        let pid = child.id() as i32;
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let limit = self.limit;
        let killer = std::thread::spawn(move || {
            let end = Instant::now() + limit;
            while Instant::now() < end {
                if d2.load(Ordering::SeqCst) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // SAFETY: kills the container process we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        });
        let resp = http.post(format!("{base}/run")).json(&body).send();
        done.store(true, Ordering::SeqCst);
        let timed_out = killer.join().unwrap();
        let (status, body) = match resp {
            Ok(r) => {
                let s = r.status().as_u16();
                (Some(s), r.json::<Value>().ok())
            }
            Err(_) => (None, None),
        };
        // The container is paused or removed after the activation.
        std::thread::sleep(Duration::from_millis(50));
        let _ = child.kill();
        let _ = child.wait();
        Record {
            id: a.id.clone(),
            params: a.params.clone(),
            status,
            body,
            timed_out,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }
}

/// The activations that returned the program's result (not a Limitless hand-over).
fn results(recs: &[Record]) -> Vec<&Record> {
    recs.iter().filter(|r| r.body.as_ref().is_some_and(|b| b.get("limitless").is_none() && b.get("error").is_none())).collect()
}

/// The program's output in an activation's stdout: everything before the sentinel.
fn program_stdout(r: &Record) -> String {
    r.stdout.split("XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX\n").next().unwrap_or("").to_string()
}

fn ticker_job(ow: &FakeOpenWhisk, ticks: &str) -> (Vec<Record>, String) {
    let prog = program("ticker");
    let want = reference(&prog, &[ticks], "");
    ow.invoke(json!({"bin": prog.to_str().unwrap(), "bin_args": [ticks]}));
    (ow.run_all(40), want)
}

fn check_job(recs: &[Record], want: &str) {
    assert!(recs.iter().all(|r| !r.timed_out), "an activation ran into its time limit: {recs:#?}");
    let res = results(recs);
    assert_eq!(res.len(), 1, "exactly one activation returns the result: {recs:#?}");
    let last = want.lines().last().unwrap();
    assert_eq!(res[0].body.as_ref().unwrap(), &json!({"output": last, "exit_status": 0}));
    let steps = recs.iter().filter(|r| r.body.as_ref().is_some_and(|b| b["limitless"]["outcome"] == "checkpointed")).count();
    assert!(steps >= 3, "a job of 4+ steps: {steps} hand-overs");
    // Logs: every activation ends its stdout and stderr with the sentinel.
    for r in recs {
        assert!(r.stdout.ends_with("XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX\n"), "stdout of {}: {:?}", r.id, r.stdout);
        assert!(r.stderr.ends_with("XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX\n"), "stderr of {}: {:?}", r.id, r.stderr);
    }
    let out: String = recs.iter().map(program_stdout).collect();
    assert_eq!(out, want, "the program's output, activation after activation");
    // Each hand-over names the activation it handed over to.
    for r in recs.iter().filter(|r| r.body.as_ref().is_some_and(|b| b["limitless"]["outcome"] == "checkpointed")) {
        let b = &r.body.as_ref().unwrap()["limitless"];
        assert_eq!(b["next_activation"].as_str().map(str::len), Some(32), "{b}");
    }
}

#[test]
fn a_job_runs_past_the_time_limit_in_fresh_containers() {
    for u in users() {
        let ow = FakeOpenWhisk::start(u, "ow-job", Duration::from_millis(1200));
        let (recs, want) = ticker_job(&ow, "400");
        check_job(&recs, &want);
    }
}

#[test]
fn a_throttled_self_invocation_is_retried() {
    let mut ow = FakeOpenWhisk::start(users()[0], "ow-throttle", Duration::from_millis(2500));
    ow.api.throttle.store(2, Ordering::SeqCst);
    ow.store_in_env = false;
    let prog = program("ticker");
    let want = reference(&prog, &["700"], "");
    // The store comes as a (default) parameter of the action this time.
    let store = ow.dir.join("store");
    ow.invoke(json!({"bin": prog.to_str().unwrap(), "bin_args": ["700"], "limitless_store": store.to_str().unwrap()}));
    let recs = ow.run_all(40);
    assert_eq!(ow.api.throttled.load(Ordering::SeqCst), 2, "the API answered 429 twice");
    check_job(&recs, &want);
}

#[test]
fn a_job_hands_over_through_an_s3_store_with_the_key_as_a_default_parameter() {
    let srv = common::s3::Server::start("ow");
    let mut ow = FakeOpenWhisk::start(users()[0], "ow-s3", Duration::from_millis(1500));
    ow.store_in_env = false;
    ow.env = srv.env();
    ow.defaults.insert("limitless_store".into(), json!("s3://bkt/ow"));
    ow.defaults.insert("limitless_key".into(), json!("ow-test-key-0123456789abcdef"));
    let (recs, want) = ticker_job(&ow, "500");
    check_job(&recs, &want);
    // The chain's objects are sealed, and the key is in none of them.
    let chains = srv.root.join("bkt/ow/chains");
    let chain = std::fs::read_dir(&chains).unwrap().next().expect("a chain in the bucket").unwrap().path();
    let spec = std::fs::read(chain.join("spec")).unwrap();
    assert!(spec.ends_with(b"LMAC"), "the spec is not sealed");
    assert!(!String::from_utf8_lossy(&spec).contains("ow-test-key"), "the key was written into the spec");
    // Without the key an activation fails with one clear error.
    let mut bare = FakeOpenWhisk::start(users()[0], "ow-s3-nokey", Duration::from_millis(1500));
    bare.store_in_env = false;
    bare.env = srv.env();
    bare.defaults.insert("limitless_store".into(), json!("s3://bkt/ow"));
    let (recs, _) = ticker_job(&bare, "500");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let err = recs[0].body.as_ref().and_then(|b| b["error"].as_str()).unwrap_or_default().to_string();
    assert!(err.contains("LIMITLESS_KEY"), "{recs:#?}");
}

#[test]
fn a_duplicate_activation_of_a_step_runs_nothing() {
    let mut ow = FakeOpenWhisk::start(users()[0], "ow-dup", Duration::from_millis(1200));
    ow.duplicate = Some(2);
    let (recs, want) = ticker_job(&ow, "400");
    let dups: Vec<&Record> = recs.iter().filter(|r| r.id.ends_with("-again")).collect();
    assert_eq!(dups.len(), 1);
    assert_eq!(dups[0].body.as_ref().unwrap()["limitless"]["outcome"], "duplicate", "{:?}", dups[0].body);
    assert_eq!(program_stdout(dups[0]), "", "the duplicate ran no program");
    let rest: Vec<Record> = recs.iter().filter(|r| !r.id.ends_with("-again")).cloned().collect();
    check_job(&rest, &want);
}

#[test]
fn a_wrong_api_key_fails_the_hand_over_clearly_and_the_chain_can_resume() {
    let ow = FakeOpenWhisk::start(users()[0], "ow-key", Duration::from_millis(1500));
    *ow.api.key.lock().unwrap() = "other:key".into();
    let prog = program("ticker");
    ow.invoke(json!({"bin": prog.to_str().unwrap(), "bin_args": ["400"]}));
    let recs = ow.run_all(5);
    assert_eq!(recs.len(), 1);
    let err = recs[0].body.as_ref().unwrap()["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("API key") && err.contains("provide-api-key"), "{err}");
    assert!(!err.contains(KEY.split(':').nth(1).unwrap()), "no credentials in results");
    assert!(!recs[0].stdout.contains("123zO3") && !recs[0].stderr.contains("123zO3"), "no credentials in logs");
    // The checkpoint is in the store: resuming with the right key finishes the job.
    *ow.api.key.lock().unwrap() = KEY.into();
    let chain =
        std::fs::read_dir(ow.dir.join("store/chains")).unwrap().flatten().next().unwrap().file_name().to_string_lossy().into_owned();
    ow.invoke(json!({"limitless_resume": chain}));
    let recs = ow.run_all(40);
    assert_eq!(results(&recs).len(), 1, "{recs:#?}");
}

/// One fresh container for protocol checks.
fn container(dir: &Path) -> (Child, String) {
    let port = free_port();
    let mut c = command(users()[0], limitless());
    c.args(["serve", "--port", &port.to_string(), "--action-dir"]).arg(dir.join("action")).env("LIMITLESS_STORE", dir.join("store"));
    let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, format!("http://127.0.0.1:{port}"))
}

#[test]
fn init_and_run_answer_like_the_standard_runtimes() {
    let d = workdir("ow-protocol", users()[0]);
    let (mut child, base) = container(&d);
    let http = reqwest::blocking::Client::new();
    let post = |path: &str, body: &str| {
        let r = http.post(format!("{base}{path}")).header("content-type", "application/json").body(body.to_string()).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap_or(Value::Null))
    };
    assert_eq!(post("/init", r#"{"value": {"name": "job", "main": "main", "binary": false}}"#).0, 200);
    assert_eq!(post("/init", r#"{"value": {}}"#), (403, json!({"error": "Cannot initialize the action more than once."})));
    let deadline = (SystemTime::now() + Duration::from_secs(5)).duration_since(UNIX_EPOCH).unwrap().as_millis().to_string();
    let run = |value: &str| {
        format!(
            r#"{{"value": {value}, "namespace": "guest", "action_name": "/guest/job", "activation_id": "a", "deadline": "{deadline}", "api_key": "x:y"}}"#
        )
    };
    let (s, b) = post("/run", "this is not json");
    assert!(s == 400 && b["error"].as_str().unwrap().contains("not JSON"), "{s} {b}");
    assert_eq!(post("/run", &run("42")), (404, json!({"error": "The action did not receive a dictionary or array as an argument."})));
    let (s, b) = post("/run", &run(r#"{"n": 1}"#));
    assert!(s == 502 && b["error"].as_str().unwrap().contains("bin"), "{s} {b}");
    // A program that ends within the activation answers with its result.
    let prog = program("exiter");
    let (s, b) = post("/run", &run(&format!(r#"{{"bin": "{}", "bin_args": ["3"]}}"#, prog.display())));
    assert_eq!((s, b), (200, json!({"output": "", "exit_status": 3})));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_zip_action_runs_its_exec_with_the_parameters() {
    let d = workdir("ow-zip", users()[0]);
    // A zip with a script `exec` that prints its JSON argument as the result.
    let mut zipped = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut zipped);
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
        z.start_file("exec", opts).unwrap();
        std::io::Write::write_all(&mut z, b"#!/bin/sh\necho \"log line\"\necho \"$1\"\n").unwrap();
        z.finish().unwrap();
    }
    let (mut child, base) = container(&d);
    let http = reqwest::blocking::Client::new();
    let code = base64::engine::general_purpose::STANDARD.encode(zipped.into_inner());
    let r = http
        .post(format!("{base}/init"))
        .json(&json!({"value": {"name": "job", "main": "main", "binary": true, "code": code}}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let deadline = (SystemTime::now() + Duration::from_secs(10)).duration_since(UNIX_EPOCH).unwrap().as_millis().to_string();
    let r = http
        .post(format!("{base}/run"))
        .json(&json!({"value": {"greeting": "hi"}, "namespace": "guest", "action_name": "/guest/job", "activation_id": "b", "deadline": deadline, "api_key": "x:y"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().unwrap(), json!({"greeting": "hi"}));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_failed_restore_answers_with_an_error_and_leaves_the_checkpoint_untouched() {
    let ow = FakeOpenWhisk::start(users()[0], "ow-restore-fail", Duration::from_millis(1200));
    let prog = program("ticker");
    ow.invoke(json!({"bin": prog.to_str().unwrap(), "bin_args": ["400"]}));
    let first = ow.next_activation(Duration::from_secs(5)).expect("the job's activation");
    let r = ow.activate(&first);
    assert_eq!(r.body.as_ref().unwrap()["limitless"]["outcome"], "checkpointed", "{:?}", r.body);
    // Damage the stored image (a byte in its page data), as a faulty disk would.
    let chain = r.body.as_ref().unwrap()["limitless"]["chain"].as_str().unwrap().to_string();
    let img = ow.dir.join(format!("store/images/{chain}/1.0.img"));
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&img, &bytes).unwrap();
    let manifest = std::fs::read(ow.dir.join(format!("store/chains/{chain}/step-1.manifest"))).unwrap();
    let next = ow.next_activation(Duration::from_secs(5)).expect("the hand-over");
    let r = ow.activate(&next);
    assert_eq!(r.status, Some(200), "an application error, not a developer error");
    let err = r.body.as_ref().unwrap()["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("restore failed") && err.contains("corrupt"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), bytes, "the stored image is untouched");
    assert_eq!(std::fs::read(ow.dir.join(format!("store/chains/{chain}/step-1.manifest"))).unwrap(), manifest);
    assert!(ow.next_activation(Duration::from_secs(2)).is_none(), "nothing is handed over after a failed restore");
}
