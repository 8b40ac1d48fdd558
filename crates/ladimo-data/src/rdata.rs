//! Just enough of R's serialization format to read character vectors out of a lazy-load
//! database (`Rdata.rdb` + `Rdata.rdx`, what `R CMD INSTALL` makes of a package's `data/`).
//!
//! - The `.rdx` index is an R serialization, gzip'd (or a 4-byte length + zlib stream), of
//!   `list(variables = list(name = c(offset, length), ...), references = list(), compressed = TRUE)`.
//! - Each `.rdb` block at `[offset, offset + length)` is a 4-byte big-endian uncompressed length
//!   followed by a zlib stream of an R serialization.
//!
//! Only the XDR format (`X\n`, versions 2 and 3) is read, and only these types: NULL, symbols,
//! pairlists (for attributes), CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP and VECSXP, plus
//! references to earlier symbols. Anything else is refused with an error naming the type.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

const NILSXP: u8 = 0;
const SYMSXP: u8 = 1;
const LISTSXP: u8 = 2;
const CHARSXP: u8 = 9;
const LGLSXP: u8 = 10;
const INTSXP: u8 = 13;
const REALSXP: u8 = 14;
const STRSXP: u8 = 16;
const VECSXP: u8 = 19;
const EXPRSXP: u8 = 20;
const REFSXP: u8 = 255;
const NILVALUE_SXP: u8 = 254;

const IS_OBJECT: u32 = 1 << 8;
const HAS_ATTR: u32 = 1 << 9;
const HAS_TAG: u32 = 1 << 10;

// CHARSXP encoding bits (in the "levels" part of the flags).
const LATIN1_MASK: u32 = 1 << 2;
const BYTES_MASK: u32 = 1 << 1;

/// Attributes: (name, value) pairs in order.
pub(crate) type Attrs = Vec<(String, Sexp)>;

/// A deserialized R value (only the types this crate needs).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Sexp {
    Nil,
    Sym(String),
    /// A CHARSXP; `None` is `NA_character_`.
    Char(Option<String>),
    /// A pairlist as (tag, value) pairs.
    Pairlist(Vec<(Option<String>, Sexp)>),
    Lgl(Vec<i32>, Attrs),
    Int(Vec<i32>, Attrs),
    Real(Vec<f64>, Attrs),
    /// A character vector; `None` elements are `NA_character_`.
    Str(Vec<Option<String>>, Attrs),
    /// A generic vector (`list()`).
    List(Vec<Sexp>, Attrs),
}

impl Sexp {
    fn attrs(&self) -> &[(String, Sexp)] {
        match self {
            Sexp::Lgl(_, a) | Sexp::Int(_, a) | Sexp::Real(_, a) | Sexp::Str(_, a) | Sexp::List(_, a) => a,
            _ => &[],
        }
    }

    /// The `names` attribute, when it is a character vector.
    pub(crate) fn names(&self) -> Option<Vec<String>> {
        self.attrs()
            .iter()
            .find(|(k, _)| k == "names")
            .and_then(|(_, v)| match v {
                Sexp::Str(s, _) => Some(s.iter().map(|x| x.clone().unwrap_or_default()).collect()),
                _ => None,
            })
    }

    /// Element `name` of a named list.
    pub(crate) fn get(&self, name: &str) -> Option<&Sexp> {
        let Sexp::List(items, _) = self else { return None };
        let names = self.names()?;
        names.iter().position(|n| n == name).and_then(|i| items.get(i))
    }

    fn type_name(&self) -> &'static str {
        match self {
            Sexp::Nil => "NULL",
            Sexp::Sym(_) => "symbol",
            Sexp::Char(_) => "CHARSXP",
            Sexp::Pairlist(_) => "pairlist",
            Sexp::Lgl(..) => "logical vector",
            Sexp::Int(..) => "integer vector",
            Sexp::Real(..) => "double vector",
            Sexp::Str(..) => "character vector",
            Sexp::List(..) => "list",
        }
    }
}

