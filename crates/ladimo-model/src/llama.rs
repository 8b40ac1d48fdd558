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

use crate::ffn::{DenseFfn, FeedForward, KernelFfn};
use crate::host::{HostDecoder, HostKv};
use crate::rope::Rope;
use crate::util::to_vec;
use crate::util::{to_tensor, transpose_host};
use ladimo_kernel::Dtype;

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

    /// `(heads, kv_heads, head_dim)`.
    pub fn heads(&self) -> (usize, usize, usize) {
        (self.num_heads, self.num_kv_heads, self.head_dim)
    }

    /// The factor on `q . k` before the softmax.
    pub fn scale(&self) -> f64 {
        self.scale
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

/// Per-layer keys and values of everything processed so far: burn tensors, or host vectors
/// while the host decode path ([`crate::HostDecoder`]) extends them. Each path converts the cache
/// to its form when it needs to (once per switch).
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    host: Option<HostCache>,
}

/// The cache in the host decode path's form.
#[derive(Debug, Clone)]
struct HostCache {
    kv_heads: usize,
    head_dim: usize,
    device: Device,
    layers: Vec<HostKv>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            host: None,
        }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        if let Some(h) = &self.host {
            return h
                .layers
                .first()
                .map(|l| l.k.len() / (h.kv_heads * h.head_dim))
                .unwrap_or(0);
        }
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    /// The cache as host vectors (`[positions, kv_heads * head_dim]` per layer); batch 1 only.
    fn host_layers(&mut self, kv_heads: usize, head_dim: usize, device: &Device) -> &mut [HostKv] {
        if self.host.is_none() {
            let layers = self
                .layers
                .iter_mut()
                .map(|l| match l.take() {
                    None => HostKv::default(),
                    // [1, kv_heads, t, hd] -> [t, kv_heads, hd]
                    Some((k, v)) => HostKv {
                        k: to_vec(k.swap_dims(1, 2)),
                        v: to_vec(v.swap_dims(1, 2)),
                    },
                })
                .collect();
            self.host = Some(HostCache {
                kv_heads,
                head_dim,
                device: device.clone(),
                layers,
            });
        }
        &mut self.host.as_mut().expect("set above").layers
    }

    /// Back to burn tensors, if the host path holds the cache.
    fn move_to_device(&mut self) {
        if let Some(h) = self.host.take() {
            let kvd = h.kv_heads * h.head_dim;
            let t = |d: Vec<f32>| {
                let n = d.len() / kvd;
                Tensor::<4>::from_data(TensorData::new(d, [1, n, h.kv_heads, h.head_dim]), &h.device).swap_dims(1, 2)
            };
            self.layers = h
                .layers
                .into_iter()
                .map(|l| (!l.k.is_empty()).then(|| (t(l.k), t(l.v))))
                .collect();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This (batch-1) cache repeated `n` times along the batch axis: `n` sequences that share a
    /// prefix.
    pub fn repeat_batch(&self, n: usize) -> Self {
        let mut c = self.clone();
        c.move_to_device();
        Self {
            host: None,
            layers: c
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
    /// The host decode path, once [`Transformer::prepare_host_decode`] has built it.
    pub host: Option<HostDecoder>,
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
            host: None,
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
        if let Some((host, ids)) = self.host_path(&ids) {
            let h = self.host_hidden(host, &ids, cache)?;
            let n = ids.len();
            return Ok(Tensor::from_data(
                TensorData::new(h, [1, n, self.config.hidden_size]),
                &self.device,
            ));
        }
        cache.move_to_device();
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
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        if let Some((host, ids)) = self.host_path(&ids) {
            let h = self.host_hidden(host, &ids, cache)?;
            let hs = self.config.hidden_size;
            let logits = host.logits(&h[h.len() - hs..], self.config.logits_scaling);
            return Ok(Tensor::from_data(
                TensorData::new(logits, [1, self.config.vocab_size]),
                &self.device,
            ));
        }
        let hidden = self.forward_hidden(ids, cache)?;
        let [b, s, _] = hidden.dims();
        let last = hidden.narrow(1, s - 1, 1);
        Ok(self.logits(last).reshape([b, self.config.vocab_size]))
    }

    /// The host decode path and the token ids, when it takes `ids` (one sequence of at most its
    /// `max_tokens` tokens).
    fn host_path(&self, ids: &Tensor<2, Int>) -> Option<(&HostDecoder, Vec<u32>)> {
        let host = self.host.as_ref()?;
        let [b, s] = ids.dims();
        if b != 1 || s == 0 || s > host.max_tokens {
            return None;
        }
        let ids = ids.clone().into_data().convert::<i64>().try_to_vec::<i64>().ok()?;
        Some((host, ids.into_iter().map(|v| v as u32).collect()))
    }

    fn host_hidden(&self, host: &HostDecoder, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, ModelError> {
        let (_, nkv, hd) = self.layers[0].self_attn.heads();
        let kv = cache.host_layers(nkv, hd, &self.device);
        host.forward_hidden(self, ids, kv)
            .map_err(|source| ModelError::Ffn { layer: 0, source })
    }

    /// Let every FFN block choose its prefill path by timing it ([`FeedForward::prepare_prefill`]).
    /// Call it once the weights and policies are final.
    pub fn prepare_prefill(&mut self) {
        for l in &mut self.layers {
            l.ffn.prepare_prefill();
        }
    }

    /// Build the host decode path with weights in `dtype`: attention, norms and head copied into
    /// host matrices, every dense FFN wrapped in a [`KernelFfn`], every other FFN asked to
    /// [`FeedForward::prepare_host`]. Then, per path, measure up to how many tokens the host
    /// side is faster than burn (a decode step after a short prompt, and one FFN alone), and keep
    /// those limits. Call it once the weights are final (after policies are applied).
    pub fn prepare_host_decode(&mut self, dtype: Dtype) -> Result<(), ModelError> {
        self.host = None;
        for layer in &mut self.layers {
            let any: &dyn std::any::Any = layer.ffn.as_ref();
            if let Some(k) = any.downcast_ref::<KernelFfn>() {
                layer.ffn = Box::new(k.dense.clone());
            }
            let any: &dyn std::any::Any = layer.ffn.as_ref();
            if let Some(k) = any
                .downcast_ref::<DenseFfn>()
                .and_then(|d| KernelFfn::new(d.clone(), dtype, 0))
            {
                layer.ffn = Box::new(k);
            }
            layer.ffn.prepare_host(dtype);
        }
        // The dense FFN kernel's limit, measured on the first dense layer, for all of them.
        let ffn_limit = self
            .layers
            .iter()
            .find_map(|l| (l.ffn.as_ref() as &dyn std::any::Any).downcast_ref::<KernelFfn>())
            .map(|k| k.measure_max_tokens());
        if let Some(m) = ffn_limit {
            for l in &mut self.layers {
                if let Some(k) = (l.ffn.as_mut() as &mut dyn std::any::Any).downcast_mut::<KernelFfn>() {
                    k.max_tokens = m;
                }
            }
        }
        let mut host = HostDecoder::new(self, dtype);
        host.max_tokens = 0;
        self.host = Some(host);
        let limit = self.measure_host_tokens()?;
        self.host.as_mut().expect("set above").max_tokens = limit;
        Ok(())
    }

    /// The largest step size (of 1, 2, 4, 8 new tokens, after a 16-token prompt) up to which the
    /// host path is faster than burn: each size timed twice on each path, alternating, best of
    /// two.
    fn measure_host_tokens(&mut self) -> Result<usize, ModelError> {
        let v = self.config.vocab_size as u32;
        let ids: Vec<u32> = (0..24u32).map(|i| (i * 7919 + 17) % v).collect();
        let mut prompt = KvCache::new(self.layers.len());
        self.host.as_mut().expect("built").max_tokens = 0;
        self.forward_hidden(crate::util::ids_tensor(&ids[..16], 1, &self.device), &mut prompt)?;
        let mut limit = 0;
        for n in [1usize, 2, 4, 8] {
            let step = &ids[16..16 + n];
            let (mut burn_t, mut host_t) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..2 {
                for on_host in [false, true] {
                    self.host.as_mut().expect("built").max_tokens = if on_host { n } else { 0 };
                    let mut c = prompt.clone();
                    if on_host {
                        let (_, nkv, hd) = self.layers[0].self_attn.heads();
                        c.host_layers(nkv, hd, &self.device);
                    }
                    let t = std::time::Instant::now();
                    let _ = to_vec(self.forward_last(crate::util::ids_tensor(step, 1, &self.device), &mut c)?);
                    let e = t.elapsed().as_secs_f64();
                    let best = if on_host { &mut host_t } else { &mut burn_t };
                    *best = best.min(e);
                }
            }
            tracing::debug!("host decode, {n} tokens: host {host_t:.4} s, burn {burn_t:.4} s");
            if host_t > burn_t {
                break;
            }
            limit = n;
        }
        Ok(limit)
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
