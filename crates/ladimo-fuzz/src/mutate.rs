//! Seeded mutators: from one valid file, a broken one. Byte-level mutations (bit flips, byte
//! sets, truncation, insertion, deletion) apply to every file; each syntax adds its own
//! structural ones: binary files rewrite their numeric fields (lengths, counts, dimensions, type
//! codes, offsets) with hostile values, JSON and TOML files have one node replaced, removed or
//! nested deeply, and a safetensors file has its JSON header mutated with the length in front
//! kept or rewritten.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore};

/// How a seed file is built, which decides the structural mutations it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// A binary format whose numeric fields are listed in [`Seed::fields`] (GGUF).
    Binary,
    /// A safetensors file: 8-byte header length, JSON header, data.
    Safetensors,
    Json,
    Toml,
    /// One JSON object per line.
    Jsonl,
}

/// What a numeric field of a binary file holds, which picks the hostile values written into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A byte length (of a string, of a header).
    Length,
    /// A number of items that follow (tensors, keys, array items, dimensions).
    Count,
    /// A tensor dimension.
    Dim,
    /// A type code (metadata value type, ggml tensor type).
    Type,
    /// A byte offset into the data.
    Offset,
}

/// A little-endian integer field of a binary seed: where it is, how wide (4 or 8 bytes), what.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub offset: usize,
    pub width: usize,
    pub kind: FieldKind,
}

/// One valid input file the mutants are made from.
#[derive(Debug, Clone)]
pub struct Seed {
    /// What it is, for reports ("tiny llama, F32/F16/Q8_0/Q4_0/Q4_1").
    pub name: String,
    pub bytes: Vec<u8>,
    pub syntax: Syntax,
    /// Numeric fields (binary seeds only).
    pub fields: Vec<Field>,
}

impl Seed {
    pub fn new(name: impl Into<String>, bytes: impl Into<Vec<u8>>, syntax: Syntax) -> Self {
        Self {
            name: name.into(),
            bytes: bytes.into(),
            syntax,
            fields: Vec::new(),
        }
    }
}

/// A mutant of `seed`: one to three mutations, structural ones for most cases of a structured
/// seed, byte-level ones otherwise.
pub fn mutate(seed: &Seed, rng: &mut StdRng) -> Vec<u8> {
    let mut bytes = seed.bytes.clone();
    let rounds = rng.random_range(1..=3);
    for _ in 0..rounds {
        let structural = rng.random_bool(0.7);
        bytes = match (structural, seed.syntax) {
            (true, Syntax::Binary) if !seed.fields.is_empty() => {
                rewrite_field(&mut bytes, &seed.fields, rng);
                bytes
            }
            (true, Syntax::Safetensors) => mutate_safetensors_header(&bytes, rng).unwrap_or(bytes),
            (true, Syntax::Json) => mutate_json_text(&bytes, rng).unwrap_or(bytes),
            (true, Syntax::Toml) => mutate_toml_text(&bytes, rng).unwrap_or(bytes),
            (true, Syntax::Jsonl) => mutate_jsonl(&bytes, rng),
            _ => {
                mutate_bytes(&mut bytes, seed.syntax != Syntax::Binary, rng);
                bytes
            }
        };
    }
    bytes
}

/// Bytes that often break text parsers.
const TEXT_BITS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"=",
    b"\n",
    b"\0",
    b"\xff\xfe",
    b"\xc3",
    b"\xef\xbb\xbf",
    "\u{1F600}".as_bytes(),
    "\u{D55C}".as_bytes(),
    b"99999999999999999999999999",
    b"-1",
    b"1e999",
    b"NaN",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
];

