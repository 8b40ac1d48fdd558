//! Decode on the host: the whole decoder step for one to a few tokens of one sequence, without
//! burn.
//!
//! At one token per step every weight is read once for two flops, and a tensor library spends
//! about as long dispatching its ~20 ops per layer as the layer's arithmetic takes. Here a layer
//! is three matrix-vector products (fused q/k/v, o, and the FFN's kernel), RMS norms, RoPE and
//! attention over a host KV cache, with the weights in 32 or 16 bits
//! ([`ladimo_kernel::Dtype`]) and f32 accumulation; the LM head is one more matrix-vector
//! product, for the last token only. It computes the same function as the burn path
//! ([`crate::Transformer::forward_hidden`]) on the same (rounded) weights.

use burn::nn::{Linear, RmsNorm};
use ladimo_kernel::{Dtype, Isa, Matrix};
use rayon::prelude::*;

use crate::ffn::{FfnError, transpose_vec};
use crate::llama::{DecoderLayer, Transformer};
use crate::util::to_vec;

/// One layer's keys and values on the host, `[positions, kv_heads * head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct HostKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

#[derive(Debug)]
struct HostLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    post_norm1: Option<Vec<f32>>,
    post_norm2: Option<Vec<f32>>,
    /// q, k and v stacked: `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    qkv: Matrix,
    qkv_bias: Option<Vec<f32>>,
    o: Matrix,
    o_bias: Option<Vec<f32>>,
}

/// The host-side copy of a model's attention, norms and head (the FFNs keep their own kernels).
#[derive(Debug)]
pub struct HostDecoder {
    pub dtype: Dtype,
    layers: Vec<HostLayer>,
    norm: Vec<f32>,
    /// `[vocab, hidden]`.
    head: Matrix,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Up to this many new tokens, `forward_hidden` / `forward_last` of a batch of one take this
    /// path (measured by [`Transformer::prepare_host_decode`]; 0: never).
    pub max_tokens: usize,
}

/// `[out, in]` (PyTorch layout) of a burn `Linear` (stored `[in, out]`).
fn rows_of(l: &Linear) -> (Vec<f32>, usize, usize) {
    let [i, o] = l.weight.dims();
    (transpose_vec(&to_vec(l.weight.val()), i, o), o, i)
}

fn bias_of(l: &Linear) -> Option<Vec<f32>> {
    l.bias.as_ref().map(|b| to_vec(b.val()))
}

fn norm_of(n: &RmsNorm) -> Vec<f32> {
    to_vec(n.gamma.val())
}

