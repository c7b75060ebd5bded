//! A store in a local directory.
//!
//! Every object is written to a temporary file in `tmp/`, `fsync`ed, and then made
//! visible with `rename` (replace) or `link` (create-if-absent: `link` fails if the name
//! exists, atomically, so of two writers exactly one wins). The directory is `fsync`ed after
//! each change, so a visible object is a durable one.

use super::{check_key, ObjectInfo, Store};
use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory store.
pub struct LocalStore {
    root: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn sync_dir(d: &Path) {
    if let Ok(f) = File::open(d) {
        let _ = f.sync_all();
    }
}

impl LocalStore {
    /// Opens (creating if needed) the store at `root`, checking it can be written.
    pub fn open(root: &Path) -> Result<LocalStore> {
        let root = std::path::absolute(root).with_context(|| format!("bad store path {}", root.display()))?;
        fs::create_dir_all(root.join("tmp"))
            .map_err(|e| anyhow!("cannot use {} as a store: {e}; choose a writable directory with --store", root.display()))?;
        let probe = root.join("tmp").join(format!(".probe-{}", std::process::id()));
        File::create(&probe)
            .map_err(|e| anyhow!("cannot write to the store {}: {e}; choose a writable directory with --store", root.display()))?;
        let _ = fs::remove_file(&probe);
        Ok(LocalStore { root })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn temp(&self) -> PathBuf {
        self.root.join("tmp").join(format!(".{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)))
    }

    fn write_temp(&self, bytes: &[u8]) -> Result<PathBuf> {
        let t = self.temp();
        let mut f = File::create(&t).with_context(|| format!("cannot write in the store {}", self.root.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(t)
    }

    fn parent_of(&self, p: &Path) -> Result<PathBuf> {
        let d = p.parent().ok_or_else(|| anyhow!("bad store path"))?.to_path_buf();
        fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        Ok(d)
    }
}

impl Store for LocalStore {
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let dst = self.path(key)?;
        let dir = self.parent_of(&dst)?;
        let t = self.write_temp(bytes)?;
        let r = fs::hard_link(&t, &dst);
        let _ = fs::remove_file(&t);
        match r {
            Ok(()) => {
                sync_dir(&dir);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(anyhow!("cannot create {key} in the store {}: {e}", self.root.display())),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let dst = self.path(key)?;
        let dir = self.parent_of(&dst)?;
        let t = self.write_temp(bytes)?;
        fs::rename(&t, &dst).with_context(|| format!("cannot write {key} in the store {}", self.root.display()))?;
        sync_dir(&dir);
        Ok(())
    }

    fn put_file(&self, key: &str, src: &Path) -> Result<u64> {
        let dst = self.path(key)?;
        let dir = self.parent_of(&dst)?;
        let bytes = fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?.len();
        if fs::rename(src, &dst).is_err() {
            // Another file system: copy, sync, rename.
            let t = self.temp();
            fs::copy(src, &t).with_context(|| format!("cannot copy {} into the store", src.display()))?;
            File::open(&t)?.sync_all()?;
            fs::rename(&t, &dst)?;
            let _ = fs::remove_file(src);
        }
        sync_dir(&dir);
        Ok(bytes)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.path(key)?) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!("cannot read {key} from the store {}: {e}", self.root.display())),
        }
    }

    fn fetch_file(&self, key: &str) -> Result<Option<PathBuf>> {
        let p = self.path(key)?;
        Ok(p.exists().then_some(p))
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.path(key)?.exists())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let (dir, name_prefix) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let d = if dir.is_empty() { self.root.clone() } else { self.path(dir)? };
        let mut out = Vec::new();
        let rd = match fs::read_dir(&d) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => bail!("cannot list {} in the store: {e}", d.display()),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(name_prefix) && !name.starts_with('.') {
                out.push(if dir.is_empty() { name } else { format!("{dir}/{name}") });
            }
        }
        out.sort();
        Ok(out)
    }

    fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Walks the folders under the prefix's folder.
        let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let mut todo = vec![dir.to_string()];
        let mut out = Vec::new();
        while let Some(d) = todo.pop() {
            let p = if d.is_empty() { self.root.clone() } else { self.path(&d)? };
            let rd = match fs::read_dir(&p) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => bail!("cannot list {} in the store: {e}", p.display()),
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || (d.is_empty() && name == "tmp") {
                    continue;
                }
                let k = if d.is_empty() { name } else { format!("{d}/{name}") };
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    if k.starts_with(prefix) || prefix.starts_with(&format!("{k}/")) {
                        todo.push(k);
                    }
                } else if k.starts_with(prefix) {
                    out.push(ObjectInfo { key: k, modified: m.modified().unwrap_or(std::time::UNIX_EPOCH), bytes: m.len() });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!("cannot delete {key} from the store: {e}")),
        }
    }

    fn staging_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self.root.join("tmp").join(format!("{name}.{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (LocalStore, PathBuf) {
        let d = std::env::temp_dir().join(format!("limitless-store-test-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        (LocalStore::open(&d).unwrap(), d)
    }

    #[test]
    fn create_if_absent_has_one_winner() {
        let (s, d) = store();
        let s = std::sync::Arc::new(s);
        let wins: usize = (0..8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || s.put_if_absent("chains/x/result", format!("{i}").as_bytes()).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap() as usize)
            .sum();
        assert_eq!(wins, 1);
        let v = s.get("chains/x/result").unwrap().unwrap();
        assert_eq!(v.len(), 1);
        assert!(!s.put_if_absent("chains/x/result", b"again").unwrap());
        assert_eq!(s.get("chains/x/result").unwrap().unwrap(), v);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn objects_round_trip_and_list() {
        let (s, d) = store();
        s.put("chains/a/step-1.manifest", b"one").unwrap();
        s.put("chains/a/step-2.manifest", b"two").unwrap();
        s.put("chains/a/claim-1.0", b"c").unwrap();
        assert_eq!(s.list("chains/a/step-").unwrap(), vec!["chains/a/step-1.manifest", "chains/a/step-2.manifest"]);
        assert_eq!(s.get("chains/a/missing").unwrap(), None);
        let src = s.staging_path("img").unwrap();
        fs::write(&src, b"image").unwrap();
        s.put_file("images/a/2.img", &src).unwrap();
        assert!(!src.exists());
        assert_eq!(fs::read(s.fetch_file("images/a/2.img").unwrap().unwrap()).unwrap(), b"image");
        s.delete("images/a/2.img").unwrap();
        s.delete("images/a/2.img").unwrap();
        assert!(!s.exists("images/a/2.img").unwrap());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn unwritable_store_is_reported() {
        let e = LocalStore::open(Path::new("/proc/limitless-store")).err().unwrap().to_string();
        assert!(e.contains("cannot use") || e.contains("cannot write"), "{e}");
    }
}
