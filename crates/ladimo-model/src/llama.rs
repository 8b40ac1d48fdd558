//! The decoder: embeddings, N x (attention + feed-forward), final norm, LM head.
//!
//! ```text
//! h = embed(ids) * embedding_multiplier
//! for each layer:
//!     a = attention(rms_norm(h))            # GQA, RoPE, KV cache; scores scaled by attention_multiplier
//!     a = post_norm1(a)                     # Peri-LN (HyperCLOVA X with use_post_norm) only
//!     h = h + a * residual_multiplier
//!     f = ffn(rms_norm(h))                  # dense SwiGLU or an MoE block
//!     f = post_norm2(f)
//!     h = h + f * residual_multiplier
//! logits = lm_head(rms_norm(h)) * logits_scaling
//! ```
//! For LLaMA every multiplier is 1 and the attention scale is 1/sqrt(head_dim).

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{Device, Int, Tensor, TensorData, activation::softmax};
use ladimo_io::{Checkpoint, HostTensor, ModelConfig};

use crate::ffn::{DenseFfn, FeedForward};
use crate::rope::Rope;
use crate::util::{to_tensor, transpose_host};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Io(#[from] ladimo_io::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("layer {layer} feed-forward: {source}")]
    Ffn {
        layer: usize,
        #[source]
        source: crate::ffn::FfnError,
    },
}

fn linear(
    ckpt: &Checkpoint,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
    device: &Device,
) -> Result<Linear, ModelError> {
    let w = ckpt.load(&format!("{prefix}.weight"), &[out, inp])?;
    let b = if bias {
        Some(ckpt.load(&format!("{prefix}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(to_tensor(transpose_host(&w), device)),
        bias: b.map(|b| Param::from_tensor(to_tensor(b, device))),
    })
}

fn rms_norm(ckpt: &Checkpoint, name: &str, cfg: &ModelConfig, device: &Device) -> Result<RmsNorm, ModelError> {
    let w = ckpt.load(name, &[cfg.hidden_size])?;
    Ok(RmsNorm {
        gamma: Param::from_tensor(to_tensor(w, device)),
        epsilon: cfg.rms_norm_eps,
    })
}

/// Grouped-query self-attention.
#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn device(&self) -> Device {
        self.q_proj.weight.device()
    }

    /// `x: [batch, seq, hidden]`; `cache`: this layer's keys and values so far (`[b, kv_heads, t, hd]`).
    fn forward(&self, x: Tensor<3>, rope: &Rope, cache: &mut Option<(Tensor<4>, Tensor<4>)>) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = nh / nkv;
        let offset = cache.as_ref().map(|(k, _)| k.dims()[2]).unwrap_or(0);
        let q = self.q_proj.forward(x.clone()).reshape([b, s, nh, hd]).swap_dims(1, 2);
        let k = self.k_proj.forward(x.clone()).reshape([b, s, nkv, hd]).swap_dims(1, 2);
        let v = self.v_proj.forward(x).reshape([b, s, nkv, hd]).swap_dims(1, 2);
        let q = rope.apply(q, offset);
        let k = rope.apply(k, offset);
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        // Query heads that share a KV head are stacked along the sequence axis, so K and V are
        // used as they are (no copy per query head): [b, nkv, rep * s, hd].
        let q = q.reshape([b, nkv, rep * s, hd]);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(self.scale);
        let scores = if s > 1 {
            scores + causal_mask(rep, s, offset, &self.device())
        } else {
            scores
        };
        let probs = softmax(scores, 3);
        let out = probs
            .matmul(v)
            .reshape([b, nh, s, hd])
            .swap_dims(1, 2)
            .reshape([b, s, nh * hd]);
        self.o_proj.forward(out)
    }
}

/// Additive mask `[1, 1, rep * s, offset + s]`: query row `r * s + i` sees keys `0..=offset + i`.
fn causal_mask(rep: usize, s: usize, offset: usize, device: &Device) -> Tensor<4> {
    let t = offset + s;
    let mut m = vec![0f32; rep * s * t];
    for r in 0..rep {
        for i in 0..s {
            let row = &mut m[(r * s + i) * t..(r * s + i + 1) * t];
            row[offset + i + 1..].fill(f32::NEG_INFINITY);
        }
    }
    Tensor::<2>::from_data(TensorData::new(m, [rep * s, t]), device).unsqueeze::<4>()
}

/// One decoder layer.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    /// Peri-LN norms on the attention and FFN outputs (HyperCLOVA X `use_post_norm`).
    pub post_norm1: Option<RmsNorm>,
    pub post_norm2: Option<RmsNorm>,
    pub ffn: Box<dyn FeedForward>,
    residual_multiplier: f64,
}

