//! Content hashing, once for the workspace: SHA-256 in hex, whole or cut to 16 characters.
//!
//! - [`content_hash`]: a short key over several byte strings (each preceded by its length, so
//!   `["ab", "c"]` and `["a", "bc"]` differ). The key of every cached pipeline step.
//! - [`Hasher`]: the same digest fed piece by piece, for callers that hash as they go (a model's
//!   fingerprint, a file while it is copied).
//! - [`sha256_hex`] / [`sha256_file`]: the full digest of bytes or of a file, streamed, as pinned
//!   checksums are written.
//!
//! Every key written to disk by ladimo (step folders, policy-file fingerprints, pinned checksums)
//! comes from here, so the bytes fed in decide a key and nothing else does.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// SHA-256, fed piece by piece.
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: impl AsRef<[u8]>) {
        self.0.update(bytes);
    }

    /// The full digest in lower-case hex (64 characters).
    pub fn hex(self) -> String {
        format!("{:x}", self.0.finalize())
    }

    /// The digest's first 8 bytes in hex (16 characters): a key, not a checksum.
    pub fn short_hex(self) -> String {
        self.0.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

/// The first 8 bytes of SHA-256 over `parts`, each preceded by its length (`u64`, little endian),
/// in hex.
pub fn content_hash<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Hasher::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.short_hex()
}

/// SHA-256 of `bytes` in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Hasher::new();
    h.update(bytes);
    h.hex()
}

/// SHA-256 of the file at `path` in hex, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_ones_written_before() {
        // Step keys and fingerprints on disk were made with these definitions: they must not move.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Hasher::new();
        h.update(b"abc");
        assert_eq!(h.short_hex(), "ba7816bf8f01cfea");
        let mut want = Hasher::new();
        for p in [&b"ab"[..], b"c"] {
            want.update((p.len() as u64).to_le_bytes());
            want.update(p);
        }
        assert_eq!(content_hash([&b"ab"[..], b"c"]), want.short_hex());
        assert_ne!(content_hash([&b"ab"[..], b"c"]), content_hash([&b"a"[..], b"bc"]));
    }
}
