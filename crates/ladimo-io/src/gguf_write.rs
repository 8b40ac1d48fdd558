//! Writing GGUF files (llama.cpp's format, version 3): typed metadata, then tensors stored as
//! F32, F16 or Q8_0, each aligned to [`ALIGNMENT`] bytes.
//!
//! Tensors are given in PyTorch layout (`[out, in]`, experts stacked first: `[experts, out,
//! in]`); GGUF lists dimensions innermost first, so the writer reverses them. Which names and
//! metadata keys an architecture needs is the caller's business (`ladimo_moe::export`); this
//! module only knows the file format. The file is written under a temporary name and renamed.

use std::io::Write;
use std::path::Path;

use half::f16;

use crate::error::Result;
use crate::tensor::HostTensor;

/// Tensor data alignment in the file (GGUF's default, `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// Values per Q8_0 block (one f16 scale and 32 signed bytes).
pub const Q8_0_BLOCK: usize = 32;

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
}

impl GgmlType {
    /// The type id in the GGUF tensor directory.
    fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
        }
    }

    /// `general.file_type` of a file whose large tensors are of this type (llama.cpp's
    /// `LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 7,
        }
    }

    fn encode(self, data: &[f32], out: &mut Vec<u8>) {
        match self {
            GgmlType::F32 => out.extend(data.iter().flat_map(|v| v.to_le_bytes())),
            GgmlType::F16 => out.extend(data.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes())),
            GgmlType::Q8_0 => {
                // llama.cpp's reference quantizer: d = max|x| / 127, q = round(x / d).
                for block in data.chunks_exact(Q8_0_BLOCK) {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
                }
            }
        }
    }
}

/// A metadata value, with the GGUF type llama.cpp expects for it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::StrArray(_) | MetaValue::I32Array(_) => 9,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            MetaValue::U32(v) => out.extend(v.to_le_bytes()),
            MetaValue::I32(v) => out.extend(v.to_le_bytes()),
            MetaValue::F32(v) => out.extend(v.to_le_bytes()),
            MetaValue::Bool(v) => out.push(*v as u8),
            MetaValue::Str(s) => put_str(out, s),
            MetaValue::StrArray(a) => {
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|s| put_str(out, s));
            }
            MetaValue::I32Array(a) => {
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                a.iter().for_each(|v| out.extend(v.to_le_bytes()));
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF file being assembled in memory (metadata in insertion order, tensors in order).
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set a metadata key (a second call with the same key replaces the value).
    pub fn set(&mut self, key: impl Into<String>, value: MetaValue) {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    /// Add a tensor (PyTorch layout), encoded now as `ty`. Q8_0 needs the innermost dimension to
    /// be a multiple of 32; the error says so (callers fall back to F16 for such tensors, as
    /// llama.cpp's converter does).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        t: &HostTensor,
        ty: GgmlType,
    ) -> std::result::Result<(), String> {
        let name = name.into();
        let inner = t.shape.last().copied().unwrap_or(1);
        if ty == GgmlType::Q8_0 && !inner.is_multiple_of(Q8_0_BLOCK) {
            return Err(format!(
                "{name}: rows of {inner} values cannot be stored as Q8_0 (blocks of {Q8_0_BLOCK})"
            ));
        }
        let mut bytes = Vec::new();
        ty.encode(&t.data, &mut bytes);
        self.tensors.push((name, t.shape.clone(), ty, bytes));
        Ok(())
    }

    /// Write the file through [`crate::atomic::write_atomic_with`] (a temporary name, then renamed
    /// to `path`).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut head = Vec::new();
        head.extend(b"GGUF");
        head.extend(3u32.to_le_bytes());
        head.extend((self.tensors.len() as u64).to_le_bytes());
        head.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend(v.type_id().to_le_bytes());
            v.encode(&mut head);
        }
        let mut offset = 0usize;
        for (name, shape, ty, bytes) in &self.tensors {
            put_str(&mut head, name);
            head.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                head.extend((*d as u64).to_le_bytes());
            }
            head.extend(ty.id().to_le_bytes());
            head.extend((offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(ALIGNMENT);
        }
        head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
        crate::atomic::write_atomic_with(path, |w| {
            w.write_all(&head)?;
            for (_, _, _, bytes) in &self.tensors {
                w.write_all(bytes)?;
                let pad = bytes.len().next_multiple_of(ALIGNMENT) - bytes.len();
                w.write_all(&vec![0u8; pad])?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GgufFile;

    #[test]
    fn written_tensors_and_metadata_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.set("general.architecture", MetaValue::Str("llama".into()));
        w.set("llama.block_count", MetaValue::U32(2));
        w.set(
            "tokenizer.ggml.tokens",
            MetaValue::StrArray(vec!["a".into(), "b".into()]),
        );
        let vals: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let t = HostTensor::new(vec![2, 32], vals.clone());
        w.add_tensor("f32", &t, GgmlType::F32).unwrap();
        w.add_tensor("f16", &t, GgmlType::F16).unwrap();
        w.add_tensor("q8", &t, GgmlType::Q8_0).unwrap();
        let odd = HostTensor::new(vec![3, 3], vec![0.5; 9]);
        assert!(
            w.add_tensor("odd", &odd, GgmlType::Q8_0)
                .unwrap_err()
                .contains("cannot be stored as Q8_0")
        );
        w.add_tensor("odd", &odd, GgmlType::F32).unwrap();
        w.write(&path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get("llama.block_count").and_then(|v| v.as_i64()), Some(2));
        assert_eq!(
            f.get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len()),
            Some(2)
        );
        assert_eq!(f.load_raw("f32").unwrap(), t);
        let err = |name: &str| {
            let r = f.load_raw(name).unwrap();
            assert_eq!(r.shape, vec![2, 32]);
            r.data
                .iter()
                .zip(&vals)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        assert!(err("f16") < 3e-3, "{}", err("f16"));
        // Q8_0: half a step of max|x| / 127 per block.
        assert!(err("q8") < 4.5 / 127.0 / 2.0 + 1e-3, "{}", err("q8"));
        assert_eq!(f.load_raw("odd").unwrap(), odd);
    }
}