/// Reads one R serialization (`X\n` header included) from `data`; `path` only names errors.
pub(crate) fn unserialize(data: &[u8], path: &Path) -> Result<Sexp> {
    let mut r = Reader {
        data,
        pos: 0,
        refs: Vec::new(),
        path,
    };
    let magic = r.bytes(2)?;
    if magic != b"X\n" {
        let what = match magic {
            b"A\n" => "the ASCII format",
            b"B\n" => "the native binary format",
            _ => "not an R serialization",
        };
        return Err(r.err(format!(
            "{what} (header {:?}); only XDR (`X\\n`) is supported",
            String::from_utf8_lossy(magic)
        )));
    }
    let version = r.int()?;
    let _writer = r.int()?;
    let _min_reader = r.int()?;
    match version {
        2 => {}
        3 => {
            let n = r.len_i32()?;
            let enc = r.bytes(n)?;
            if !enc.eq_ignore_ascii_case(b"UTF-8") && !enc.eq_ignore_ascii_case(b"UTF8") {
                tracing::debug!("{}: native encoding {}", path.display(), String::from_utf8_lossy(enc));
            }
        }
        v => return Err(r.err(format!("serialization version {v} is not supported (2 or 3)"))),
    }
    let v = r.item()?;
    Ok(v)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// The reference table (symbols), 1-based in the stream.
    refs: Vec<Sexp>,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: String) -> Error {
        Error::format(self.path, format!("R serialization, byte {}: {msg}", self.pos))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(self.err(format!(
                "truncated: wanted {n} bytes, {} left",
                self.data.len() - self.pos
            )));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    fn len_i32(&mut self) -> Result<usize> {
        let n = self.int()?;
        usize::try_from(n).map_err(|_| self.err(format!("negative length {n}")))
    }

    /// A vector length: an int, or -1 followed by two ints (upper and lower 32 bits).
    fn length(&mut self) -> Result<usize> {
        let n = self.int()?;
        let len = if n == -1 {
            let hi = self.int()? as u32 as u64;
            let lo = self.int()? as u32 as u64;
            (hi << 32) | lo
        } else if n < 0 {
            return Err(self.err(format!("negative length {n}")));
        } else {
            n as u64
        };
        // Every element takes at least 4 bytes, so a length beyond that is corrupt data, not a reason to allocate.
        if len > (self.data.len() - self.pos) as u64 {
            return Err(self.err(format!("length {len} is larger than the data left")));
        }
        Ok(len as usize)
    }

    fn item(&mut self) -> Result<Sexp> {
        let flags = self.int()? as u32;
        self.item_with(flags)
    }

    fn item_with(&mut self, flags: u32) -> Result<Sexp> {
        let ty = (flags & 0xff) as u8;
        let levels = flags >> 12;
        let has_attr = flags & HAS_ATTR != 0;
        let _is_obj = flags & IS_OBJECT != 0;
        match ty {
            NILVALUE_SXP | NILSXP => Ok(Sexp::Nil),
            REFSXP => {
                let mut idx = (flags >> 8) as usize;
                if idx == 0 {
                    idx = self.len_i32()?;
                }
                self.refs.get(idx.wrapping_sub(1)).cloned().ok_or_else(|| {
                    self.err(format!(
                        "reference {idx} to an object not read yet ({} known)",
                        self.refs.len()
                    ))
                })
            }
            SYMSXP => {
                let name = match self.item()? {
                    Sexp::Char(Some(s)) => s,
                    other => return Err(self.err(format!("symbol name is a {}, not a string", other.type_name()))),
                };
                let sym = Sexp::Sym(name);
                self.refs.push(sym.clone());
                Ok(sym)
            }
            LISTSXP => {
                // Iterate along the CDRs: attributes, tag, CAR, then the next cell's flags.
                let mut cells = Vec::new();
                let mut flags = flags;
                loop {
                    if flags & HAS_ATTR != 0 {
                        let _ = self.item()?;
                    }
                    let tag = if flags & HAS_TAG != 0 {
                        match self.item()? {
                            Sexp::Sym(s) => Some(s),
                            Sexp::Nil => None,
                            other => return Err(self.err(format!("pairlist tag is a {}", other.type_name()))),
                        }
                    } else {
                        None
                    };
                    let car = self.item()?;
                    cells.push((tag, car));
                    flags = self.int()? as u32;
                    match (flags & 0xff) as u8 {
                        LISTSXP => continue,
                        NILVALUE_SXP | NILSXP => break,
                        t => return Err(self.err(format!("pairlist ends in type {t}, not NULL"))),
                    }
                }
                Ok(Sexp::Pairlist(cells))
            }
            CHARSXP => {
                let n = self.int()?;
                if n == -1 {
                    return Ok(Sexp::Char(None));
                }
                let n = usize::try_from(n).map_err(|_| self.err(format!("string length {n}")))?;
                let raw = self.bytes(n)?;
                let s = if levels & LATIN1_MASK != 0 {
                    raw.iter().map(|&b| b as char).collect()
                } else if levels & BYTES_MASK != 0 {
                    return Err(self.err("a string marked as raw bytes (no encoding)".into()));
                } else {
                    // UTF-8, ASCII or native (UTF-8 on every platform this crate targets).
                    match std::str::from_utf8(raw) {
                        Ok(s) => s.to_string(),
                        Err(e) => return Err(self.err(format!("a string that is not UTF-8: {e}"))),
                    }
                };
                Ok(Sexp::Char(Some(s)))
            }
            LGLSXP | INTSXP => {
                let n = self.length()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.int()?);
                }
                let a = self.attributes(has_attr)?;
                Ok(if ty == LGLSXP { Sexp::Lgl(v, a) } else { Sexp::Int(v, a) })
            }
            REALSXP => {
                let n = self.length()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(f64::from_be_bytes(self.bytes(8)?.try_into().unwrap()));
                }
                let a = self.attributes(has_attr)?;
                Ok(Sexp::Real(v, a))
            }
            STRSXP => {
                let n = self.length()?;
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    match self.item()? {
                        Sexp::Char(s) => v.push(s),
                        other => {
                            return Err(self.err(format!(
                                "element {} of a character vector is a {}",
                                i + 1,
                                other.type_name()
                            )));
                        }
                    }
                }
                let a = self.attributes(has_attr)?;
                Ok(Sexp::Str(v, a))
            }
            VECSXP | EXPRSXP => {
                let n = self.length()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.item()?);
                }
                let a = self.attributes(has_attr)?;
                Ok(Sexp::List(v, a))
            }
            t => Err(self.err(format!(
                "R type {t} ({}) is not supported by this reader",
                type_label(t)
            ))),
        }
    }

    fn attributes(&mut self, has_attr: bool) -> Result<Attrs> {
        if !has_attr {
            return Ok(Vec::new());
        }
        match self.item()? {
            Sexp::Pairlist(cells) => Ok(cells.into_iter().map(|(k, v)| (k.unwrap_or_default(), v)).collect()),
            Sexp::Nil => Ok(Vec::new()),
            other => Err(self.err(format!("attributes are a {}, not a pairlist", other.type_name()))),
        }
    }
}

