//! Capture, from the dense teacher, each layer's FFN input and output on the calibration tokens.
//!
//! The teacher runs one window of `seq_len` tokens at a time, so memory holds one window of
//! activations whatever the token budget. Activations are appended to one file per layer and
//! direction (`layerNNN.x.f16`, `layerNNN.y.f16`: raw little-endian f16, `[tokens, hidden]`),
//! written under temporary names and renamed when complete, with `capture.json` last.
//!
//! Disk: `2 * tokens * hidden * 2 bytes` per layer. SmolLM2-135M (hidden 576, 30 layers) with
//! 100K tokens: 6.9 GB. A 7B LLaMA (hidden 4096, 32 layers) with 100K tokens: 52 GB; a run that
//! covers a range of layers only writes those.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::f16;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{ModelError, Transformer};
use serde::{Deserialize, Serialize};

use crate::DistillError;

/// What a capture holds; saved as `capture.json` once every file is complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureMeta {
    pub tokens: usize,
    pub hidden: usize,
    pub seq_len: usize,
    pub layers: Range<usize>,
    /// A hash of the token ids and the model's shape, so a stale capture is not reused.
    pub fingerprint: String,
    pub seconds: f64,
}

/// Key of the inputs of a capture: [`ladimo_io::hash::Hasher`] (the workspace's one content
/// hash) over the model's shape, the window length and the token ids, each as a `u64`.
pub fn fingerprint(model: &Transformer, tokens: &[u32], seq_len: usize) -> String {
    let mut h = ladimo_io::hash::Hasher::new();
    let c = &model.config;
    for v in [c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size, seq_len] {
        h.update((v as u64).to_le_bytes());
    }
    let ids: Vec<u8> = tokens.iter().flat_map(|&t| (t as u64).to_le_bytes()).collect();
    h.update(ids);
    h.short_hex()
}

pub fn layer_file(dir: &Path, layer: usize, which: &str) -> PathBuf {
    dir.join(format!("layer{layer:03}.{which}.f16"))
}

/// Run the teacher over `tokens` (windows of `seq_len`) and write layers `layers`' FFN inputs and
/// outputs into `dir`. Reuses a complete capture of the same inputs. `progress(done, total)`.
pub fn capture(
    model: &Transformer,
    tokens: &[u32],
    seq_len: usize,
    layers: Range<usize>,
    dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<CaptureMeta, DistillError> {
    let c = &model.config;
    if layers.is_empty() || layers.end > c.num_layers {
        return Err(DistillError::Invalid(format!(
            "layer range {layers:?} is outside the model's {} layers",
            c.num_layers
        )));
    }
    if tokens.len() < seq_len {
        return Err(DistillError::Invalid(format!(
            "{} calibration tokens are fewer than one sequence of {seq_len}",
            tokens.len()
        )));
    }
    let fp = fingerprint(model, tokens, seq_len);
    let meta_path = dir.join("capture.json");
    if let Ok(old) = read_meta(dir)
        && old.fingerprint == fp
        && old.layers.start <= layers.start
        && old.layers.end >= layers.end
    {
        tracing::info!("reusing the capture in {}", dir.display());
        return Ok(old);
    }
    std::fs::create_dir_all(dir).map_err(|e| DistillError::io(dir, e))?;
    let _ = std::fs::remove_file(&meta_path);
    let start = Instant::now();
    // Whole windows only: every captured token saw a full-length context window.
    let windows = tokens.len() / seq_len;
    let n = windows * seq_len;
    let mut writers = Vec::new();
    for l in layers.clone() {
        for which in ["x", "y"] {
            let tmp = layer_file(dir, l, which).with_extension("f16.part");
            let f = File::create(&tmp).map_err(|e| DistillError::io(&tmp, e))?;
            writers.push((tmp, BufWriter::with_capacity(1 << 20, f)));
        }
    }
    let device = &model.device;
    for w in 0..windows {
        let ids = &tokens[w * seq_len..(w + 1) * seq_len];
        let mut h = model.embed(ids_tensor(ids, 1, device));
        for (l, layer) in model.layers[..layers.end].iter().enumerate() {
            let (h_attn, x) = layer.attention_part(h, &model.rope, &mut None);
            let y = layer
                .ffn
                .forward(x.clone())
                .map_err(|source| ModelError::Ffn { layer: l, source })?;
            if layers.contains(&l) {
                let k = 2 * (l - layers.start);
                write_f16(&mut writers[k], to_vec(x))?;
                write_f16(&mut writers[k + 1], to_vec(y.clone()))?;
            }
            h = layer.ffn_residual(h_attn, y);
        }
        progress(w + 1, windows);
    }
    // Renamed by hand, not through ladimo_io::atomic: the streams of every layer are written side
    // by side, window after window, and each is renamed only when all windows are in.
    for (tmp, mut wr) in writers {
        wr.flush().map_err(|e| DistillError::io(&tmp, e))?;
        wr.get_ref().sync_all().map_err(|e| DistillError::io(&tmp, e))?;
        let done = tmp.with_extension("");
        std::fs::rename(&tmp, &done).map_err(|e| DistillError::io(&done, e))?;
    }
    let meta = CaptureMeta {
        tokens: n,
        hidden: c.hidden_size,
        seq_len,
        layers,
        fingerprint: fp,
        seconds: start.elapsed().as_secs_f64(),
    };
    ladimo_io::atomic::write_atomic(&meta_path, &serde_json::to_vec_pretty(&meta).unwrap())?;
    Ok(meta)
}

fn write_f16((path, w): &mut (PathBuf, BufWriter<File>), values: Vec<f32>) -> Result<(), DistillError> {
    let mut buf = Vec::with_capacity(values.len() * 2);
    for v in values {
        buf.extend_from_slice(&f16::from_f32(v).to_le_bytes());
    }
    w.write_all(&buf).map_err(|e| DistillError::io(path, e))
}

pub fn read_meta(dir: &Path) -> Result<CaptureMeta, DistillError> {
    let p = dir.join("capture.json");
    let text = std::fs::read_to_string(&p).map_err(|e| DistillError::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| DistillError::Invalid(format!("{}: {e}", p.display())))
}

/// One layer's captured FFN inputs and outputs, as f32 `[tokens, hidden]`.
pub fn load_layer(dir: &Path, meta: &CaptureMeta, layer: usize) -> Result<(Vec<f32>, Vec<f32>), DistillError> {
    let read = |which: &str| -> Result<Vec<f32>, DistillError> {
        let p = layer_file(dir, layer, which);
        let mut bytes = Vec::new();
        File::open(&p)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| DistillError::io(&p, e))?;
        if bytes.len() != meta.tokens * meta.hidden * 2 {
            return Err(DistillError::Invalid(format!(
                "{}: {} bytes, expected {} tokens x {} x f16",
                p.display(),
                bytes.len(),
                meta.tokens,
                meta.hidden
            )));
        }
        Ok(bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    };
    Ok((read("x")?, read("y")?))
}
