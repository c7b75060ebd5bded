//! The OpenWhisk action protocol as Limitless speaks it: the `/init` and `/run` bodies, the
//! job an activation asks for, and the result shapes (see docs/openwhisk.md).

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Written on stdout and stderr after every activation.
pub const SENTINEL: &str = "XXX_THE_END_OF_A_WHISK_ACTIVATION_XXX";
/// The standard runtimes' answer to a second `/init`.
pub const REINIT_ERROR: &str = "Cannot initialize the action more than once.";
/// The standard runtimes' answer when `/init` yields no program.
pub const NO_BINARY_ERROR: &str = "The action failed to generate or locate a binary. See logs for details.";
/// The standard runtimes' answer when `value` is not an object or array.
pub const BAD_ARGS_ERROR: &str = "The action did not receive a dictionary or array as an argument.";
/// Parameters Limitless reads for itself (the rest go to the program).
pub const PARAM_PREFIX: &str = "limitless_";

/// The `value` of an `/init` body.
#[derive(Deserialize, Debug, Default)]
pub struct InitValue {
    /// The action's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Whether `code` is base64 (a zip archive or a binary).
    #[serde(default)]
    pub binary: bool,
    /// The entry point (unused: the program is an executable).
    #[serde(default)]
    pub main: Option<String>,
    /// The action's code; absent for a plain `--docker` action.
    #[serde(default)]
    pub code: Option<String>,
    /// Init-marked parameters and the first activation's `__OW_*` values.
    #[serde(default)]
    pub env: Option<Map<String, Value>>,
}

/// What an activation asks for.
#[derive(Debug, PartialEq)]
pub enum Job {
    /// Start a new chain running this program.
    Start {
        /// The program and its arguments.
        argv: Vec<String>,
    },
    /// Run a step of a chain.
    Continue {
        /// The chain id.
        chain: String,
        /// The step.
        step: u32,
        /// The attempt.
        attempt: u32,
    },
    /// Continue a chain from its last checkpoint, as a new attempt.
    Resume {
        /// The chain id.
        chain: String,
    },
}

/// Why an activation's parameters do not name a job.
#[derive(Debug, PartialEq)]
pub struct BadParams(pub String);

fn string_list(v: &Value) -> Result<Vec<String>, BadParams> {
    let arr = match v {
        Value::Array(a) => a.clone(),
        // The paper's interface passes bin_args as a JSON string: '["a", "b"]'.
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Array(a)) => a,
            _ => return Ok(s.split_whitespace().map(str::to_owned).collect()),
        },
        Value::Null => Vec::new(),
        _ => return Err(BadParams("bin_args must be an array of strings".into())),
    };
    arr.iter()
        .map(|x| match x {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(BadParams("bin_args must be an array of strings".into())),
        })
        .collect()
}

/// Reads the job from an activation's parameters. `exec` is the action's own executable
/// (a zip or binary action), if it has one: it runs with the parameters as JSON in
/// `argv[1]`, as in the standard Docker runtime.
pub fn job(params: &Value, exec: Option<&str>) -> Result<Job, BadParams> {
    let p = params.as_object();
    let get = |k: &str| p.and_then(|m| m.get(k));
    if let Some(c) = get("limitless_resume") {
        let chain = c.as_str().ok_or_else(|| BadParams("limitless_resume must be a chain id".into()))?;
        return Ok(Job::Resume { chain: chain.to_string() });
    }
    if let Some(c) = get("limitless_chain") {
        let chain = c.as_str().ok_or_else(|| BadParams("limitless_chain must be a string".into()))?.to_string();
        let num = |k: &str, dflt: Option<u32>| -> Result<u32, BadParams> {
            match get(k) {
                Some(v) => {
                    v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32).ok_or_else(|| BadParams(format!("{k} must be a number")))
                }
                None => dflt.ok_or_else(|| BadParams(format!("{k} is missing"))),
            }
        };
        return Ok(Job::Continue { chain, step: num("limitless_step", None)?, attempt: num("limitless_attempt", Some(0))? });
    }
    if let Some(bin) = get("bin") {
        let bin = bin.as_str().filter(|s| !s.is_empty()).ok_or_else(|| BadParams("bin must be the path of a program".into()))?;
        let mut argv = vec![bin.to_string()];
        if let Some(a) = get("bin_args") {
            argv.extend(string_list(a)?);
        }
        return Ok(Job::Start { argv });
    }
    match exec {
        Some(e) => Ok(Job::Start { argv: vec![e.to_string(), program_params(params).to_string()] }),
        None => Err(BadParams(
            "the action has no program to run: pass --param bin /path/to/program (and bin_args), or create the action from a zip or binary with an executable named exec".into(),
        )),
    }
}