impl HostDecoder {
    /// Copy `model`'s attention, norms and head into host matrices of `dtype`.
    pub fn new(model: &Transformer, dtype: Dtype) -> Self {
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let (mut qkv, mut rows, mut cols) = (Vec::new(), 0, 0);
                for p in [&a.q_proj, &a.k_proj, &a.v_proj] {
                    let (d, o, i) = rows_of(p);
                    qkv.extend(d);
                    rows += o;
                    cols = i;
                }
                let qkv_bias = a.q_proj.bias.as_ref().map(|_| {
                    [&a.q_proj, &a.k_proj, &a.v_proj]
                        .iter()
                        .flat_map(|p| bias_of(p).unwrap_or_else(|| vec![0.0; p.weight.dims()[1]]))
                        .collect()
                });
                let (o, orows, ocols) = rows_of(&a.o_proj);
                HostLayer {
                    input_norm: norm_of(&l.input_layernorm),
                    post_attention_norm: norm_of(&l.post_attention_layernorm),
                    post_norm1: l.post_norm1.as_ref().map(norm_of),
                    post_norm2: l.post_norm2.as_ref().map(norm_of),
                    qkv: Matrix::new(rows, cols, &qkv, dtype),
                    qkv_bias,
                    o: Matrix::new(orows, ocols, &o, dtype),
                    o_bias: bias_of(&a.o_proj),
                }
            })
            .collect();
        let (h, v) = (model.config.hidden_size, model.config.vocab_size);
        let (cos, sin) = model.rope.host_tables();
        Self {
            dtype,
            layers,
            norm: norm_of(&model.norm),
            head: Matrix::transposed(v, h, &to_vec(model.lm_head.clone()), dtype),
            cos,
            sin,
            max_tokens: 0,
        }
    }

    /// Bytes of weights this path reads per token outside the FFNs (attention and head).
    pub fn bytes(&self) -> usize {
        self.head.bytes() + self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes()).sum::<usize>()
    }

    /// Final hidden states (after the last norm), `[n, hidden]`, of `ids` following the cached
    /// positions; appends to `kv` (one entry per layer).
    pub fn forward_hidden(&self, model: &Transformer, ids: &[u32], kv: &mut [HostKv]) -> Result<Vec<f32>, FfnError> {
        // The whole step runs on one of rayon's threads: each kernel's parallel split is then a
        // join inside the pool (the other thread, still looking for work between two kernels,
        // takes its half), not a job sent in from outside with the caller asleep until it is
        // done, which costs two wake-ups per kernel, about 150 kernels per token.
        rayon::scope(|_| self.step(model, ids, kv))
    }

    fn step(&self, model: &Transformer, ids: &[u32], kv: &mut [HostKv]) -> Result<Vec<f32>, FfnError> {
        let cfg = &model.config;
        let n = ids.len();
        let hd = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let ids_t = crate::util::ids_tensor(ids, 1, &model.device);
        let mut h = to_vec(model.embed(ids_t));
        let rm = cfg.residual_multiplier as f32;
        for ((hl, layer), kv) in self.layers.iter().zip(&model.layers).zip(kv.iter_mut()) {
            let x = rms_norm(&h, &hl.input_norm, eps);
            let mut a = self.attention(hl, layer, &x, n, kv, model);
            if let Some(g) = &hl.post_norm1 {
                a = rms_norm(&a, g, eps);
            }
            add_scaled(&mut h, &a, rm);
            let x = rms_norm(&h, &hl.post_attention_norm, eps);
            let mut f = match layer.ffn.forward_host(&x, n) {
                Some(r) => r?,
                None => {
                    let t = burn::tensor::Tensor::<3>::from_data(
                        burn::tensor::TensorData::new(x, [1, n, hd]),
                        &model.device,
                    );
                    to_vec(layer.ffn.forward(t)?)
                }
            };
            if let Some(g) = &hl.post_norm2 {
                f = rms_norm(&f, g, eps);
            }
            add_scaled(&mut h, &f, rm);
        }
        Ok(rms_norm(&h, &self.norm, eps))
    }

    /// Logits of one final hidden state (`[hidden]` -> `[vocab]`).
    pub fn logits(&self, hidden: &[f32], scaling: f64) -> Vec<f32> {
        let mut y = vec![0f32; self.head.rows];
        rayon::scope(|_| self.head.matvec(hidden, 1, &mut y));
        if scaling != 1.0 {
            y.iter_mut().for_each(|v| *v *= scaling as f32);
        }
        y
    }

    /// Self-attention of `n` new tokens (`x: [n, hidden]`, normed), extending `kv`.
    fn attention(
        &self,
        hl: &HostLayer,
        layer: &DecoderLayer,
        x: &[f32],
        n: usize,
        kv: &mut HostKv,
        model: &Transformer,
    ) -> Vec<f32> {
        let (nh, nkv, hdim) = layer.self_attn.heads();
        let (qd, kvd) = (nh * hdim, nkv * hdim);
        let width = qd + 2 * kvd;
        let mut qkv = vec![0f32; n * width];
        hl.qkv.matvec(x, n, &mut qkv);
        if let Some(b) = &hl.qkv_bias {
            for row in qkv.chunks_mut(width) {
                add_scaled(row, b, 1.0);
            }
        }
        let offset = kv.k.len() / kvd;
        let half = hdim / 2;
        assert!(
            offset + n <= model.rope.max_positions,
            "position {} is beyond the RoPE table ({} positions)",
            offset + n,
            model.rope.max_positions
        );
        for (t, row) in qkv.chunks_mut(width).enumerate() {
            let pos = offset + t;
            let (cos, sin) = (
                &self.cos[pos * half..(pos + 1) * half],
                &self.sin[pos * half..(pos + 1) * half],
            );
            for head in row[..qd + kvd].chunks_mut(hdim) {
                for i in 0..half {
                    let (x1, x2) = (head[i], head[i + half]);
                    head[i] = x1 * cos[i] - x2 * sin[i];
                    head[i + half] = x2 * cos[i] + x1 * sin[i];
                }
            }
            kv.k.extend_from_slice(&row[qd..qd + kvd]);
            kv.v.extend_from_slice(&row[qd + kvd..]);
        }
        let rep = nh / nkv;
        let scale = layer.self_attn.scale() as f32;
        let isa = Isa::get();
        let mut out = vec![0f32; n * qd];
        let (keys, values) = (&kv.k, &kv.v);
        out.par_chunks_mut(hdim)
            .enumerate()
            .for_each_init(Vec::new, |scores, (c, o)| {
                let (t, head) = (c / nh, c % nh);
                let q = &qkv[t * width + head * hdim..t * width + (head + 1) * hdim];
                let seen = offset + t + 1;
                ladimo_kernel::attend(isa, q, keys, values, kvd, (head / rep) * hdim, seen, scale, scores, o);
            });
        let d = hl.o.rows;
        let mut y = vec![0f32; n * d];
        hl.o.matvec(&out, n, &mut y);
        if let Some(b) = &hl.o_bias {
            for row in y.chunks_mut(d) {
                add_scaled(row, b, 1.0);
            }
        }
        y
    }
}

/// `x / sqrt(mean(x^2) + eps) * gamma`, per row of `gamma.len()`.
fn rms_norm(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(gamma.len()) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(gamma).map(|(v, g)| v * r * g));
    }
    out
}

/// `h += a * m`.
fn add_scaled(h: &mut [f32], a: &[f32], m: f32) {
    if m == 1.0 {
        h.iter_mut().zip(a).for_each(|(h, a)| *h += a);
    } else {
        h.iter_mut().zip(a).for_each(|(h, a)| *h += a * m);
    }
}