fn type_label(t: u8) -> &'static str {
    match t {
        3 => "closure",
        4 => "environment",
        5 => "promise",
        6 => "language",
        15 => "complex",
        24 => "raw",
        25 => "S4",
        238 => "ALTREP",
        239 | 240 => "attributed pairlist/language",
        241..=253 => "special environment or marker",
        _ => "other",
    }
}

/// Decompresses a zlib stream that must inflate to exactly `expected` bytes.
fn inflate_zlib(data: &[u8], expected: usize, path: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(expected);
    flate2::read::ZlibDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|e| Error::format(path, format!("bad zlib stream: {e}")))?;
    if out.len() != expected {
        return Err(Error::format(
            path,
            format!("zlib stream inflated to {} bytes, header says {expected}", out.len()),
        ));
    }
    Ok(out)
}

/// A block: a 4-byte big-endian uncompressed length, then a zlib stream.
fn inflate_block(block: &[u8], path: &Path) -> Result<Vec<u8>> {
    if block.len() < 4 {
        return Err(Error::format(path, "compressed block shorter than its 4-byte header"));
    }
    let n = u32::from_be_bytes(block[..4].try_into().unwrap()) as usize;
    inflate_zlib(&block[4..], n, path)
}

/// The variables of a lazy-load database: name -> (offset, length) into the `.rdb`.
pub(crate) fn read_index(rdx: &[u8], path: &Path) -> Result<Vec<(String, usize, usize)>> {
    let raw = if rdx.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(rdx)
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("bad gzip stream: {e}")))?;
        out
    } else {
        inflate_block(rdx, path)?
    };
    let index = unserialize(&raw, path)?;
    match index.get("compressed") {
        Some(Sexp::Lgl(v, _)) | Some(Sexp::Int(v, _)) if v.first() == Some(&1) => {}
        Some(c) => {
            return Err(Error::format(
                path,
                format!("compression {c:?} is not supported (only zlib, `compressed = TRUE`)"),
            ));
        }
        None => return Err(Error::format(path, "index has no `compressed` entry")),
    }
    let vars = index
        .get("variables")
        .ok_or_else(|| Error::format(path, "index has no `variables` entry"))?;
    let Sexp::List(items, _) = vars else {
        return Err(Error::format(
            path,
            format!("`variables` is a {}, not a list", vars.type_name()),
        ));
    };
    let names = vars
        .names()
        .ok_or_else(|| Error::format(path, "`variables` has no names"))?;
    if names.len() != items.len() {
        return Err(Error::format(path, "`variables` has as many names as entries"));
    }
    let mut out = Vec::new();
    for (name, item) in names.into_iter().zip(items) {
        let pos = match item {
            Sexp::Int(v, _) if v.len() == 2 && v[0] >= 0 && v[1] >= 0 => (v[0] as usize, v[1] as usize),
            Sexp::Real(v, _) if v.len() == 2 && v[0] >= 0.0 && v[1] >= 0.0 => (v[0] as usize, v[1] as usize),
            other => {
                return Err(Error::format(
                    path,
                    format!("`{name}` should be c(offset, length), is a {}", other.type_name()),
                ));
            }
        };
        out.push((name, pos.0, pos.1));
    }
    Ok(out)
}

