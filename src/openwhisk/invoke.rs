//! Invoking the next step through the OpenWhisk REST API: a non-blocking invocation of the
//! same action, with HTTP Basic auth from the activation's API key, retried with backoff
//! on 429 (throttled) and 5xx, until a bound.

use crate::chain::step::Platform;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime};

/// The OpenWhisk side of a step.
pub struct OwPlatform {
    /// `__OW_API_HOST` (`http(s)://host:port`).
    pub api_host: String,
    /// The activation's API key (`uuid:key`).
    pub api_key: String,
    /// The action's namespace.
    pub namespace: String,
    /// `[package/]action`.
    pub action: String,
    /// Parameters every invocation of the chain carries (the store, when it came as a
    /// parameter rather than from the container's environment).
    pub carry: serde_json::Map<String, Value>,
    /// Give up invoking after this moment.
    pub give_up_at: SystemTime,
    /// Accept any TLS certificate (`LIMITLESS_OW_INSECURE=1`, as `wsk -i`).
    pub insecure: bool,
}

/// What the platform said about the invocation.
pub struct Invoked {
    /// The new activation's id.
    pub activation_id: String,
}

impl OwPlatform {
    fn url(&self) -> String {
        let enc = |s: &str| {
            s.split('/')
                .map(|c| c.replace('%', "%25").replace(' ', "%20").replace('?', "%3F").replace('#', "%23"))
                .collect::<Vec<_>>()
                .join("/")
        };
        format!(
            "{}/api/v1/namespaces/{}/actions/{}?blocking=false",
            self.api_host.trim_end_matches('/'),
            enc(&self.namespace),
            enc(&self.action)
        )
    }

    /// Invokes the action with `params`; returns the new activation's id.
    pub fn invoke_params(&self, params: &Value) -> Result<Invoked> {
        let (user, pass) = self.api_key.split_once(':').ok_or_else(|| anyhow!("the API key is not of the form uuid:key"))?;
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .danger_accept_invalid_certs(self.insecure)
            .build()
            .map_err(|e| anyhow!("cannot make an HTTP client: {e}"))?;
        let mut wait = Duration::from_millis(50);
        let started = Instant::now();
        // Stop retrying just before the deadline: the container is paused or removed then.
        let give_up = self.give_up_at - Duration::from_millis(100);
        loop {
            let r = client.post(self.url()).basic_auth(user, Some(pass)).json(params).send();
            let retry_because = match r {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp.text().unwrap_or_default();
                    if status.as_u16() == 202 || status.is_success() {
                        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let id = v["activationId"].as_str().map(str::to_owned).unwrap_or_default();
                        return Ok(Invoked { activation_id: id });
                    }
                    match status.as_u16() {
                        429 | 500..=599 => format!("HTTP {status}"),
                        401 | 403 => bail!(
                            "the OpenWhisk API refused the action's API key (HTTP {status}); create the action with `-a provide-api-key true`"
                        ),
                        404 => bail!("the OpenWhisk API does not know the action {}/{} (HTTP 404)", self.namespace, self.action),
                        413 => bail!("the OpenWhisk API refused the invocation as too large (HTTP 413)"),
                        _ => bail!("the OpenWhisk API answered HTTP {status} to the invocation: {}", body.chars().take(200).collect::<String>()),
                    }
                }
                Err(e) => format!("{}", e.without_url()),
            };
            let now = SystemTime::now();
            if now + wait >= give_up {
                bail!(
                    "could not invoke the next step at {} within {:.0} s (last: {retry_because}); the chain can be resumed with the parameter limitless_resume",
                    self.api_host,
                    started.elapsed().as_secs_f64()
                );
            }
            tracing::warn!("invoking the next step: {retry_because}; retrying in {:?}", wait);
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }
}

/// Time kept before the deadline for invoking the next step (retries on 429 and 5xx).
pub const HANDOVER_RESERVE: Duration = Duration::from_secs(1);

impl Platform for OwPlatform {
    fn handover_reserve(&self) -> Duration {
        HANDOVER_RESERVE
    }

    fn invoke(&self, chain: &str, step: u32, attempt: u32) -> Result<String> {
        let mut p = self.carry.clone();
        p.insert("limitless_chain".into(), json!(chain));
        p.insert("limitless_step".into(), json!(step));
        p.insert("limitless_attempt".into(), json!(attempt));
        Ok(self.invoke_params(&Value::Object(p))?.activation_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoke_url_follows_the_rest_api() {
        let p = OwPlatform {
            api_host: "https://ow.example:443/".into(),
            api_key: "u:k".into(),
            namespace: "guest".into(),
            action: "pkg/job".into(),
            carry: Default::default(),
            give_up_at: SystemTime::now(),
            insecure: false,
        };
        assert_eq!(p.url(), "https://ow.example:443/api/v1/namespaces/guest/actions/pkg/job?blocking=false");
    }
}
