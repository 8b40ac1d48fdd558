//! MoE checkpoints on disk: a Hugging Face folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`) whose MoE layers use Mixtral's tensor names
//! (`model.layers.N.block_sparse_moe.gate.weight`, `...experts.E.w1/w2/w3.weight`).
//!
//! When the model is exactly a Mixtral (every layer MoE with the same number of equal-sized
//! experts, no shared experts, no router bias, renormalised top-k weights, one TopK for every
//! layer, a LLaMA base without biases) `config.json` says `MixtralForCausalLM`, and Hugging Face
//! transformers computes the same function. Otherwise it says `LadimoMoeForCausalLM` and gives the
//! reason in `ladimo.why_not_mixtral`, so other tools refuse it instead of computing something
//! else. Either way `config.json` carries a `ladimo` section ([`MoeSection`]) with each layer's
//! policy and combine rule, which [`load_model`] applies; a plain Mixtral checkpoint (no such
//! section) loads too, as uniform top-k with renormalised weights.
//!
//! The combine scale is folded into each expert's down projection when saving (`w2 = scale *
//! down`), so the saved combine scale is always 1.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use ladimo_io::{Architecture, Checkpoint, HostTensor, ModelConfig};
use ladimo_model::util::{to_vec, transpose_host};
use ladimo_model::{FeedForward, ModelError, Transformer, load_dense_ffn};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Combine, CombineWeights, HostFfn, MoeBlock, MoeError, Policy};

