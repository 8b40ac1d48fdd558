//! Hugging Face safetensors directories: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. The header is parsed here (not by the safetensors crate) so that
//! every problem can be reported with the file and the tensor it concerns.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value;

use crate::checkpoint::{TensorInfo, WeightSource};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

struct Entry {
    shard: usize,
    info: TensorInfo,
    /// Byte range inside the shard's mmap (absolute).
    start: usize,
    end: usize,
    /// Set when the header names a dtype we cannot read; reported when the tensor is loaded.
    bad_dtype: Option<String>,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

pub struct HfWeights {
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    order: Vec<String>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only and we never write through the map; a concurrent
    // writer truncating the file is outside what any reader can defend against.
    unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

fn dtype_of(s: &str) -> Option<(DType, usize)> {
    match s {
        "F32" => Some((DType::F32, 4)),
        "F16" => Some((DType::F16, 2)),
        "BF16" => Some((DType::BF16, 2)),
        _ => None,
    }
}

impl HfWeights {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
            let mut names: Vec<String> = map
                .values()
                .map(|f| {
                    f.as_str()
                        .map(String::from)
                        .ok_or_else(|| Error::format(&index, format!("`weight_map` value {f} is not a file name")))
                })
                .collect::<Result<_>>()?;
            names.sort();
            names.dedup();
            for n in &names {
                // Shards live in the model's own folder: a path (`../x`, `/etc/x`, `a/b`) is refused.
                let plain = Path::new(n).file_name().is_some_and(|f| f == n.as_str()) && n != "." && n != "..";
                if !plain {
                    return Err(Error::format(
                        &index,
                        format!("`weight_map` names shard {n:?}, which is not a file name in the model's folder"),
                    ));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        let mut order = Vec::new();
        for (i, path) in files.into_iter().enumerate() {
            let map = map_file(&path)?;
            for e in parse_header(&path, &map, i)? {
                order.push(e.info.name.clone());
                entries.insert(e.info.name.clone(), e);
            }
            shards.push(Shard { path, map });
        }
        Ok(Self { shards, entries, order })
    }
}

fn parse_header(path: &Path, bytes: &[u8], shard: usize) -> Result<Vec<Entry>> {
    let len = bytes.len();
    if len < 8 {
        return Err(Error::format(
            path,
            format!("truncated: {len} bytes, too short for a safetensors header"),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > (len as u64 - 8) {
        return Err(Error::format(
            path,
            format!(
                "safetensors header length {n} is longer than the file ({len} bytes): truncated or not safetensors"
            ),
        ));
    }
    let n = n as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| Error::format(path, format!("safetensors header is not valid JSON: {e}")))?;
    let base = 8 + n;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |msg: &str| Error::tensor(path, &name, msg.to_string());
        let dtype_s = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype in header"))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape in header"))?
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of integers"))?;
        let offs: Vec<usize> = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect())
            .unwrap_or_default();
        if offs.len() != 2 || offs[1] < offs[0] {
            return Err(bad("data_offsets must be [begin, end]"));
        }
        let end = match base.checked_add(offs[1]) {
            Some(end) if end <= len => end,
            _ => {
                return Err(Error::tensor(
                    path,
                    &name,
                    format!(
                        "data ends at byte {base} + {}, past the end of the file ({len} bytes): truncated",
                        offs[1]
                    ),
                ));
            }
        };
        let start = base + offs[0];
        let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let (dtype, bad_dtype) = match dtype_of(dtype_s) {
            Some((d, size)) => {
                if numel.and_then(|n| n.checked_mul(size)) != Some(end - start) {
                    return Err(Error::tensor(
                        path,
                        &name,
                        format!("{} bytes of data for shape {shape:?} of {dtype_s}", end - start),
                    ));
                }
                (d, None)
            }
            None => (DType::F32, Some(dtype_s.to_string())),
        };
        out.push(Entry {
            shard,
            info: TensorInfo { name, shape, dtype },
            start,
            end,
            bad_dtype,
        });
    }
    Ok(out)
}

impl WeightSource for HfWeights {
    fn infos(&self) -> Vec<TensorInfo> {
        self.order.iter().map(|n| self.entries[n].info.clone()).collect()
    }

    fn file_of(&self, name: &str) -> PathBuf {
        match self.entries.get(name) {
            Some(e) => self.shards[e.shard].path.clone(),
            None => self.shards.first().map(|s| s.path.clone()).unwrap_or_default(),
        }
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::tensor(&self.file_of(name), name, "missing from the checkpoint"))?;
        let shard = &self.shards[e.shard];
        if let Some(d) = &e.bad_dtype {
            return Err(Error::tensor(
                &shard.path,
                name,
                format!("unsupported dtype `{d}` (supported: F32, F16, BF16)"),
            ));
        }
        let raw = &shard.map[e.start..e.end];
        let data: Vec<f32> = match e.info.dtype {
            DType::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F16 => raw
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => unreachable!("safetensors entries are never {other}"),
        };
        Ok(HostTensor::new(e.info.shape.clone(), data))
    }
}