/// Reads every variable of a lazy-load database that is a character vector; returns
/// (name, lines) in the index's order. `NA` elements become empty lines.
pub(crate) fn read_character_vectors(
    rdb: &[u8],
    rdx: &[u8],
    rdb_path: &Path,
    rdx_path: &Path,
) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for (name, off, len) in read_index(rdx, rdx_path)? {
        let block = off.checked_add(len).and_then(|end| rdb.get(off..end)).ok_or_else(|| {
            Error::format(
                rdb_path,
                format!("`{name}` at [{off}, +{len}) is past the end ({} bytes)", rdb.len()),
            )
        })?;
        let raw = inflate_block(block, rdb_path)?;
        match unserialize(&raw, rdb_path)? {
            Sexp::Str(v, _) => out.push((name, v.into_iter().map(Option::unwrap_or_default).collect())),
            other => {
                return Err(Error::format(
                    rdb_path,
                    format!("`{name}` is a {}, not a character vector", other.type_name()),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::Compression;
    use std::io::Write;

    /// A tiny R serializer (XDR, version 3), enough to build test data the way R writes it.
    #[derive(Default)]
    pub(crate) struct W {
        pub(crate) buf: Vec<u8>,
        names_written: bool,
    }

    impl W {
        pub(crate) fn header() -> Self {
            let mut w = W::default();
            w.buf.extend_from_slice(b"X\n");
            w.int(3);
            w.int(0x040201);
            w.int(0x030500);
            w.int(5);
            w.buf.extend_from_slice(b"UTF-8");
            w
        }
        pub(crate) fn int(&mut self, v: i32) {
            self.buf.extend_from_slice(&v.to_be_bytes());
        }
        pub(crate) fn charsxp(&mut self, s: Option<&str>, utf8: bool) {
            match s {
                None => {
                    self.int(CHARSXP as i32);
                    self.int(-1);
                }
                Some(s) => {
                    let level = if utf8 { 1 << 3 } else { 1 << 6 };
                    self.int(CHARSXP as i32 | (level << 12));
                    self.int(s.len() as i32);
                    self.buf.extend_from_slice(s.as_bytes());
                }
            }
        }
        pub(crate) fn strsxp(&mut self, v: &[Option<&str>]) {
            self.int(STRSXP as i32);
            self.int(v.len() as i32);
            for s in v {
                let utf8 = s.is_some_and(|s| !s.is_ascii());
                self.charsxp(*s, utf8);
            }
        }
        /// `names` attribute pairlist; the second time, the symbol is a reference (as R writes it).
        fn names_attr(&mut self, names: &[&str]) {
            self.int((LISTSXP as u32 | HAS_TAG) as i32);
            if self.names_written {
                self.int(REFSXP as i32 | (1 << 8));
            } else {
                self.int(SYMSXP as i32);
                self.charsxp(Some("names"), false);
                self.names_written = true;
            }
            self.strsxp(&names.iter().map(|s| Some(*s)).collect::<Vec<_>>());
            self.int(NILVALUE_SXP as i32);
        }
        pub(crate) fn list_header(&mut self, n: usize, named: bool) {
            self.int((VECSXP as u32 | if named { HAS_ATTR } else { 0 }) as i32);
            self.int(n as i32);
        }
        pub(crate) fn list_names(&mut self, names: &[&str]) {
            self.names_attr(names);
        }
        pub(crate) fn intsxp(&mut self, v: &[i32]) {
            self.int(INTSXP as i32);
            self.int(v.len() as i32);
            for &x in v {
                self.int(x);
            }
        }
        pub(crate) fn lgl(&mut self, v: i32) {
            self.int(LGLSXP as i32);
            self.int(1);
            self.int(v);
        }
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Builds (rdb, rdx) bytes holding the given character vectors.
    pub(crate) fn build_db(vars: &[(&str, Vec<Option<&str>>)]) -> (Vec<u8>, Vec<u8>) {
        let mut rdb = Vec::new();
        let mut pos = Vec::new();
        for (_, lines) in vars {
            let mut w = W::header();
            w.strsxp(lines);
            let mut block = (w.buf.len() as u32).to_be_bytes().to_vec();
            block.extend(zlib(&w.buf));
            pos.push((rdb.len() as i32, block.len() as i32));
            rdb.extend(block);
        }
        let mut w = W::header();
        w.list_header(3, true);
        w.list_header(vars.len(), true);
        for &(o, l) in &pos {
            w.intsxp(&[o, l]);
        }
        w.list_names(&vars.iter().map(|(n, _)| *n).collect::<Vec<_>>());
        w.list_header(0, false);
        w.lgl(1);
        w.list_names(&["variables", "references", "compressed"]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&w.buf).unwrap();
        (rdb, gz.finish().unwrap())
    }

    #[test]
    fn reads_a_synthetic_lazy_load_db() {
        let vars = vec![
            ("emma", vec![Some("EMMA"), Some(""), Some("By Jane Austen")]),
            ("other", vec![Some("naïve café — “quoted”"), None, Some("last")]),
        ];
        let (rdb, rdx) = build_db(&vars);
        let got = read_character_vectors(&rdb, &rdx, Path::new("t.rdb"), Path::new("t.rdx")).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "emma");
        assert_eq!(got[0].1, vec!["EMMA", "", "By Jane Austen"]);
        assert_eq!(got[1].0, "other");
        assert_eq!(got[1].1, vec!["naïve café — “quoted”", "", "last"]);
    }

    #[test]
    fn index_also_reads_a_zlib_block_rdx() {
        let (_, rdx) = build_db(&[("a", vec![Some("x")])]);
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&rdx[..]).read_to_end(&mut raw).unwrap();
        let mut block = (raw.len() as u32).to_be_bytes().to_vec();
        block.extend(zlib(&raw));
        let idx = read_index(&block, Path::new("t.rdx")).unwrap();
        assert_eq!(idx.len(), 1);
        assert_eq!(idx[0].0, "a");
        assert_eq!(idx[0].1, 0);
    }

    #[test]
    fn latin1_strings_are_converted() {
        let mut w = W::header();
        w.int(STRSXP as i32);
        w.int(1);
        w.int(CHARSXP as i32 | ((LATIN1_MASK as i32) << 12));
        w.int(4);
        w.buf.extend_from_slice(&[b'c', b'a', b'f', 0xe9]);
        assert_eq!(
            unserialize(&w.buf, Path::new("x")).unwrap(),
            Sexp::Str(vec![Some("café".into())], vec![])
        );
    }

    #[test]
    fn errors_name_the_file_and_problem() {
        let e = unserialize(b"A\n1\n", Path::new("data/x.rdb")).unwrap_err().to_string();
        assert!(e.contains("data/x.rdb") && e.contains("ASCII"), "{e}");

        let mut w = W::header();
        w.int(STRSXP as i32);
        w.int(3);
        w.charsxp(Some("only one"), false);
        let e = unserialize(&w.buf, Path::new("y.rdb")).unwrap_err().to_string();
        assert!(e.contains("y.rdb") && e.contains("truncated"), "{e}");

        let mut w = W::header();
        w.int(4); // ENVSXP
        let e = unserialize(&w.buf, Path::new("z.rdb")).unwrap_err().to_string();
        assert!(e.contains("environment") && e.contains("not supported"), "{e}");

        let (mut rdb, rdx) = build_db(&[("a", vec![Some("x")])]);
        rdb.truncate(6);
        let e = read_character_vectors(&rdb, &rdx, Path::new("t.rdb"), Path::new("t.rdx"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.rdb") && e.contains("past the end"), "{e}");

        // A huge claimed length is refused before allocating.
        let mut w = W::header();
        w.int(INTSXP as i32);
        w.int(i32::MAX);
        let e = unserialize(&w.buf, Path::new("big.rdb")).unwrap_err().to_string();
        assert!(e.contains("larger than the data left"), "{e}");
    }
}