/// Errors of reading or writing MoE checkpoints; every one names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Source(#[from] ladimo_io::Error),
    #[error("{path}: layer {layer}: {source}")]
    Block {
        path: PathBuf,
        layer: usize,
        #[source]
        source: MoeError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `ladimo` section of an MoE checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSection {
    /// Format version of this section (1).
    pub format: u32,
    /// The dense architecture the attention and norms follow (`LlamaForCausalLM`, ...).
    pub base_architecture: String,
    /// The dense FFN width, for layers that stayed dense.
    pub dense_intermediate_size: usize,
    /// Whether `config.json` is a Mixtral config that computes exactly this model.
    pub mixtral_exact: bool,
    /// Why not, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_not_mixtral: Option<String>,
    /// One entry per MoE layer (layers not listed are dense).
    pub layers: Vec<MoeLayerSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeLayerSpec {
    pub layer: usize,
    pub policy: Policy,
    pub combine: Combine,
}

fn moe_prefix(layer: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe")
}

/// Put a block's host weights into `tensors` under Mixtral's names below `p`:
/// `{p}.gate.weight` (+ `.bias`, and a low-rank router's `{p}.gate_predictor.weight`),
/// `{p}.experts.E.w1/w3/w2.weight` (gate, up, down) and `{p}.shared_experts.*`. The one tensor layout of an MoE block, in a checkpoint and in a block
/// file ([`crate::block_file`]).
pub(crate) fn put_block(tensors: &mut BTreeMap<String, HostTensor>, p: &str, w: BlockHostWeights) {
    tensors.insert(format!("{p}.gate.weight"), w.router);
    if let Some(bias) = w.router_bias {
        tensors.insert(format!("{p}.gate.bias"), bias);
    }
    if let Some(q) = w.predictor {
        tensors.insert(format!("{p}.{PREDICTOR}"), q);
    }
    let mut put = |name: String, f: HostFfn| {
        tensors.insert(format!("{name}.w1.weight"), f.gate);
        tensors.insert(format!("{name}.w3.weight"), f.up);
        tensors.insert(format!("{name}.w2.weight"), f.down);
    };
    for (e, f) in w.experts.into_iter().enumerate() {
        put(format!("{p}.experts.{e}"), f);
    }
    if let Some(s) = w.shared {
        put(format!("{p}.shared_experts"), s);
    }
}

/// A low-rank router's first map (`[rank, hidden]`) below a block's prefix; its `gate.weight` is
/// then `[experts, rank]`. Not a Mixtral name: a checkpoint with it is not Mixtral-exact.
const PREDICTOR: &str = "gate_predictor.weight";

/// The block below `p` that [`put_block`] laid out: `has` says whether a tensor is there, `load`
/// reads it. The routed experts are `experts.0`, `experts.1`, ... up to the first one missing.
pub(crate) fn take_block<E>(
    p: &str,
    has: impl Fn(&str) -> bool,
    load: impl Fn(&str) -> Result<HostTensor, E>,
) -> Result<BlockHostWeights, E> {
    let ffn = |q: &str| -> Result<HostFfn, E> {
        Ok(HostFfn {
            gate: load(&format!("{q}.w1.weight"))?,
            up: load(&format!("{q}.w3.weight"))?,
            down: load(&format!("{q}.w2.weight"))?,
        })
    };
    let mut experts = Vec::new();
    while has(&format!("{p}.experts.{}.w1.weight", experts.len())) {
        experts.push(ffn(&format!("{p}.experts.{}", experts.len()))?);
    }
    let shared = if has(&format!("{p}.shared_experts.w1.weight")) {
        Some(ffn(&format!("{p}.shared_experts"))?)
    } else {
        None
    };
    let maybe = |name: String| if has(&name) { load(&name).map(Some) } else { Ok(None) };
    Ok(BlockHostWeights {
        router: load(&format!("{p}.gate.weight"))?,
        router_bias: maybe(format!("{p}.gate.bias"))?,
        predictor: maybe(format!("{p}.{PREDICTOR}"))?,
        experts,
        shared,
    })
}

/// The block made of host weights `w` (as [`take_block`] reads them), on `device`.
pub(crate) fn build_block(
    w: BlockHostWeights,
    combine: Combine,
    policy: Policy,
    device: &Device,
) -> Result<MoeBlock, MoeError> {
    let router = w.full_router();
    let block = MoeBlock::new(
        &router,
        w.router_bias.as_ref(),
        &w.experts,
        w.shared.as_ref(),
        combine,
        policy,
        device,
    )?;
    match &w.predictor {
        Some(q) => block.with_predictor(q, &w.router, w.router_bias.as_ref()),
        None => Ok(block),
    }
}

/// A linear layer's weight on the host in PyTorch layout `[out, in]` (burn stores `[in, out]`).
pub fn linear_host_weight(l: &burn::nn::Linear) -> HostTensor {
    let w = l.weight.val();
    let [i, o] = w.dims();
    transpose_host(&HostTensor::new(vec![i, o], to_vec(w)))
}

/// The router, routed experts and shared experts of a block on the host (PyTorch layouts).
#[derive(Debug, Clone)]
pub struct BlockHostWeights {
    /// `[experts, hidden]`, or `[experts, rank]` behind a predictor.
    pub router: HostTensor,
    pub router_bias: Option<HostTensor>,
    /// A low-rank router's first map, `[rank, hidden]`.
    pub predictor: Option<HostTensor>,
    pub experts: Vec<HostFfn>,
    pub shared: Option<HostFfn>,
}

impl BlockHostWeights {
    /// The router as one `[experts, hidden]` matrix: the low-rank product `router x predictor`
    /// when there is a predictor (the same logits, what formats without a low-rank router get).
    pub fn full_router(&self) -> HostTensor {
        let Some(q) = &self.predictor else {
            return self.router.clone();
        };
        let (e, r, h) = (self.router.shape[0], q.shape[0], q.shape[1]);
        let mut w = vec![0f32; e * h];
        for (i, row) in w.chunks_mut(h).enumerate() {
            for k in 0..r {
                let a = self.router.data[i * r + k];
                row.iter_mut()
                    .zip(&q.data[k * h..(k + 1) * h])
                    .for_each(|(v, b)| *v += a * b);
            }
        }
        HostTensor::new(vec![e, h], w)
    }
}

/// The routed experts, shared experts and router of a block in PyTorch layout, with the combine
/// scale folded into the down projections (the host form of what a checkpoint holds).
pub fn block_host_weights(block: &MoeBlock) -> BlockHostWeights {
    host_weights(block, block.combine.scale)
}

/// [`block_host_weights`] as the block holds them, the combine scale left out (a block file keeps
/// it in its metadata).
pub(crate) fn unscaled_host_weights(block: &MoeBlock) -> BlockHostWeights {
    host_weights(block, 1.0)
}

/// [`block_host_weights`] with `expert_scale` folded into the routed experts' down projections.
fn host_weights(block: &MoeBlock, expert_scale: f32) -> BlockHostWeights {
    let weight = linear_host_weight;
    let ffn = |d: &ladimo_model::DenseFfn, scale: f32| {
        let mut down = weight(&d.down_proj);
        down.data.iter_mut().for_each(|v| *v *= scale);
        HostFfn {
            gate: weight(&d.gate_proj),
            up: weight(&d.up_proj),
            down,
        }
    };
    let p = &block.params;
    BlockHostWeights {
        router: weight(&p.router),
        router_bias: p.router.bias.as_ref().map(|b| {
            let b = b.val();
            HostTensor::new(b.dims().to_vec(), to_vec(b))
        }),
        predictor: p.predictor.as_ref().map(weight),
        experts: p.experts.iter().map(|e| ffn(e, expert_scale)).collect(),
        // Shared experts are not scaled by the combine rule.
        shared: p.shared.as_ref().map(|s| ffn(s, 1.0)),
    }
}

/// Why a model with these blocks is not exactly a Mixtral, or `None` when it is.
fn why_not_mixtral(cfg: &ModelConfig, blocks: &[Option<&MoeBlock>]) -> Option<String> {
    if cfg.architecture != Architecture::Llama {
        return Some(format!("the base is {:?}, not LLaMA", cfg.architecture));
    }
    if cfg.attention_bias || cfg.mlp_bias {
        return Some("Mixtral has no attention or FFN biases".into());
    }
    if blocks.iter().any(Option::is_none) {
        return Some("some layers stay dense; Mixtral has an MoE block in every layer".into());
    }
    let blocks: Vec<&MoeBlock> = blocks.iter().flatten().copied().collect();
    let first = blocks.first()?;
    let size = first.params.experts[0].intermediate_size();
    for b in &blocks {
        if b.num_experts() != first.num_experts() {
            return Some("layers have different numbers of experts".into());
        }
        if b.params.experts.iter().any(|e| e.intermediate_size() != size) {
            return Some("experts differ in size".into());
        }
        if b.params.shared.is_some() {
            return Some("shared experts (Mixtral has none)".into());
        }
        if b.params.router.bias.is_some() {
            return Some("the router has a bias (Mixtral's has none)".into());
        }
        if b.params.predictor.is_some() {
            return Some("the router is low-rank (a predictor in front of it)".into());
        }
        if b.combine.weights != CombineWeights::Renormalized {
            return Some(format!(
                "combine weights are {:?}; Mixtral renormalises the top-k softmax",
                b.combine.weights
            ));
        }
        if !matches!(b.policy, Policy::TopK { .. }) {
            return Some(format!("policy {} is not a fixed top-k", b.policy));
        }
        if b.policy != first.policy {
            return Some("layers route to different numbers of experts".into());
        }
    }
    None
}

/// Write `blocks` (one per layer; `None` keeps the source's dense FFN) with the rest of `source`
/// as a checkpoint folder `out` (created; must not exist). Everything is written under a
/// temporary name first and renamed at the end, so `out` never holds a half-written model.
pub fn save_moe_checkpoint(
    source: &Checkpoint,
    blocks: &[Option<&MoeBlock>],
    out: &Path,
) -> Result<MoeSection, CheckpointError> {
    let cfg = &source.config;
    if blocks.len() != cfg.num_layers {
        return Err(CheckpointError::Format {
            path: out.to_path_buf(),
            msg: format!("{} blocks given for a model of {} layers", blocks.len(), cfg.num_layers),
        });
    }
    if out.exists() {
        return Err(CheckpointError::Format {
            path: out.to_path_buf(),
            msg: "already exists; refusing to overwrite".into(),
        });
    }
    let why = why_not_mixtral(cfg, blocks);
    let section = MoeSection {
        format: 1,
        base_architecture: match cfg.architecture {
            Architecture::Llama => "LlamaForCausalLM".into(),
            Architecture::HyperClovaX => "HyperCLOVAXForCausalLM".into(),
        },
        dense_intermediate_size: cfg.intermediate_size,
        mixtral_exact: why.is_none(),
        why_not_mixtral: why.clone(),
        layers: blocks
            .iter()
            .enumerate()
            .filter_map(|(layer, b)| {
                b.map(|b| MoeLayerSpec {
                    layer,
                    policy: b.policy.clone(),
                    combine: Combine {
                        weights: b.combine.weights,
                        scale: 1.0,
                    },
                })
            })
            .collect(),
    };

    let mut config = source_config(source)?;
    if why.is_none() {
        let first = blocks[0].expect("every layer is MoE when Mixtral-exact");
        let Policy::TopK { k } = first.policy else {
            unreachable!()
        };
        config["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
        config["model_type"] = "mixtral".into();
        config["intermediate_size"] = first.params.experts[0].intermediate_size().into();
        config["num_local_experts"] = first.num_experts().into();
        config["num_experts_per_tok"] = k.into();
        config["sliding_window"] = Value::Null;
        config["router_jitter_noise"] = 0.0.into();
        config["output_router_logits"] = false.into();
        config["router_aux_loss_coef"] = 0.0.into();
    } else {
        config["architectures"] = serde_json::json!(["LadimoMoeForCausalLM"]);
        config["model_type"] = "ladimo_moe".into();
    }
    // Weights are stored in f32: say so under both names (transformers 5 reads `dtype`, older ones `torch_dtype`).
    config["torch_dtype"] = "float32".into();
    config["dtype"] = "float32".into();
    config["ladimo"] = serde_json::to_value(&section).expect("section serialises");

    // Tensors: everything but the replaced FFNs from the source, then the MoE blocks.
    let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
    for info in source.weights.infos() {
        let replaced = blocks
            .iter()
            .enumerate()
            .any(|(l, b)| b.is_some() && info.name.starts_with(&format!("model.layers.{l}.mlp.")));
        if !replaced {
            tensors.insert(info.name.clone(), source.weights.load(&info.name)?);
        }
    }
    for (layer, b) in blocks.iter().enumerate() {
        if let Some(b) = b {
            put_block(&mut tensors, &moe_prefix(layer), block_host_weights(b));
        }
    }

    // Built in `.NAME.partial`, renamed into place when complete (removed on an error).
    let dir = ladimo_io::atomic::AtomicDir::new(out)?;
    let tmp = dir.path();
    let st = tmp.join("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    ladimo_io::write_safetensors(&st, &tensors, Some(meta))?;
    drop(tensors);
    write_config_and_tokenizer(source, &config, tmp)?;
    dir.commit()?;
    Ok(section)
}

/// The source's `config.json` (keeps fields we do not model), or one made from GGUF metadata.
fn source_config(source: &Checkpoint) -> Result<Value, CheckpointError> {
    match source.format {
        ladimo_io::Format::HuggingFace => {
            let p = source.path.join("config.json");
            let text = std::fs::read_to_string(&p).map_err(io(&p))?;
            serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
                path: p.clone(),
                msg: e.to_string(),
            })
        }
        ladimo_io::Format::Gguf => source.config.to_hf_json().map_err(|msg| CheckpointError::Format {
            path: source.path.clone(),
            msg,
        }),
    }
}

/// `config.json`, `tokenizer.json` and `tokenizer_config.json` (with the chat template) in `dir`.
fn write_config_and_tokenizer(source: &Checkpoint, config: &Value, dir: &Path) -> Result<(), CheckpointError> {
    let write = |file: &str, text: String| -> Result<(), CheckpointError> {
        let p = dir.join(file);
        std::fs::write(&p, text).map_err(io(&p))
    };
    write("config.json", serde_json::to_string_pretty(config).unwrap())?;
    let tok = source.tokenizer()?;
    write("tokenizer.json", tok.to_json()?)?;
    let mut tok_cfg = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    if let Some(t) = &tok.chat_template {
        tok_cfg["chat_template"] = t.clone().into();
    }
    write("tokenizer_config.json", serde_json::to_string_pretty(&tok_cfg).unwrap())
}

/// Write the dense model `source` with every layer's FFN replaced by `ffns` (one per layer, e.g.
/// FFNs trained under activation sparsity) into the existing folder `dir`, which the caller
/// publishes whole (see [`ladimo_io::atomic::AtomicDir`]). `config.json` is the source's own, so
/// transformers, vLLM and ladimo read the folder as the dense model it is; tensors are f32.
pub fn write_dense_checkpoint(source: &Checkpoint, ffns: &[HostFfn], dir: &Path) -> Result<(), CheckpointError> {
    let cfg = &source.config;
    if ffns.len() != cfg.num_layers || cfg.mlp_bias {
        return Err(CheckpointError::Format {
            path: dir.to_path_buf(),
            msg: format!(
                "{} FFNs given for a model of {} layers{}",
                ffns.len(),
                cfg.num_layers,
                if cfg.mlp_bias {
                    " with FFN biases (not supported)"
                } else {
                    ""
                }
            ),
        });
    }
    let mut config = source_config(source)?;
    config["torch_dtype"] = "float32".into();
    config["dtype"] = "float32".into();
    let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
    for info in source.weights.infos() {
        if !info.name.contains(".mlp.") {
            tensors.insert(info.name.clone(), source.weights.load(&info.name)?);
        }
    }
    for (l, f) in ffns.iter().enumerate() {
        f.check(cfg.hidden_size, &format!("layer {l}'s FFN"))
            .map_err(|source| CheckpointError::Block {
                path: dir.to_path_buf(),
                layer: l,
                source,
            })?;
        let p = format!("model.layers.{l}.mlp");
        tensors.insert(format!("{p}.gate_proj.weight"), f.gate.clone());
        tensors.insert(format!("{p}.up_proj.weight"), f.up.clone());
        tensors.insert(format!("{p}.down_proj.weight"), f.down.clone());
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    ladimo_io::write_safetensors(&dir.join("model.safetensors"), &tensors, Some(meta))?;
    drop(tensors);
    write_config_and_tokenizer(source, &config, dir)
}

/// A checkpoint folder's `config.json`, parsed (`None` for a GGUF file).
fn read_config(dir: &Path) -> Result<Option<Value>, CheckpointError> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| CheckpointError::Format {
            path: p.clone(),
            msg: e.to_string(),
        })
}

fn section_of(config: &Option<Value>, dir: &Path) -> Result<Option<MoeSection>, CheckpointError> {
    match config.as_ref().and_then(|v| v.get("ladimo")) {
        None => Ok(None),
        Some(s) => serde_json::from_value(s.clone())
            .map(Some)
            .map_err(|e| CheckpointError::Format {
                path: dir.join("config.json"),
                msg: format!("`ladimo` section: {e}"),
            }),
    }
}

/// The `ladimo` section of a checkpoint folder's `config.json`, if it has one.
pub fn read_section(dir: &Path) -> Result<Option<MoeSection>, CheckpointError> {
    section_of(&read_config(dir)?, dir)
}

/// Load any checkpoint ladimo reads: a dense LLaMA / HyperCLOVA X (HF folder or GGUF), an MoE
/// checkpoint written by [`save_moe_checkpoint`], or a plain Mixtral folder.
pub fn load_model(path: &Path, device: &Device) -> Result<Transformer, CheckpointError> {
    let ckpt = Checkpoint::open(path)?;
    load_model_from(&ckpt, device)
}

/// [`load_model`] for an already opened checkpoint.
pub fn load_model_from(ckpt: &Checkpoint, device: &Device) -> Result<Transformer, CheckpointError> {
    let path = ckpt.path.clone();
    let config = read_config(&path)?;
    let section = section_of(&config, &path)?;
    let names: std::collections::HashSet<String> = ckpt.weights.infos().into_iter().map(|i| i.name).collect();
    // A plain Mixtral: uniform top-k, renormalised.
    let mixtral_k = match (&config, &section) {
        (Some(v), None) => v.get("num_experts_per_tok").and_then(Value::as_u64).map(|k| k as usize),
        _ => None,
    };
    let mut block_err = None;
    let model = Transformer::from_checkpoint_with(ckpt, device, |layer| {
        let p = moe_prefix(layer);
        if !names.contains(&format!("{p}.gate.weight")) {
            return Ok(Box::new(load_dense_ffn(ckpt, layer, device)?) as Box<dyn FeedForward>);
        }
        let spec = section
            .as_ref()
            .and_then(|s| s.layers.iter().find(|l| l.layer == layer));
        let (policy, combine) = match (spec, mixtral_k) {
            (Some(s), _) => (s.policy.clone(), s.combine),
            (None, Some(k)) => (Policy::TopK { k }, Combine::default()),
            (None, None) => {
                return Err(ModelError::Invalid(format!(
                    "{}: layer {layer} has MoE weights but config.json names no routing policy for it",
                    path.display()
                )));
            }
        };
        let weights = take_block(
            &p,
            |n| names.contains(n),
            |n| -> Result<HostTensor, ModelError> { Ok(ckpt.weights.load(n)?) },
        )?;
        match build_block(weights, combine, policy, device) {
            Ok(b) => Ok(Box::new(b) as Box<dyn FeedForward>),
            Err(source) => {
                let msg = source.to_string();
                block_err = Some(CheckpointError::Block {
                    path: path.clone(),
                    layer,
                    source,
                });
                Err(ModelError::Invalid(msg))
            }
        }
    });
    match (model, block_err) {
        (Ok(m), _) => Ok(m),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
    }
}

/// The MoE block of layer `layer`, if that layer has one.
pub fn moe_block_mut(model: &mut Transformer, layer: usize) -> Option<&mut MoeBlock> {
    let ffn: &mut dyn FeedForward = model.layers.get_mut(layer)?.ffn.as_mut();
    (ffn as &mut dyn Any).downcast_mut::<MoeBlock>()
}

/// The MoE block of layer `layer`, if that layer has one.
pub fn moe_block(model: &Transformer, layer: usize) -> Option<&MoeBlock> {
    let ffn: &dyn FeedForward = model.layers.get(layer)?.ffn.as_ref();
    (ffn as &dyn Any).downcast_ref::<MoeBlock>()
}
