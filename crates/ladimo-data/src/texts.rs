//! Users' own text files: `.txt` (one document) or `.jsonl` (`{"text": ...}` per line).

use std::path::Path;

use crate::error::{Error, Result};

/// Reads the documents in a user's text file.
///
/// - `.txt`: the whole file is one document.
/// - `.jsonl` (or `.ndjson`): one JSON object per line with a string field `"text"`; other fields
///   are ignored; blank lines are skipped, and so (with a warning) are records whose text is empty.
///
/// Errors name the file, and the line where there is one: a file that cannot be read, bytes that
/// are not UTF-8, a line that is not JSON or not an object, a missing or non-string `"text"`, a
/// file with no text at all, or any other extension.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let jsonl = match ext.as_deref() {
        Some("txt") => false,
        Some("jsonl") | Some("ndjson") => true,
        _ => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
            });
        }
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(s) => s,
        Err(e) => {
            let byte = e.valid_up_to();
            let line = 1 + bytes[..byte].iter().filter(|&&b| b == b'\n').count();
            return Err(Error::NotUtf8 {
                path: path.to_path_buf(),
                line,
                byte,
            });
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if !jsonl {
        if text.trim().is_empty() {
            let msg = if text.is_empty() {
                "the file is empty"
            } else {
                "the file holds only whitespace"
            };
            return Err(Error::Empty {
                path: path.to_path_buf(),
                msg: msg.into(),
            });
        }
        return Ok(vec![text.to_string()]);
    }
    let mut docs = Vec::new();
    let mut skipped = 0usize;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            line: line_no,
            msg: e.to_string(),
        })?;
        let missing = |msg: String| Error::MissingText {
            path: path.to_path_buf(),
            line: line_no,
            msg,
        };
        let serde_json::Value::Object(obj) = value else {
            return Err(missing(format!(
                "expected a JSON object with a \"text\" field, found {}",
                kind(&value)
            )));
        };
        match obj.get("text") {
            Some(serde_json::Value::String(s)) if s.is_empty() => skipped += 1,
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(other) => return Err(missing(format!("field \"text\" is {}, not a string", kind(other)))),
            None => {
                let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
                keys.truncate(8);
                return Err(missing(format!(
                    "no \"text\" field (fields: {})",
                    if keys.is_empty() {
                        "none".into()
                    } else {
                        keys.join(", ")
                    }
                )));
            }
        }
    }
    if skipped > 0 {
        tracing::warn!("{}: skipped {skipped} records with empty text", path.display());
    }
    if docs.is_empty() {
        let msg = if skipped > 0 {
            "every record's text is empty"
        } else {
            "no JSON lines in the file"
        };
        return Err(Error::Empty {
            path: path.to_path_buf(),
            msg: msg.into(),
        });
    }
    Ok(docs)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The first `n` tokens of `files`' texts joined in order, each file's documents and each file
