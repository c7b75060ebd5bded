//! Sealing store objects with a MAC, so that a shared store cannot feed a step a forged or
//! swapped manifest, result or chunk list.
//!
//! A sealed object is `body || tag || "LMAC"`: `tag` is keyed BLAKE3 over the object's key
//! and its body, with a key derived from `LIMITLESS_KEY`. Binding the store key means a
//! manifest cannot be replayed under another step's name.

use anyhow::{bail, Result};

const MAGIC: &[u8; 4] = b"LMAC";
const TAG: usize = 32;

/// The smallest `LIMITLESS_KEY` accepted.
pub const MIN_KEY_LEN: usize = 16;

/// A MAC key.
#[derive(Clone)]
pub struct Sealer {
    key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// Derives the MAC key from a secret.
    pub fn new(secret: &[u8]) -> Result<Sealer> {
        if secret.len() < MIN_KEY_LEN {
            bail!(
                "LIMITLESS_KEY is {} bytes long; use a random secret of at least {MIN_KEY_LEN} (for example `openssl rand -hex 32`)",
                secret.len()
            );
        }
        Ok(Sealer { key: blake3::derive_key("limitless 2026-11 store object mac", secret) })
    }

    /// From `LIMITLESS_KEY`, if set and not empty.
    pub fn from_env() -> Result<Option<Sealer>> {
        match std::env::var_os("LIMITLESS_KEY") {
            Some(v) if !v.is_empty() => Ok(Some(Sealer::new(v.as_encoded_bytes())?)),
            _ => Ok(None),
        }
    }

    fn tag(&self, key: &str, body: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(body);
        *h.finalize().as_bytes()
    }

    /// `body` sealed as the object `key`.
    pub fn seal(&self, key: &str, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + TAG + MAGIC.len());
        out.extend_from_slice(body);
        out.extend_from_slice(&self.tag(key, body));
        out.extend_from_slice(MAGIC);
        out
    }

    /// The body of the sealed object `key`, or an error if it does not verify.
    pub fn open(&self, key: &str, mut obj: Vec<u8>) -> Result<Vec<u8>> {
        if !is_sealed(&obj) {
            bail!("the object {key} carries no MAC: it was written without LIMITLESS_KEY, or replaced; refusing it");
        }
        let n = obj.len() - TAG - MAGIC.len();
        let want = self.tag(key, &obj[..n]);
        // Constant time: blake3::Hash compares in constant time.
        if blake3::Hash::from_bytes(want) != blake3::Hash::from_slice(&obj[n..n + TAG]).expect("32 bytes") {
            bail!(
                "the object {key} does not verify: it was tampered with or truncated, or LIMITLESS_KEY is not the key it was written with"
            );
        }
        obj.truncate(n);
        Ok(obj)
    }
}

/// Whether `obj` looks sealed.
pub fn is_sealed(obj: &[u8]) -> bool {
    obj.len() >= TAG + MAGIC.len() && obj.ends_with(MAGIC)
}

/// Reads an object with an optional sealer: sealed objects need the key, and with a key
/// every object must be sealed.
pub fn open(sealer: Option<&Sealer>, key: &str, obj: Vec<u8>) -> Result<Vec<u8>> {
    match sealer {
        Some(s) => s.open(key, obj),
        None if is_sealed(&obj) => bail!("the object {key} is sealed with a key: set LIMITLESS_KEY to the key the chain was written with"),
        None => Ok(obj),
    }
}

/// Seals with an optional sealer.
pub fn seal(sealer: Option<&Sealer>, key: &str, body: &[u8]) -> Vec<u8> {
    match sealer {
        Some(s) => s.seal(key, body),
        None => body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_refuses_changes() {
        let s = Sealer::new(b"0123456789abcdef-secret").unwrap();
        let obj = s.seal("chains/a/step-1.manifest", b"{\"x\":1}");
        assert_eq!(s.open("chains/a/step-1.manifest", obj.clone()).unwrap(), b"{\"x\":1}");
        // Another key name (a replayed manifest).
        assert!(s.open("chains/a/step-2.manifest", obj.clone()).unwrap_err().to_string().contains("does not verify"));
        // Any changed byte.
        for i in 0..obj.len() - 4 {
            let mut bad = obj.clone();
            bad[i] ^= 1;
            assert!(s.open("chains/a/step-1.manifest", bad).is_err(), "byte {i}");
        }
        // Truncated.
        assert!(s.open("chains/a/step-1.manifest", obj[..obj.len() - 1].to_vec()).is_err());
        // Another key.
        let other = Sealer::new(b"another secret of 16+ bytes").unwrap();
        assert!(other.open("chains/a/step-1.manifest", obj.clone()).is_err());
        // No key.
        assert!(open(None, "chains/a/step-1.manifest", obj).unwrap_err().to_string().contains("LIMITLESS_KEY"));
        // A plain object under a key.
        assert!(s.open("k", b"plain".to_vec()).unwrap_err().to_string().contains("no MAC"));
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Sealer::new(b"short").unwrap_err().to_string().contains("at least"));
    }
}
