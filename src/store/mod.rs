//! Where chains keep their state between steps: a key-value store of immutable objects.
//!
//! Keys are relative paths such as `chains/<chain>/step-3.manifest`. Writes that decide
//! the chain (claims, manifests, results) use [`Store::put_if_absent`], which creates an
//! object only if there is none yet, atomically; everything else is written whole and
//! then made visible, so a reader never sees half an object. The local-directory store
//! is here; an S3 store will implement the same trait.

pub mod gc;
mod local;
pub mod s3;
pub mod seal;

pub use local::LocalStore;
pub use s3::S3Store;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// One object, as listed.
#[derive(Clone, Debug)]
pub struct ObjectInfo {
    /// Its key.
    pub key: String,
    /// When it was last written.
    pub modified: SystemTime,
    /// Its size in the store.
    pub bytes: u64,
}

/// Where an image in a store can be read.
pub enum ImageAt {
    /// There is no image at that key.
    Missing,
    /// In a local file.
    File(PathBuf),
    /// Through a reader that fetches its parts as they are read.
    Stream(Box<dyn limitless_image::file::Source>),
}

/// A store of objects.
pub trait Store: Send + Sync {
    /// Creates `key` with `bytes` if it does not exist; returns whether it did the write.
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<bool>;
    /// Writes `key` (replacing it), atomically.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Moves or copies the local file `src` to `key`, atomically; `src` is gone after.
    /// Returns how many bytes it sent to the store (less than the file when the store
    /// already had parts of it).
    fn put_file(&self, key: &str, src: &Path) -> Result<u64>;
    /// Reads `key`; `None` if it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// A local file with the contents of `key` (the object itself for a local store).
    fn fetch_file(&self, key: &str) -> Result<Option<PathBuf>>;
    /// Whether `key` exists.
    fn exists(&self, key: &str) -> Result<bool>;
    /// Keys that start with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    /// Objects whose keys start with `prefix`, with their times and sizes.
    fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Removes `key` (no error if it is gone).
    fn delete(&self, key: &str) -> Result<()>;
    /// A local path where a new large object can be written before `put_file` (on the same
    /// file system for a local store, so that `put_file` is a rename).
    fn staging_path(&self, name: &str) -> Result<PathBuf>;
    /// The store's URL or path, for messages.
    fn describe(&self) -> String;
    /// The chunk objects the image at `key` is made of, for stores that split images
    /// (`None` when this store keeps images whole or there is no such image).
    fn chunks_of(&self, _key: &str) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
    /// A sink that stores an image at `key` while the engine writes it, with no local
    /// copy, for a store that can (`None`: write a file at `staging_path`, then `put_file`).
    /// With `parent` (an image in this store that the program was restored from, or last
    /// checkpointed to), memory that dirty tracking finds unchanged since is taken from
    /// that image's chunks, for a store that can.
    fn image_sink(&self, _key: &str, _parent: Option<&str>) -> Result<Option<Box<dyn crate::engine::checkpoint::ImageSink + '_>>> {
        Ok(None)
    }
    /// Whether [`image_sink`](Self::image_sink) takes unchanged memory from a parent: only
    /// then is it worth restoring a program with dirty tracking armed.
    fn takes_unchanged(&self) -> bool {
        false
    }
    /// The image at `key`, as a local file or, for a store that can, a reader that fetches
    /// its parts as they are read (so that a restore needs no local copy).
    fn open_image(&self, key: &str) -> Result<ImageAt> {
        Ok(match self.fetch_file(key)? {
            Some(p) => ImageAt::File(p),
            None => ImageAt::Missing,
        })
    }
}

/// What an image in a store is called in messages, and as the identity dirty tracking
/// starts from (a restore from it, a checkpoint to it) and a later checkpoint names as its
/// parent.
pub fn image_name(store: &(impl Store + ?Sized), key: &str) -> String {
    format!("{key} in {}", store.describe())
}

/// Checks that `key` is a relative path without `..`.
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.starts_with('/') || key.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("bad store key `{key}`");
    }
    Ok(())
}

/// Opens the store at `url`: a directory path, a `file://` URL or `s3://bucket/prefix`,
/// with the MAC key from `LIMITLESS_KEY`.
pub fn open(url: &str) -> Result<Arc<dyn Store>> {
    open_with(url, seal::Sealer::from_env()?, &[])
}

/// [`open`] with the MAC key given (an S3 store needs one unless
/// `LIMITLESS_INSECURE_STORE=1`; a directory store does not use it) and `AWS_*` settings
/// that override the process environment's (an OpenWhisk action's init parameters).
pub fn open_with(url: &str, key: Option<seal::Sealer>, aws_env: &[(String, String)]) -> Result<Arc<dyn Store>> {
    if url.starts_with("s3://") {
        return Ok(Arc::new(S3Store::open(url, key, aws_env)?));
    }
    if url.contains("://") && !url.starts_with("file://") {
        bail!("unsupported store URL `{url}`; use a directory path or file:///path");
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    Ok(Arc::new(LocalStore::open(Path::new(path))?))
}

/// The default store: `$XDG_DATA_HOME/limitless/store`, `~/.local/share/limitless/store`,
/// or `/tmp/limitless-UID/store` when there is no usable home.
pub fn default_location() -> PathBuf {
    let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(p) = abs(std::env::var_os("XDG_DATA_HOME")) {
        return p.join("limitless/store");
    }
    if let Some(h) = abs(std::env::var_os("HOME")) {
        let p = h.join(".local/share/limitless/store");
        if std::fs::create_dir_all(&p).is_ok() {
            return p;
        }
    }
    // SAFETY: getuid cannot fail.
    PathBuf::from(format!("/tmp/limitless-{}/store", unsafe { libc::getuid() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("chains/abc/step-1.manifest").is_ok());
        for bad in ["", "/abs", "a/../b", "a//b", "./a", "a/"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn s3_urls_are_checked() {
        let e = open("s3:///prefix").err().unwrap().to_string();
        assert!(e.contains("names no bucket"), "{e}");
        let e = open("gs://bucket").err().unwrap().to_string();
        assert!(e.contains("unsupported store URL"), "{e}");
    }
}