/// One byte-level mutation.
pub fn mutate_bytes(bytes: &mut Vec<u8>, text: bool, rng: &mut StdRng) {
    let len = bytes.len();
    let pos = |rng: &mut StdRng| if len == 0 { 0 } else { rng.random_range(0..len) };
    match rng.random_range(0..7) {
        0 if len > 0 => {
            let p = pos(rng);
            bytes[p] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let p = pos(rng);
            bytes[p] = *[0u8, 0xff, 0x7f, 0x80, 0x01, b'0', b'9'].choose(rng).unwrap();
        }
        2 => bytes.truncate(pos(rng)),
        3 => {
            let p = pos(rng);
            let ins: Vec<u8> = if text {
                TEXT_BITS.choose(rng).unwrap().to_vec()
            } else {
                (0..rng.random_range(1..16)).map(|_| rng.random()).collect()
            };
            bytes.splice(p..p, ins);
        }
        4 if len > 0 => {
            let p = pos(rng);
            let n = rng.random_range(1..=(len - p).min(64));
            bytes.drain(p..p + n);
        }
        5 if len > 0 => {
            // Repeat a slice (grows structures, duplicates keys).
            let p = pos(rng);
            let n = rng.random_range(1..=(len - p).min(256));
            let copy = bytes[p..p + n].to_vec();
            let at = pos(rng);
            bytes.splice(at..at, copy);
        }
        _ if len >= 8 => {
            // A random aligned little-endian word set to a hostile value.
            let p = rng.random_range(0..=(len - 8) / 4) * 4;
            let v = hostile(FieldKind::Count, len, rng);
            bytes[p..p + 8].copy_from_slice(&v.to_le_bytes());
        }
        _ => bytes.push(rng.random()),
    }
}

/// A value that a field of `kind` should never hold in a file of `file_len` bytes (or that sits
/// right at an edge).
fn hostile(kind: FieldKind, file_len: usize, rng: &mut StdRng) -> u64 {
    let n = file_len as u64;
    let common = [
        0,
        1,
        u64::MAX,
        u64::MAX - 1,
        1 << 63,
        1 << 62,
        1 << 32,
        u32::MAX as u64,
        i64::MAX as u64,
    ];
    let specific: Vec<u64> = match kind {
        FieldKind::Length => vec![n, n + 1, n.saturating_sub(1), 2 * n, 1 << 40],
        FieldKind::Count => vec![n, n + 1, n / 2, 1 << 20, 1 << 40, 5, 9],
        FieldKind::Dim => vec![3, 31, 33, 1 << 31, 1 << 33, n, 1 << 21],
        FieldKind::Type => (0..42).chain([255, 1 << 16, u32::MAX as u64]).collect(),
        FieldKind::Offset => vec![n, n - n.min(1), 1, 3, 31, 33, n * 2, u64::MAX - 31],
    };
    if rng.random_bool(0.6) {
        *specific.choose(rng).unwrap()
    } else if rng.random_bool(0.8) {
        *common.choose(rng).unwrap()
    } else {
        rng.next_u64()
    }
}

/// Overwrite one listed numeric field with a hostile value (or nudge it by one).
fn rewrite_field(bytes: &mut [u8], fields: &[Field], rng: &mut StdRng) {
    let f = fields.choose(rng).unwrap();
    if f.offset + f.width > bytes.len() {
        return;
    }
    let slot = &mut bytes[f.offset..f.offset + f.width];
    let v = if rng.random_bool(0.2) {
        let mut old = [0u8; 8];
        old[..f.width].copy_from_slice(slot);
        let old = u64::from_le_bytes(old);
        if rng.random_bool(0.5) {
            old.wrapping_add(1)
        } else {
            old.wrapping_sub(1)
        }
    } else {
        hostile(f.kind, bytes.len(), rng)
    };
    let slot = &mut bytes[f.offset..f.offset + f.width];
    slot.copy_from_slice(&v.to_le_bytes()[..f.width]);
}

/// Strings that a string field of a user's file should never be trusted to hold.
const HOSTILE_STRINGS: &[&str] = &[
    "",
    "../../../../etc/passwd",
    "../outside.safetensors",
    "/etc/passwd",
    "..",
    ".",
    "model.safetensors.index.json",
    "F64",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "Q4_K",
    "BF16",
    "F16",
    "F32",
    "\u{0}",
    "TopK",
    "Teal",
    "Static",
    "nan",
    "llama",
    "mixtral",
    "hyperclovax",
    "WordPiece",
    "Unigram",
    "ByteLevel",
    "Sequence",
];

