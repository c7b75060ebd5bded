//! Garbage collection: removes chains older than an age, and chunks no image names.
//!
//! A chain is old when none of its objects (spec, claims, manifests, stats, result,
//! images) was written for `older_than`: a chain that is still running writes a claim and
//! stats every step. A chunk is removed only when no image in the store names it *and* it
//! is older than `grace`, so that the chunks of an upload whose chunk list is not written
//! yet are kept (an upload takes far less than the grace period).

use super::{ObjectInfo, Store};
use anyhow::Result;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

/// What to collect.
#[derive(Clone, Debug)]
pub struct Options {
    /// Chains with nothing written for this long are removed.
    pub older_than: Duration,
    /// Unnamed chunks younger than this are kept.
    pub grace: Duration,
    /// Only report what would be removed.
    pub dry_run: bool,
}

/// What was (or would be) removed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Chains removed.
    pub chains: Vec<String>,
    /// Objects of those chains removed.
    pub chain_objects: u64,
    /// Chunks removed.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
    /// Chains kept.
    pub chains_kept: u64,
    /// Chunks kept.
    pub chunks_kept: u64,
}

fn age(now: SystemTime, o: &ObjectInfo) -> Duration {
    now.duration_since(o.modified).unwrap_or_default()
}

fn chain_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("chains/").or_else(|| key.strip_prefix("images/"))?;
    rest.split('/').next().filter(|c| !c.is_empty())
}

/// The shortest grace period: a checkpoint reuses a chunk it finds in the store only if
/// the chunk is younger than [`super::s3::REFRESH_AFTER`], so chunks younger than this
/// plus half an hour for the upload itself may be about to be named.
pub const MIN_GRACE: Duration = Duration::from_secs(60 * 60);

/// Collects garbage in `store`.
pub fn collect(store: &dyn Store, o: &Options) -> Result<Report> {
    collect_with(store, o, MIN_GRACE)
}

/// [`collect`] with another floor on the grace period (tests).
pub fn collect_with(store: &dyn Store, o: &Options, min_grace: Duration) -> Result<Report> {
    if o.grace < min_grace {
        anyhow::bail!(
            "--grace {} s is too short: checkpoints reuse chunks up to {} min old, so chunks younger than {} min may be about to be named; use --grace 1h or more",
            o.grace.as_secs(),
            super::s3::REFRESH_AFTER.as_secs() / 60,
            min_grace.as_secs() / 60
        );
    }
    let now = SystemTime::now();
    let mut r = Report::default();
    // Chains: their newest object decides.
    let mut chains: BTreeMap<String, (Duration, Vec<ObjectInfo>)> = BTreeMap::new();
    for obj in store.list_meta("chains/")?.into_iter().chain(store.list_meta("images/")?) {
        let Some(c) = chain_of(&obj.key) else { continue };
        let e = chains.entry(c.to_string()).or_insert((Duration::MAX, Vec::new()));
        e.0 = e.0.min(age(now, &obj));
        e.1.push(obj);
    }
    let mut live_images = Vec::new();
    for (chain, (youngest, objs)) in chains {
        if youngest >= o.older_than {
            r.chain_objects += objs.len() as u64;
            if !o.dry_run {
                // Manifests and the spec last, so that an interrupted gc leaves a chain that
                // still says what it is.
                let (late, early): (Vec<_>, Vec<_>) = objs.iter().partition(|x| x.key.ends_with(".manifest") || x.key.ends_with("/spec"));
                for x in early.into_iter().chain(late) {
                    store.delete(&x.key)?;
                }
            }
            r.chains.push(chain);
        } else {
            r.chains_kept += 1;
            live_images.extend(objs.into_iter().filter(|x| x.key.starts_with("images/")).map(|x| x.key));
        }
    }
    // Chunks: those no live image names.
    let chunks = store.list_meta("chunks/")?;
    if chunks.is_empty() {
        return Ok(r);
    }
    let mut named = HashSet::new();
    for k in &live_images {
        if let Some(cs) = store.chunks_of(k)? {
            named.extend(cs);
        }
    }
    for c in chunks {
        if named.contains(&c.key) || age(now, &c) < o.grace {
            r.chunks_kept += 1;
            continue;
        }
        if !o.dry_run {
            store.delete(&c.key)?;
        }
        r.chunks += 1;
        r.chunk_bytes += c.bytes;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn old_chains_go_and_young_ones_stay() {
        let d = std::env::temp_dir().join(format!("limitless-gc-test-{}", std::process::id()));
        let s = LocalStore::open(&d).unwrap();
        s.put("chains/old/spec", b"{}").unwrap();
        s.put("chains/old/step-1.manifest", b"{}").unwrap();
        let img = s.staging_path("img").unwrap();
        std::fs::write(&img, b"image").unwrap();
        s.put_file("images/old/1.0.img", &img).unwrap();
        // Age the old chain by a day.
        let day_ago = SystemTime::now() - Duration::from_secs(86_400);
        for k in ["chains/old/spec", "chains/old/step-1.manifest", "images/old/1.0.img"] {
            std::fs::File::options().write(true).open(d.join(k)).unwrap().set_modified(day_ago).unwrap();
        }
        s.put("chains/new/spec", b"{}").unwrap();
        let opts = Options { older_than: Duration::from_secs(3600), grace: Duration::from_secs(3600), dry_run: true };
        let r = collect(&s, &opts).unwrap();
        assert_eq!((r.chains.clone(), r.chain_objects, r.chains_kept), (vec!["old".to_string()], 3, 1));
        assert!(s.exists("chains/old/spec").unwrap(), "a dry run removed something");
        let r = collect(&s, &Options { dry_run: false, ..opts }).unwrap();
        assert_eq!(r.chains, vec!["old".to_string()]);
        assert!(!s.exists("chains/old/spec").unwrap() && !s.exists("images/old/1.0.img").unwrap());
        assert!(s.exists("chains/new/spec").unwrap());
        std::fs::remove_dir_all(d).unwrap();
    }
}