/// The parameters without Limitless's own.
pub fn program_params(params: &Value) -> Value {
    match params {
        Value::Object(m) => {
            Value::Object(m.iter().filter(|(k, _)| !k.starts_with(PARAM_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        v => v.clone(),
    }
}

/// The result of the activation in which the program ended: its last stdout line if that is
/// a JSON object (or array), else an object with that line and the exit status.
pub fn program_result(last_line: &str, exit_status: i32) -> Value {
    match serde_json::from_str::<Value>(last_line.trim()) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => v,
        _ => json!({ "output": last_line, "exit_status": exit_status }),
    }
}

/// `__OW_<KEY>` variables for every key of the `/run` body except `value`.
pub fn ow_env(run: &Map<String, Value>) -> Vec<(String, String)> {
    run.iter()
        .filter(|(k, _)| k.as_str() != "value")
        .map(|(k, v)| (format!("__OW_{}", k.to_uppercase()), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
        .collect()
}

/// Splits `/namespace/[package/]action` into the namespace and the action path.
pub fn split_action_name(name: &str) -> Option<(String, String)> {
    let t = name.trim_start_matches('/');
    let (ns, rest) = t.split_once('/')?;
    if ns.is_empty() || rest.is_empty() || rest.split('/').count() > 2 {
        return None;
    }
    Some((ns.to_string(), rest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_from_parameters() {
        let p = json!({"bin": "/action/exec", "bin_args": ["1", "2"]});
        assert_eq!(job(&p, None), Ok(Job::Start { argv: vec!["/action/exec".into(), "1".into(), "2".into()] }));
        let p = json!({"bin": "/usr/bin/prog", "bin_args": "[\"a\", 3]"});
        assert_eq!(job(&p, None), Ok(Job::Start { argv: vec!["/usr/bin/prog".into(), "a".into(), "3".into()] }));
        let p = json!({"limitless_chain": "abc", "limitless_step": 3});
        assert_eq!(job(&p, None), Ok(Job::Continue { chain: "abc".into(), step: 3, attempt: 0 }));
        let p = json!({"limitless_resume": "abc"});
        assert_eq!(job(&p, None), Ok(Job::Resume { chain: "abc".into() }));
        let p = json!({"n": 5, "limitless_store": "/s"});
        assert_eq!(job(&p, Some("/action/exec")), Ok(Job::Start { argv: vec!["/action/exec".into(), "{\"n\":5}".into()] }));
        assert!(job(&json!({"n": 5}), None).unwrap_err().0.contains("no program"));
        assert!(job(&json!({"bin": 5}), None).is_err());
        assert!(job(&json!({"limitless_chain": "x"}), None).unwrap_err().0.contains("limitless_step"));
    }

    #[test]
    fn results_follow_the_docker_runtime() {
        assert_eq!(program_result("{\"n\": 1}", 0), json!({"n": 1}));
        assert_eq!(program_result("[1, 2]", 3), json!([1, 2]));
        assert_eq!(program_result("done", 2), json!({"output": "done", "exit_status": 2}));
        assert_eq!(program_result("", 0), json!({"output": "", "exit_status": 0}));
    }

    #[test]
    fn ow_env_and_action_names() {
        let run = json!({"value": {}, "api_key": "u:k", "deadline": "123", "activation_id": "a"});
        let mut e = ow_env(run.as_object().unwrap());
        e.sort();
        assert_eq!(
            e,
            vec![("__OW_ACTIVATION_ID".into(), "a".into()), ("__OW_API_KEY".into(), "u:k".into()), ("__OW_DEADLINE".into(), "123".into())]
        );
        assert_eq!(split_action_name("/guest/job"), Some(("guest".into(), "job".into())));
        assert_eq!(split_action_name("/guest/pkg/job"), Some(("guest".into(), "pkg/job".into())));
        assert_eq!(split_action_name("job"), None);
    }
}
