//! GGUF files (llama.cpp's format): metadata, tensor directory, and dequantization of
//! F32, F16, BF16, Q8_0, Q4_0 and Q4_1 to f32. Tensors are exposed under Hugging Face names, in
//! PyTorch layout, with the Q/K row permutation that llama.cpp's converter applies undone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::checkpoint::{TensorInfo, WeightSource};
use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            GgufValue::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::Float(f) => Some(*f),
            GgufValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short rendering for `inspect` (arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            GgufValue::Int(i) => i.to_string(),
            GgufValue::Float(f) => f.to_string(),
            GgufValue::Bool(b) => b.to_string(),
            GgufValue::Str(s) if s.len() > 60 => format!("{:?}...", &s[..s.floor_char_boundary(60)]),
            GgufValue::Str(s) => format!("{s:?}"),
            GgufValue::Array(a) => format!("[{} items]", a.len()),
        }
    }
}

/// One entry of the tensor directory, as stored (GGUF name, ne0-first dims).
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub ggml_type: u32,
    pub offset: usize,
}

/// The largest size (width, count, length) a GGUF's model metadata may give.
const MAX_SIZE: usize = u32::MAX as usize;

/// The largest `general.alignment` accepted (llama.cpp writes 32).
const MAX_ALIGNMENT: i64 = 1 << 20;

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
    data_start: usize,
    map: Mmap,
}