impl DecoderLayer {
    /// The layer up to the FFN input: returns `(h_after_attention, ffn_input)`.
    pub fn attention_part(
        &self,
        h: Tensor<3>,
        rope: &Rope,
        cache: &mut Option<(Tensor<4>, Tensor<4>)>,
    ) -> (Tensor<3>, Tensor<3>) {
        let mut a = self
            .self_attn
            .forward(self.input_layernorm.forward(h.clone()), rope, cache);
        if let Some(n) = &self.post_norm1 {
            a = n.forward(a);
        }
        let h = h + scale(a, self.residual_multiplier);
        let x = self.post_attention_layernorm.forward(h.clone());
        (h, x)
    }

    /// Adds the FFN output `f` to the residual stream.
    pub fn ffn_residual(&self, h: Tensor<3>, mut f: Tensor<3>) -> Tensor<3> {
        if let Some(n) = &self.post_norm2 {
            f = n.forward(f);
        }
        h + scale(f, self.residual_multiplier)
    }

    pub fn forward(
        &self,
        h: Tensor<3>,
        rope: &Rope,
        cache: &mut Option<(Tensor<4>, Tensor<4>)>,
    ) -> Result<Tensor<3>, crate::ffn::FfnError> {
        let (h, x) = self.attention_part(h, rope, cache);
        let f = self.ffn.forward(x)?;
        Ok(self.ffn_residual(h, f))
    }
}

fn scale<const D: usize>(t: Tensor<D>, m: f64) -> Tensor<D> {
    if m == 1.0 { t } else { t.mul_scalar(m) }
}

/// Per-layer keys and values of everything processed so far.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This (batch-1) cache repeated `n` times along the batch axis: `n` sequences that share a
    /// prefix.
    pub fn repeat_batch(&self, n: usize) -> Self {
        Self {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    l.as_ref()
                        .map(|(k, v)| (k.clone().repeat_dim(0, n), v.clone().repeat_dim(0, n)))
                })
                .collect(),
        }
    }
}

/// A decoder-only language model.
#[derive(Debug)]
pub struct Transformer {
    pub config: ModelConfig,
    /// `[vocab, hidden]`.
    pub embed_tokens: Tensor<2>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `[hidden, vocab]` (a transposed copy of the embeddings when they are tied).
    pub lm_head: Tensor<2>,
    pub rope: Rope,
    pub device: Device,
}