/// ended by a newline: how held-out text is read (from the start, files in their order), so that
/// every command scores the same tokens. Errors, naming the first file, when there are fewer.
pub fn heldout_tokens(tok: &ladimo_io::Tokenizer, files: &[std::path::PathBuf], n: usize) -> Result<Vec<u32>> {
    let mut text = String::new();
    for f in files {
        text.push_str(&read_texts(f)?.join("\n"));
        text.push('\n');
        // About 4 characters per token: stop reading once there is ample text.
        if text.len() > n * 8 {
            break;
        }
    }
    let first = files.first().cloned().unwrap_or_default();
    let mut ids = tok.encode(&text).map_err(|e| Error::format(&first, e.to_string()))?;
    if ids.len() < n {
        return Err(Error::Empty {
            path: first,
            msg: format!(
                "{} held-out file(s) starting here give {} tokens, fewer than the {n} asked for",
                files.len(),
                ids.len()
            ),
        });
    }
    ids.truncate(n);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn err(p: &Path) -> String {
        read_texts(p).unwrap_err().to_string()
    }

    #[test]
    fn txt_is_one_document() {
        let d = tempfile::tempdir().unwrap();
        let p = write(&d, "a.txt", "\u{feff}line one\n\nline two\n".as_bytes());
        assert_eq!(read_texts(&p).unwrap(), vec!["line one\n\nline two\n".to_string()]);
    }

    #[test]
    fn jsonl_reads_text_fields() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "a.jsonl",
            br#"{"text": "first", "id": 1}

{"id": 2, "text": "second\nline"}
{"text": ""}
"#,
        );
        assert_eq!(
            read_texts(&p).unwrap(),
            vec!["first".to_string(), "second\nline".to_string()]
        );
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(&d, "bad.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n");
        let e = err(&p);
        assert!(
            e.contains("bad.jsonl") && e.contains("line 2") && e.contains("invalid JSON"),
            "{e}"
        );

        let p = write(&d, "missing.jsonl", b"{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
        let e = err(&p);
        assert!(
            e.contains("missing.jsonl") && e.contains("line 2") && e.contains("no \"text\" field (fields: body)"),
            "{e}"
        );

        let p = write(&d, "num.jsonl", b"{\"text\": 3}\n");
        let e = err(&p);
        assert!(e.contains("line 1") && e.contains("a number, not a string"), "{e}");

        let p = write(&d, "arr.jsonl", b"[\"text\"]\n");
        let e = err(&p);
        assert!(e.contains("line 1") && e.contains("found an array"), "{e}");
    }

    #[test]
    fn non_utf8_names_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(&d, "latin.jsonl", b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n");
        let e = err(&p);
        assert!(
            e.contains("latin.jsonl") && e.contains("line 2") && e.contains("UTF-8"),
            "{e}"
        );
        let p = write(&d, "latin.txt", b"abc\xff");
        let e = err(&p);
        assert!(
            e.contains("latin.txt") && e.contains("line 1") && e.contains("byte 3"),
            "{e}"
        );
    }

    #[test]
    fn empty_and_unsupported_inputs() {
        let d = tempfile::tempdir().unwrap();
        for (name, content, want) in [
            ("e.txt", &b""[..], "the file is empty"),
            ("w.txt", b" \n\t\n", "only whitespace"),
            ("e.jsonl", b"\n\n", "no JSON lines"),
            ("z.jsonl", b"{\"text\": \"\"}\n", "every record's text is empty"),
        ] {
            let p = write(&d, name, content);
            let e = err(&p);
            assert!(e.contains(name) && e.contains("empty input") && e.contains(want), "{e}");
        }
        let p = write(&d, "data.csv", b"text\nx\n");
        let e = err(&p);
        assert!(e.contains("data.csv") && e.contains("unsupported file type"), "{e}");
        let e = err(&d.path().join("absent.txt"));
        assert!(e.contains("absent.txt"), "{e}");
    }
}

/// Which part of each file [`take_tokens`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// From the start (what distillation calibrates on).
    Head,
    /// From the end (what the routing profiler measures on: calibration text, but not the
    /// very tokens the experts were trained on).
    Tail,
}

/// `budget` tokens from `files` (`.txt` / `.jsonl`), an equal share from each, from the start or
/// the end of each file. Errors when the files hold fewer tokens than the budget.
pub fn take_tokens(
    tok: &ladimo_io::Tokenizer,
    files: &[std::path::PathBuf],
    budget: usize,
    part: Part,
) -> Result<Vec<u32>> {
    let per = budget.div_ceil(files.len().max(1));
    let mut out = Vec::new();
    let mut have = 0;
    for f in files {
        let text = read_texts(f)?.join("\n");
        // Tokenize only a slice long enough for the share (about 4 chars per token, with margin).
        let span = (per * 8).min(text.len());
        let slice = match part {
            Part::Head => &text[..text.floor_char_boundary(span)],
            Part::Tail => &text[text.ceil_char_boundary(text.len() - span)..],
        };
        let ids = tok.encode(slice).map_err(|e| Error::format(f, e.to_string()))?;
        have += ids.len();
        let n = per.min(ids.len());
        match part {
            Part::Head => out.extend_from_slice(&ids[..n]),
            Part::Tail => out.extend_from_slice(&ids[ids.len() - n..]),
        }
    }
    if out.len() < budget {
        let first = files.first().cloned().unwrap_or_default();
        return Err(Error::Empty {
            path: first,
            msg: format!(
                "{} file(s) give {} tokens ({have} tokenized), fewer than the {budget} asked for ({per} per file)",
                files.len(),
                out.len()
            ),
        });
    }
    out.truncate(budget);
    Ok(out)
}