/// Bytes per block and values per block of each ggml type we know, with its name.
fn ggml_type(t: u32) -> (&'static str, Option<(DType, usize, usize)>) {
    match t {
        0 => ("F32", Some((DType::F32, 4, 1))),
        1 => ("F16", Some((DType::F16, 2, 1))),
        2 => ("Q4_0", Some((DType::Q4_0, 18, 32))),
        3 => ("Q4_1", Some((DType::Q4_1, 20, 32))),
        6 => ("Q5_0", None),
        7 => ("Q5_1", None),
        8 => ("Q8_0", Some((DType::Q8_0, 34, 32))),
        9 => ("Q8_1", None),
        10 => ("Q2_K", None),
        11 => ("Q3_K", None),
        12 => ("Q4_K", None),
        13 => ("Q5_K", None),
        14 => ("Q6_K", None),
        15 => ("Q8_K", None),
        16..=23 | 29 => ("IQ*", None),
        24 => ("I8", None),
        25 => ("I16", None),
        26 => ("I32", None),
        27 => ("I64", None),
        28 => ("F64", None),
        30 => ("BF16", Some((DType::BF16, 2, 1))),
        34 => ("TQ1_0", None),
        35 => ("TQ2_0", None),
        39 => ("MXFP4", None),
        _ => ("unknown", None),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    format!(
                        "truncated: needs {n} bytes at offset {} but the file has {}",
                        self.pos,
                        self.bytes.len()
                    ),
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::format(self.path, format!("string at offset {} is not UTF-8", self.pos - n)))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::Int(self.take(1)?[0] as i64),
            1 => GgufValue::Int(self.take(1)?[0] as i8 as i64),
            2 => GgufValue::Int(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            3 => GgufValue::Int(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => GgufValue::Int(self.u32()? as i64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(self.path, "metadata arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                // Every item takes at least one byte (a string or an array at least 8): a count
                // the rest of the file cannot hold is refused before anything is allocated.
                let min_item = match inner {
                    8 | 9 => 8,
                    _ => 1,
                };
                if n > (self.left() / min_item) as u64 {
                    return Err(Error::format(
                        self.path,
                        format!(
                            "metadata array of {n} items at offset {} does not fit in the {} bytes left in the file",
                            self.pos,
                            self.left()
                        ),
                    ));
                }
                let n = n as usize;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::Int(self.u64()? as i64),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            t => return Err(Error::format(self.path, format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map of a file we do not modify.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let mut r = Reader {
            bytes: &map,
            pos: 0,
            path,
        };
        let magic = r
            .take(4)
            .map_err(|_| Error::format(path, "not a GGUF file: shorter than 4 bytes"))?;
        if magic != b"GGUF" {
            return Err(Error::format(
                path,
                format!(
                    "not a GGUF file: bad magic {:?} (expected \"GGUF\")",
                    String::from_utf8_lossy(magic)
                ),
            ));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(
                path,
                format!("GGUF version {version} (supported: 2 and 3)"),
            ));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // A metadata entry takes at least 13 bytes (key length, type, one byte of value) and a
        // tensor entry at least 24 (name length, dimension count, type, offset).
        if n_kv.saturating_mul(13).saturating_add(n_tensors.saturating_mul(24)) > r.left() as u64 {
            return Err(Error::format(
                path,
                format!(
                    "truncated or corrupt: header claims {n_tensors} tensors and {n_kv} metadata keys, more than the {} bytes of the file can hold",
                    r.bytes.len()
                ),
            ));
        }
        let (n_tensors, n_kv) = (n_tensors as usize, n_kv as usize);
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd > 4 {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!("{nd} dimensions (GGUF allows at most 4)"),
                ));
            }
            let dims = (0..nd)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()? as usize;
            tensors.push(GgufTensor {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_i64)
            .unwrap_or(32);
        if !(1..=MAX_ALIGNMENT).contains(&align) || (align as u64).count_ones() != 1 {
            return Err(Error::format(
                path,
                format!("general.alignment = {align}: expected a power of two up to {MAX_ALIGNMENT}"),
            ));
        }
        let align = align as usize;
        let data_start = r.pos.div_ceil(align) * align;
        let file = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            map,
        };
        for t in &file.tensors {
            file.byte_range(t)?;
        }
        Ok(file)
    }

    /// Byte range of a tensor's data; checks the type is known and the data lies inside the file.
    fn byte_range(&self, t: &GgufTensor) -> Result<(usize, usize)> {
        let (tname, known) = ggml_type(t.ggml_type);
        let past_end = || {
            Error::tensor(
                &self.path,
                &t.name,
                format!(
                    "data at offset {} with dimensions {:?} does not fit in the file ({} bytes): truncated or corrupt",
                    t.offset,
                    t.dims,
                    self.map.len()
                ),
            )
        };
        let start = self.data_start.checked_add(t.offset).ok_or_else(past_end)?;
        let Some((_, block_bytes, block_len)) = known else {
            // Size unknown: we can only check the start. Loading it will fail with a clear error.
            let _ = tname;
            return Ok((start, start));
        };
        let numel = t
            .dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(past_end)?;
        if !numel.is_multiple_of(block_len) {
            return Err(Error::tensor(
                &self.path,
                &t.name,
                format!("{numel} values is not a whole number of {tname} blocks"),
            ));
        }
        let end = (numel / block_len)
            .checked_mul(block_bytes)
            .and_then(|n| start.checked_add(n))
            .ok_or_else(past_end)?;
        if end > self.map.len() {
            return Err(Error::tensor(
                &self.path,
                &t.name,
                format!(
                    "data ends at byte {end}, past the end of the file ({} bytes): truncated",
                    self.map.len()
                ),
            ));
        }
        Ok((start, end))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn arch(&self) -> &str {
        self.get("general.architecture")
            .and_then(GgufValue::as_str)
            .unwrap_or("")
    }

    fn need(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| Error::format(&self.path, format!("missing metadata key `{key}`")))
    }

    /// The model config implied by the GGUF metadata (llama architecture).
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.arch();
        if arch != "llama" {
            return Err(Error::unsupported(
                &self.path,
                format!("GGUF architecture `{arch}` (supported: llama)"),
            ));
        }
        let int = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            let v = self.need(&key)?;
            v.as_i64()
                .ok_or_else(|| Error::format(&self.path, format!("metadata `{key}` is not an integer")))
                .and_then(|x| {
                    usize::try_from(x).ok().filter(|&x| x <= MAX_SIZE).ok_or_else(|| {
                        Error::format(
                            &self.path,
                            format!("metadata `{key}` = {x}: expected a size between 0 and {MAX_SIZE}"),
                        )
                    })
                })
        };
        let float = |k: &str| self.get(&format!("{arch}.{k}")).and_then(GgufValue::as_f64);
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = int("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => self
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len())
                .ok_or_else(|| Error::format(&self.path, "no vocab_size and no tokenizer.ggml.tokens"))?,
        };
        let has = |n: &str| self.tensors.iter().any(|t| t.name == n);
        let rope_scaling = if has("rope_freqs.weight") {
            let t = self.load_raw("rope_freqs.weight")?;
            Some(RopeScaling::Factors(t.data.iter().map(|&x| x as f64).collect()))
        } else {
            match self
                .get(&format!("{arch}.rope.scaling.type"))
                .and_then(GgufValue::as_str)
            {
                Some("linear") => Some(RopeScaling::Linear {
                    factor: float("rope.scaling.factor").unwrap_or(1.0),
                }),
                None | Some("none") => None,
                Some(other) => {
                    return Err(Error::unsupported(&self.path, format!("rope scaling type `{other}`")));
                }
            }
        };
        let tok = |k: &str| self.get(k).and_then(GgufValue::as_i64).map(|x| x as u32);
        Ok(ModelConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: int("context_length").unwrap_or(2048),
            tie_word_embeddings: !has("output.weight"),
            attention_bias: has("blk.0.attn_q.bias"),
            mlp_bias: has("blk.0.ffn_up.bias"),
            embedding_multiplier: 1.0,
            attention_multiplier: 1.0 / (head_dim as f64).sqrt(),
            residual_multiplier: 1.0,
            logits_scaling: 1.0,
            use_post_norm: false,
            bos_token_id: tok("tokenizer.ggml.bos_token_id"),
            eos_token_ids: tok("tokenizer.ggml.eos_token_id").into_iter().collect(),
        })
    }

    /// Dequantize one tensor by its GGUF name, in PyTorch layout (dims reversed), without renaming.
    pub fn load_raw(&self, gguf_name: &str) -> Result<HostTensor> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == gguf_name)
            .ok_or_else(|| Error::tensor(&self.path, gguf_name, "missing from the GGUF file"))?;
        let (tname, known) = ggml_type(t.ggml_type);
        let Some((dtype, _, _)) = known else {
            return Err(Error::tensor(
                &self.path,
                gguf_name,
                format!(
                    "unsupported quantization {tname} (ggml type {}); supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1. \
                     Re-quantize the model to one of those, or convert it from the original weights",
                    t.ggml_type
                ),
            ));
        };
        let (start, end) = self.byte_range(t)?;
        let raw = &self.map[start..end];
        let data = dequantize(dtype, raw);
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        Ok(HostTensor::new(shape, data))
    }

    pub fn into_weights(self) -> GgufWeights {
        let cfg = self.model_config().ok();
        GgufWeights {
            heads: cfg.as_ref().map(|c| (c.num_heads, c.num_kv_heads)),
            file: self,
        }
    }
}