impl Transformer {
    /// Build the model from a checkpoint, with a dense FFN in every layer.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &Device) -> Result<Self, ModelError> {
        Self::from_checkpoint_with(ckpt, device, |i| Ok(Box::new(load_dense_ffn(ckpt, i, device)?)))
    }

    /// Build the model from a checkpoint, asking `ffn(layer)` for each layer's feed-forward block
    /// (how MoE checkpoints are loaded: the MoE crate builds its blocks, this crate the rest).
    pub fn from_checkpoint_with(
        ckpt: &Checkpoint,
        device: &Device,
        mut ffn: impl FnMut(usize) -> Result<Box<dyn FeedForward>, ModelError>,
    ) -> Result<Self, ModelError> {
        let cfg = ckpt.config.clone();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let embed = ckpt.load("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            transpose_host(&embed)
        } else {
            transpose_host(&ckpt.load("lm_head.weight", &[cfg.vocab_size, h])?)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let ab = cfg.attention_bias;
            let self_attn = Attention {
                q_proj: linear(
                    ckpt,
                    &format!("{p}.self_attn.q_proj"),
                    cfg.num_heads * hd,
                    h,
                    ab,
                    device,
                )?,
                k_proj: linear(
                    ckpt,
                    &format!("{p}.self_attn.k_proj"),
                    cfg.num_kv_heads * hd,
                    h,
                    ab,
                    device,
                )?,
                v_proj: linear(
                    ckpt,
                    &format!("{p}.self_attn.v_proj"),
                    cfg.num_kv_heads * hd,
                    h,
                    ab,
                    device,
                )?,
                o_proj: linear(
                    ckpt,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    cfg.num_heads * hd,
                    ab,
                    device,
                )?,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: hd,
                scale: cfg.attention_multiplier,
            };
            let ffn = ffn(i)?;
            let post = |n: &str| -> Result<Option<RmsNorm>, ModelError> {
                if cfg.use_post_norm {
                    Ok(Some(rms_norm(ckpt, &format!("{p}.{n}.weight"), &cfg, device)?))
                } else {
                    Ok(None)
                }
            };
            layers.push(DecoderLayer {
                input_layernorm: rms_norm(ckpt, &format!("{p}.input_layernorm.weight"), &cfg, device)?,
                self_attn,
                post_attention_layernorm: rms_norm(
                    ckpt,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &cfg,
                    device,
                )?,
                post_norm1: post("post_norm1")?,
                post_norm2: post("post_norm2")?,
                ffn,
                residual_multiplier: cfg.residual_multiplier,
            });
        }
        let norm = rms_norm(ckpt, "model.norm.weight", &cfg, device)?;
        let rope = Rope::new(&cfg, cfg.max_position_embeddings.max(1), device);
        Ok(Self {
            embed_tokens: to_tensor(embed, device),
            lm_head: to_tensor(lm_head, device),
            layers,
            norm,
            rope,
            device: device.clone(),
            config: cfg,
        })
    }

    /// Embeddings of `ids: [batch, seq]`, scaled by the embedding multiplier.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let e = self
            .embed_tokens
            .clone()
            .select(0, ids.reshape([b * s]))
            .reshape([b, s, self.config.hidden_size]);
        scale(e, self.config.embedding_multiplier)
    }

    /// Final hidden states (after the last norm) for `ids: [batch, seq]`, extending `cache`.
    pub fn forward_hidden(&self, ids: Tensor<2, Int>, cache: &mut KvCache) -> Result<Tensor<3>, ModelError> {
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let mut h = self.embed(ids);
        for (i, (layer, c)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            h = layer
                .forward(h, &self.rope, c)
                .map_err(|source| ModelError::Ffn { layer: i, source })?;
        }
        Ok(self.norm.forward(h))
    }

    /// Logits `[batch, seq, vocab]` of final hidden states.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, s, h] = hidden.dims();
        let l = hidden
            .reshape([b * s, h])
            .matmul(self.lm_head.clone())
            .reshape([b, s, self.config.vocab_size]);
        scale(l, self.config.logits_scaling)
    }

    /// Logits for every position of `ids: [batch, seq]` (no cache kept).
    pub fn forward(&self, ids: Tensor<2, Int>) -> Result<Tensor<3>, ModelError> {
        let mut cache = KvCache::new(self.layers.len());
        Ok(self.logits(self.forward_hidden(ids, &mut cache)?))
    }

    /// Logits of the last position only, extending the cache: the step of generation.
    pub fn forward_last(&self, ids: Tensor<2, Int>, cache: &mut KvCache) -> Result<Tensor<2>, ModelError> {
        let hidden = self.forward_hidden(ids, cache)?;
        let [b, s, _] = hidden.dims();
        let last = hidden.narrow(1, s - 1, 1);
        Ok(self.logits(last).reshape([b, self.config.vocab_size]))
    }

    /// Parameter counts: (embeddings incl. untied head, attention, FFN total, FFN active per token, norms).
    pub fn param_counts(&self) -> ParamCounts {
        let c = &self.config;
        ParamCounts {
            embeddings: c.embedding_params(),
            attention: c.num_layers * c.attention_params(),
            ffn_total: self.layers.iter().map(|l| l.ffn.total_params()).sum(),
            ffn_active: self.layers.iter().map(|l| l.ffn.active_params_per_token()).sum(),
            norms: c.num_layers * c.norm_params() + c.hidden_size,
        }
    }
}

/// Parameter counts of a model, by part.
#[derive(Debug, Clone, Copy)]
pub struct ParamCounts {
    pub embeddings: usize,
    pub attention: usize,
    pub ffn_total: usize,
    pub ffn_active: f64,
    pub norms: usize,
}

impl ParamCounts {
    pub fn total(&self) -> usize {
        self.embeddings + self.attention + self.ffn_total + self.norms
    }
    /// Parameters one token activates (the tied/untied output head counted once as embeddings).
    pub fn active(&self) -> f64 {
        (self.embeddings + self.attention + self.norms) as f64 + self.ffn_active
    }
}

/// The dense SwiGLU FFN of layer `i`, as stored in the checkpoint.
pub fn load_dense_ffn(ckpt: &Checkpoint, i: usize, device: &Device) -> Result<DenseFfn, ModelError> {
    let cfg = &ckpt.config;
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let p = format!("model.layers.{i}.mlp");
    let gate = ckpt.load(&format!("{p}.gate_proj.weight"), &[f, h])?;
    let up = ckpt.load(&format!("{p}.up_proj.weight"), &[f, h])?;
    let down = ckpt.load(&format!("{p}.down_proj.weight"), &[h, f])?;
    let biases: Option<[HostTensor; 3]> = if cfg.mlp_bias {
        Some([
            ckpt.load(&format!("{p}.gate_proj.bias"), &[f])?,
            ckpt.load(&format!("{p}.up_proj.bias"), &[f])?,
            ckpt.load(&format!("{p}.down_proj.bias"), &[h])?,
        ])
    } else {
        None
    };
    Ok(DenseFfn::from_host(&gate, &up, &down, biases, device))
}