/// A JSON value that replaces a node.
fn hostile_json(rng: &mut StdRng) -> serde_json::Value {
    use serde_json::{Value, json};
    match rng.random_range(0..12) {
        0 => json!(u64::MAX),
        1 => json!(i64::MIN),
        2 => json!(-1),
        3 => json!(1e308),
        4 => json!(0),
        5 => json!(rng.random_range(0..70_000u64)),
        6 => Value::String(HOSTILE_STRINGS.choose(rng).unwrap().to_string()),
        7 => Value::String("A".repeat(rng.random_range(1..5000))),
        8 => Value::Null,
        9 => json!([]),
        10 => json!({}),
        _ => {
            // Deep nesting: parsers that recurse must stop, not overflow the stack.
            let depth = *[16usize, 200, 2000].choose(rng).unwrap();
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }
    }
}

/// Paths (object keys and array indices) to every node of a JSON value, root first.
fn json_paths(v: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(prefix.clone());
    if out.len() > 20_000 {
        return;
    }
    match v {
        serde_json::Value::Object(m) => {
            for (k, c) in m {
                prefix.push(k.clone());
                json_paths(c, prefix, out);
                prefix.pop();
            }
        }
        serde_json::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(i.to_string());
                json_paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(v: &'a mut serde_json::Value, path: &[String]) -> Option<&'a mut serde_json::Value> {
    path.iter().try_fold(v, |v, k| match v {
        serde_json::Value::Object(m) => m.get_mut(k),
        serde_json::Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
        _ => None,
    })
}

/// One structural mutation of a JSON value: a node replaced by a hostile value, removed, or
/// duplicated into a sibling array; or a numeric node nudged.
pub fn mutate_json(v: &mut serde_json::Value, rng: &mut StdRng) {
    let mut paths = Vec::new();
    json_paths(v, &mut Vec::new(), &mut paths);
    let path = paths.choose(rng).unwrap().clone();
    match rng.random_range(0..5) {
        0 if !path.is_empty() => {
            let (last, parent) = path.split_last().unwrap();
            match json_at(v, parent) {
                Some(serde_json::Value::Object(m)) => {
                    m.remove(last);
                }
                Some(serde_json::Value::Array(a)) => {
                    if let Ok(i) = last.parse::<usize>()
                        && i < a.len()
                    {
                        a.remove(i);
                    }
                }
                _ => {}
            }
        }
        1 => {
            // Nudge a number by one, or flip its sign.
            if let Some(node) = json_at(v, &path)
                && let Some(n) = node.as_i64()
            {
                *node = serde_json::json!(match rng.random_range(0..3) {
                    0 => n + 1,
                    1 => n - 1,
                    _ => -n,
                });
            } else if let Some(node) = json_at(v, &path) {
                *node = hostile_json(rng);
            }
        }
        2 => {
            // A big array where an array was: counts the parser may trust.
            if let Some(node) = json_at(v, &path)
                && let serde_json::Value::Array(a) = node
                && let Some(first) = a.first().cloned()
            {
                let n = rng.random_range(2..2000);
                a.extend(std::iter::repeat_n(first, n));
            } else if let Some(node) = json_at(v, &path) {
                *node = hostile_json(rng);
            }
        }
        3 => {
            if let Some(serde_json::Value::Object(m)) = json_at(v, &path) {
                m.insert(HOSTILE_STRINGS.choose(rng).unwrap().to_string(), hostile_json(rng));
            } else if let Some(node) = json_at(v, &path) {
                *node = hostile_json(rng);
            }
        }
        _ => {
            if let Some(node) = json_at(v, &path) {
                *node = hostile_json(rng);
            }
        }
    }
}

fn mutate_json_text(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    mutate_json(&mut v, rng);
    serde_json::to_vec(&v).ok()
}

/// Mutate the JSON header of a safetensors file; the length in front is rewritten to fit (most
/// cases) or left as it was.
fn mutate_safetensors_header(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let mut v: serde_json::Value = serde_json::from_slice(header).ok()?;
    mutate_json(&mut v, rng);
    let mut new_header = serde_json::to_vec(&v).ok()?;
    // safetensors pads its header with spaces to a multiple of 8; keep the data where it was
    // when the new header is not longer, so the offsets still point at the same bytes.
    if new_header.len() <= n && rng.random_bool(0.7) {
        new_header.resize(n, b' ');
    }
    let len = if rng.random_bool(0.9) {
        new_header.len() as u64
    } else {
        n as u64
    };
    let mut out = len.to_le_bytes().to_vec();
    out.extend(new_header);
    out.extend(&bytes[8 + n..]);
    Some(out)
}

/// A TOML value that replaces a node.
fn hostile_toml(rng: &mut StdRng) -> toml::Value {
    use toml::Value;
    match rng.random_range(0..11) {
        0 => Value::Integer(i64::MAX),
        1 => Value::Integer(i64::MIN),
        2 => Value::Integer(-1),
        3 => Value::Integer(0),
        4 => Value::Float(f64::NAN),
        5 => Value::Float(f64::INFINITY),
        6 => Value::Float(-0.0),
        7 => Value::String(HOSTILE_STRINGS.choose(rng).unwrap().to_string()),
        8 => Value::Boolean(rng.random()),
        9 => Value::Array(vec![]),
        _ => Value::Table(toml::Table::new()),
    }
}

fn toml_paths(v: &toml::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(prefix.clone());
    match v {
        toml::Value::Table(m) => {
            for (k, c) in m {
                prefix.push(k.clone());
                toml_paths(c, prefix, out);
                prefix.pop();
            }
        }
        toml::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(i.to_string());
                toml_paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn toml_at<'a>(v: &'a mut toml::Value, path: &[String]) -> Option<&'a mut toml::Value> {
    path.iter().try_fold(v, |v, k| match v {
        toml::Value::Table(m) => m.get_mut(k),
        toml::Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
        _ => None,
    })
}

/// One structural mutation of a TOML document: a value replaced, a key removed, an unknown key
/// added, or an array grown.
fn mutate_toml_text(bytes: &[u8], rng: &mut StdRng) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut v = toml::Value::Table(toml::from_str::<toml::Table>(text).ok()?);
    let mut paths = Vec::new();
    toml_paths(&v, &mut Vec::new(), &mut paths);
    let path = paths.choose(rng)?.clone();
    match rng.random_range(0..4) {
        0 if !path.is_empty() => {
            let (last, parent) = path.split_last().unwrap();
            match toml_at(&mut v, parent) {
                Some(toml::Value::Table(m)) => {
                    m.remove(last);
                }
                Some(toml::Value::Array(a)) => {
                    if let Ok(i) = last.parse::<usize>()
                        && i < a.len()
                    {
                        a.remove(i);
                    }
                }
                _ => {}
            }
        }
        1 => {
            if let Some(toml::Value::Table(m)) = toml_at(&mut v, &path) {
                m.insert("unknown_field".into(), hostile_toml(rng));
            } else if let Some(node) = toml_at(&mut v, &path) {
                *node = hostile_toml(rng);
            }
        }
        2 => {
            if let Some(toml::Value::Array(a)) = toml_at(&mut v, &path)
                && let Some(first) = a.first().cloned()
            {
                let n = rng.random_range(2..500);
                a.extend(std::iter::repeat_n(first, n));
            } else if let Some(node) = toml_at(&mut v, &path) {
                *node = hostile_toml(rng);
            }
        }
        _ => {
            if path.is_empty() {
                return None;
            }
            *toml_at(&mut v, &path)? = hostile_toml(rng);
        }
    }
    toml::to_string(&v).ok().map(String::into_bytes)
}

/// Mutate one line of a JSONL file structurally, or drop, repeat or break a line.
fn mutate_jsonl(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        let mut b = bytes.to_vec();
        mutate_bytes(&mut b, true, rng);
        return b;
    };
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.is_empty() {
        return bytes.to_vec();
    }
    let i = rng.random_range(0..lines.len());
    match rng.random_range(0..4) {
        0 => {
            lines.remove(i);
        }
        1 => {
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        2 => lines[i] = HOSTILE_STRINGS.choose(rng).unwrap().to_string(),
        _ => {
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&lines[i]) {
                mutate_json(&mut v, rng);
                lines[i] = v.to_string();
            }
        }
    }
    let mut out = lines.join("\n");
    if rng.random_bool(0.5) {
        out.push('\n');
    }
    out.into_bytes()
}