fn dequantize(dtype: DType, raw: &[u8]) -> Vec<f32> {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    match dtype {
        DType::F32 => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::F16 => raw.chunks_exact(2).map(h).collect(),
        DType::BF16 => raw
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::Q8_0 => {
            let mut out = Vec::with_capacity(raw.len() / 34 * 32);
            for b in raw.chunks_exact(34) {
                let d = h(&b[0..2]);
                out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
            }
            out
        }
        DType::Q4_0 | DType::Q4_1 => {
            let (bs, has_min) = if dtype == DType::Q4_0 { (18, false) } else { (20, true) };
            let mut out = vec![0f32; raw.len() / bs * 32];
            for (b, o) in raw.chunks_exact(bs).zip(out.chunks_exact_mut(32)) {
                let d = h(&b[0..2]);
                let (m, qs) = if has_min {
                    (h(&b[2..4]), &b[4..20])
                } else {
                    (-8.0 * d, &b[2..18])
                };
                for j in 0..16 {
                    o[j] = (qs[j] & 0x0f) as f32 * d + m;
                    o[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
            out
        }
    }
}

/// GGUF name -> Hugging Face name, for the llama layout.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's `permute(w, n_head)`: GGUF row `h*hd + 2i + j` holds HF row `h*hd + j*hd/2 + i`.
/// Refuses (with the reason) a tensor whose rows are not `n_head` heads of an even size.
fn unpermute_rows(t: &mut HostTensor, n_head: usize) -> std::result::Result<(), String> {
    let rows = t.shape.first().copied().unwrap_or(0);
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows are not {n_head} heads of an even size, as the RoPE un-permutation needs (shape {:?})",
            t.shape
        ));
    }
    let cols: usize = t.shape[1..].iter().product();
    let hd = rows / n_head;
    let half = hd / 2;
    let src = t.data.clone();
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let from = h * hd + 2 * i + j;
                let to = h * hd + j * half + i;
                t.data[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(())
}

/// A GGUF file seen as a [`WeightSource`] with Hugging Face names.
pub struct GgufWeights {
    file: GgufFile,
    heads: Option<(usize, usize)>,
}

impl WeightSource for GgufWeights {
    fn infos(&self) -> Vec<TensorInfo> {
        self.file
            .tensors
            .iter()
            .filter_map(|t| {
                let name = hf_name(&t.name)?;
                let dtype = ggml_type(t.ggml_type).1.map(|k| k.0).unwrap_or(DType::F32);
                Some(TensorInfo {
                    name,
                    shape: t.dims.iter().rev().copied().collect(),
                    dtype,
                })
            })
            .collect()
    }

    fn file_of(&self, _name: &str) -> PathBuf {
        self.file.path.clone()
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let gguf = self
            .file
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .find(|g| hf_name(g).as_deref() == Some(name))
            .ok_or_else(|| Error::tensor(&self.file.path, name, "missing from the GGUF file"))?
            .to_string();
        let mut t = self.file.load_raw(&gguf)?;
        if let Some((nh, nkv)) = self.heads {
            let heads = if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
                Some(nh)
            } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") {
                Some(nkv)
            } else {
                None
            };
            if let Some(heads) = heads {
                unpermute_rows(&mut t, heads).map_err(|msg| Error::tensor(&self.file.path, &gguf, msg))?;
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, hd, cols) = (3, 8, 2);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0f32; rows * cols];
        for h in 0..n_head {
            for a in 0..2 {
                for i in 0..hd / 2 {
                    // permuted index order (h, i, a)
                    let to = h * hd + i * 2 + a;
                    let from = h * hd + a * hd / 2 + i;
                    gguf[to * cols..(to + 1) * cols].copy_from_slice(&hf[from * cols..(from + 1) * cols]);
                }
            }
        }
        let mut t = HostTensor::new(vec![rows, cols], gguf);
        unpermute_rows(&mut t, n_head).unwrap();
        assert_eq!(t.data, hf);
    }

    #[test]
    fn q4_1_block() {
        // d = 0.5, m = -1.0, qs[j] = lo j%16, hi 15 - j%16
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let v = dequantize(DType::Q4_1, &b);
        assert_eq!(v[3], 3.0 * 0.5 - 1.0);
        assert_eq!(v[16 + 3], 12.0 * 0.5 - 1.0);
    }

    #[test]
    fn q8_0_and_q4_0_blocks() {
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.25).to_le_bytes());
        b.extend((0..32).map(|i: i32| (i - 16) as i8 as u8));
        let v = dequantize(DType::Q8_0, &b);
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 15.0 * 0.25);
        let mut b = Vec::new();
        b.extend(f16::from_f32(2.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | (j << 4)));
        let v = dequantize(DType::Q4_0, &b);
        assert_eq!(v[0], -16.0);
        assert_eq!(v[16 + 15], 14.0);
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").unwrap(),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
