//! Exports of a loaded model (dense, MoE, or with activation sparsity) to the formats users
//! deploy with, exact where the format can carry the model and refused (with what is missing and
//! which format can) where it cannot:
//!
//! | format | what reads it | carries |
//! |---|---|---|
//! | `ladimo` | ladimo | everything but dense layers' sparsity (that stays in `policy.toml`) |
//! | `mixtral` | transformers, vLLM (`MixtralForCausalLM`) | one top-k everywhere, Mixtral's combine rule, no shared experts |
//! | `granitemoe` | transformers, vLLM (`GraniteMoeSharedForCausalLM`) | the same with always-on shared experts; HyperCLOVA X's muP scalars |
//! | `hf-remote` | transformers with `trust_remote_code` (`modeling_ladimo.py` in the folder) | everything: per-layer policies, top-p, confidence, Unit / Raw weights, router bias, dense and sparse (static, CATS, TEAL) layers, TEAL thresholds inside MoE experts |
//! | `gguf` | llama.cpp: `llama` with `*_exps` tensors, or `granitemoe` with `*_shexp` | what `mixtral` / `granitemoe` carry; F16 or Q8_0 |
//!
//! A low-rank router (a predictor in front of it) goes to every format but `ladimo` as its
//! product, one full router: the same logits exactly, with more parameters.
//!
//! Only `hf-remote` carries TEAL thresholds inside MoE experts: every other format refuses a
//! model with them, naming the layers (ladimo keeps them in the policy file).
//!
//! Mixtral's rule (GraniteMoe's too, and llama.cpp's for both architectures): the router's top-k
//! logits, softmax over those k. That is ladimo's `Renormalized` weights with one `TopK` in every
//! layer. With `approximate`, a stock format also takes a model it cannot carry exactly, with
//! the nearest stock form, and the report lists each approximation: per-layer or dynamic
//! policies become the largest k any layer may run, and `Unit` weights (the router only
//! selects, chosen experts summed) become the softmax over the chosen experts with every routed
//! down projection multiplied by k (equal weights give each expert exactly 1).
//!
//! Every export is written into `.NAME.partial` beside the output and renamed at the end: the
//! output folder is whole or absent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ladimo_io::gguf_write::{GgmlType, GgufWriter, MetaValue};
use ladimo_io::{Architecture, Checkpoint, HostTensor, ModelConfig, RopeScaling};
use ladimo_model::{DenseFfn, Transformer};
use serde_json::{Value, json};

use crate::checkpoint::{CheckpointError, block_host_weights, moe_block};
use crate::sparsity::{SparseFfn, Sparsity, dense_ffn};
use crate::{CombineWeights, HostFfn, MoeBlock, Policy};

/// The modeling and configuration files an `hf-remote` export ships.
const REMOTE_MODELING: &str = include_str!("remote/modeling_ladimo.py");
const REMOTE_CONFIGURATION: &str = include_str!("remote/configuration_ladimo.py");

/// The output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ladimo,
    Mixtral,
    GraniteMoe,
    HfRemote,
    Gguf,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Ladimo,
        Format::Mixtral,
        Format::GraniteMoe,
        Format::HfRemote,
        Format::Gguf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Ladimo => "ladimo",
            Format::Mixtral => "mixtral",
            Format::GraniteMoe => "granitemoe",
            Format::HfRemote => "hf-remote",
            Format::Gguf => "gguf",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Format::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
            format!("unknown export format `{s}` (one of {})", names.join(", "))
        })
    }
}

/// llama.cpp's architectures a GGUF export can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    /// `llama`: dense, or MoE with `*_exps` tensors (llama.cpp's Mixtral). No shared experts:
    /// llama.cpp loads `*_shexp` tensors for it and then never uses them.
    Llama,
    /// `granitemoe`: MoE with optional shared experts (`*_shexp`) and muP scalars.
    GraniteMoe,
}

impl GgufArch {
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::GraniteMoe => "granitemoe",
        }
    }
}

impl std::str::FromStr for GgufArch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llama" => Ok(GgufArch::Llama),
            "granitemoe" => Ok(GgufArch::GraniteMoe),
            _ => Err(format!("unknown GGUF architecture `{s}` (llama, granitemoe)")),
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: Format,
    /// Storage of the GGUF's matrices (F16 or Q8_0; norms and routers stay F32).
    pub gguf_type: GgmlType,
    /// The GGUF architecture; `None` picks `granitemoe` when the model has shared experts or muP
    /// scalars, else `llama`.
    pub gguf_arch: Option<GgufArch>,
    /// Write a stock format that cannot be exact with its nearest approximation.
    pub approximate: bool,
}

impl ExportOptions {
    pub fn new(format: Format) -> Self {
        Self {
            format,
            gguf_type: GgmlType::F16,
            gguf_arch: None,
            approximate: false,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub format: Format,
    /// `GraniteMoeSharedForCausalLM`, `llama (GGUF)`, ...
    pub target: String,
    /// What the approximation changed (empty: the export computes ladimo's function).
    pub approximations: Vec<String>,
    /// Files in the output folder.
    pub files: Vec<String>,
}

impl ExportReport {
    pub fn exact(&self) -> bool {
        self.approximations.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "{format} cannot carry this model: {}. {suggestion}",
        missing.join("; ")
    )]
    Cannot {
        format: Format,
        missing: Vec<String>,
        suggestion: String,
    },
    #[error("{path}: {msg}")]
    Output { path: PathBuf, msg: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Source(#[from] ladimo_io::Error),
}

/// One layer's FFN as the export sees it.
enum Layer<'a> {
    Dense(&'a DenseFfn),
    Sparse(&'a DenseFfn, &'a Sparsity),
    Moe(&'a MoeBlock),
}

fn layers(model: &Transformer) -> Result<Vec<Layer<'_>>, String> {
    (0..model.layers.len())
        .map(|l| {
            if let Some(b) = moe_block(model, l) {
                return Ok(Layer::Moe(b));
            }
            let ffn: &dyn std::any::Any = model.layers[l].ffn.as_ref();
            if let Some(s) = ffn.downcast_ref::<SparseFfn>() {
                let d = dense_ffn(model, l).expect("a sparse FFN has a dense one");
                return Ok(Layer::Sparse(d, s.sparsity()));
            }
            dense_ffn(model, l)
                .map(Layer::Dense)
                .ok_or_else(|| format!("layer {l}'s FFN is of a kind no export knows"))
        })
        .collect()
}

/// For each MoE layer with TEAL thresholds inside its experts, a phrase naming it (what only
/// `hf-remote` carries).
fn thresholded_layers(layers: &[Layer]) -> Vec<String> {
    layers
        .iter()
        .enumerate()
        .filter_map(|(l, layer)| match layer {
            Layer::Moe(b) => b
                .sparsity()
                .map(|s| format!("layer {l} has thresholds inside its MoE experts ({s})")),
            _ => None,
        })
        .collect()
}

/// The largest number of experts a policy can run.
fn max_k(p: &Policy) -> usize {
    match *p {
        Policy::TopK { k } => k,
        Policy::TopP { max_k, .. } => max_k,
        Policy::Confidence { k_low, k_high, .. } => k_low.max(k_high),
    }
}

/// How a stock MoE format (Mixtral, GraniteMoeShared, llama.cpp) holds the model: one k, equal
/// experts, shared experts of one size (0: none), and per layer the factor folded into the routed
/// down projections.
#[derive(Debug)]
struct StockPlan {
    k: usize,
    experts: usize,
    expert_size: usize,
    shared_size: usize,
    routed_factor: f32,
    approximations: Vec<String>,
}

/// Which stock form the model takes. `shared_ok`: the target has shared experts; `mup_ok`: it
/// has HyperCLOVA X's scalars. Returns the plan, or what is missing.
fn stock_plan(
    cfg: &ModelConfig,
    layers: &[Layer],
    shared_ok: bool,
    mup_ok: bool,
    approximate: bool,
) -> Result<StockPlan, Vec<String>> {
    let mut missing = Vec::new();
    let mut soft = Vec::new();
    if cfg.use_post_norm {
        missing.push("Peri-LN (post-norms around attention and FFN) has no place in it".to_string());
    }
    if cfg.architecture == Architecture::HyperClovaX && !mup_ok {
        missing.push("HyperCLOVA X's muP multipliers have no place in it".into());
    }
    if cfg.mlp_bias || cfg.attention_bias {
        missing.push("attention / FFN biases".into());
    }
    if matches!(cfg.rope_scaling, Some(RopeScaling::Factors(_))) {
        missing.push("per-frequency RoPE factors have no config.json form".into());
    }
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        missing.push(format!(
            "head_dim {} x {} heads is not the hidden size {} (the stock classes derive head_dim)",
            cfg.head_dim, cfg.num_heads, cfg.hidden_size
        ));
    }
    let mut blocks = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        match layer {
            Layer::Moe(b) => blocks.push(*b),
            Layer::Dense(_) => missing.push(format!("layer {l} is dense (every layer must be MoE)")),
            Layer::Sparse(_, s) => missing.push(format!("layer {l} is dense with activation sparsity ({s})")),
        }
    }
    let Some(first) = blocks.first() else {
        missing.push("the model has no MoE layer".into());
        return Err(missing);
    };
    let experts = first.num_experts();
    let expert_size = first.params.experts[0].intermediate_size();
    let shared_size = first.params.shared.as_ref().map_or(0, DenseFfn::intermediate_size);
    let k = blocks.iter().map(|b| max_k(&b.policy)).max().unwrap_or(1);
    let mut weights = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        let Layer::Moe(b) = layer else { continue };
        if b.num_experts() != experts {
            missing.push(format!("layer {l} has {} experts, layer 0 {experts}", b.num_experts()));
        }
        if b.params.experts.iter().any(|e| e.intermediate_size() != expert_size) {
            missing.push(format!("layer {l}'s experts are not all of {expert_size} neurons"));
        }
        if b.params.shared.as_ref().map_or(0, DenseFfn::intermediate_size) != shared_size {
            missing.push(format!("layer {l}'s shared experts differ in size from layer 0's"));
        }
        if b.params.router.bias.is_some() {
            missing.push(format!("layer {l}'s router has a bias"));
        }
        if b.policy != (Policy::TopK { k }) {
            soft.push(format!("layer {l} routes by {} (one top-k for every layer)", b.policy));
        }
        if !weights.contains(&b.combine.weights) {
            weights.push(b.combine.weights);
        }
    }
    if shared_size > 0 && !shared_ok {
        missing.push(format!(
            "always-on shared experts ({shared_size} neurons per layer) have no place in it"
        ));
    }
    let mut routed_factor = 1.0;
    for w in &weights {
        match w {
            CombineWeights::Renormalized => {}
            CombineWeights::Unit | CombineWeights::UnitStraightThrough => {
                soft.push(format!(
                    "combine weights {w:?} (chosen experts summed, weight 1): the stock rule is the softmax over the chosen k"
                ));
                routed_factor = k as f32;
            }
            CombineWeights::Raw => soft.push(
                "combine weights Raw (softmax over all experts): the stock rule is the softmax over the chosen k"
                    .into(),
            ),
        }
    }
    if weights.len() > 1 {
        missing.push("layers combine their experts by different rules".into());
    }
    if !missing.is_empty() || (!soft.is_empty() && !approximate) {
        missing.extend(soft);
        return Err(missing);
    }
    let mut approximations = Vec::new();
    if !soft.is_empty() {
        approximations.push(format!(
            "every layer runs top-{k}, the largest k any layer's policy may run"
        ));
        if routed_factor != 1.0 {
            approximations.push(format!(
                "Unit weights become the softmax over the chosen {k}, routed down projections x{k}"
            ));
        } else if weights.contains(&CombineWeights::Raw) {
            approximations.push("Raw weights become the softmax over the chosen k".into());
        }
    }
    Ok(StockPlan {
        k,
        experts,
        expert_size,
        shared_size,
        routed_factor,
        approximations,
    })
}

/// The routed experts, router and shared experts of an MoE block in PyTorch layout, with the
/// combine scale and `factor` folded into the routed down projections.
fn block_weights(b: &MoeBlock, factor: f32) -> (HostTensor, Vec<HostFfn>, Option<HostFfn>) {
    let w = block_host_weights(b);
    let (router, mut experts, shared) = (w.full_router(), w.experts, w.shared);
    if factor != 1.0 {
        for e in &mut experts {
            e.down.data.iter_mut().for_each(|v| *v *= factor);
        }
    }
    (router, experts, shared)
}

/// Tensors stacked along a new first axis.
fn stack(ts: &[&HostTensor]) -> HostTensor {
    let mut shape = vec![ts.len()];
    shape.extend_from_slice(&ts[0].shape);
    HostTensor::new(shape, ts.iter().flat_map(|t| t.data.iter().copied()).collect())
}

/// Rows of `a` then rows of `b` (`[ra + rb, cols]`).
fn cat_rows(a: &HostTensor, b: &HostTensor) -> HostTensor {
    HostTensor::new(
        vec![a.shape[0] + b.shape[0], a.shape[1]],
        a.data.iter().chain(&b.data).copied().collect(),
    )
}

/// The source's tensors that are not FFN weights (embeddings, attention, norms, head), by name.
fn non_ffn_tensors(ckpt: &Checkpoint) -> Result<BTreeMap<String, HostTensor>, ExportError> {
    let mut out = BTreeMap::new();
    for info in ckpt.weights.infos() {
        let ffn = info.name.contains(".mlp.") || info.name.contains(".block_sparse_moe.");
        if !ffn {
            out.insert(info.name.clone(), ckpt.weights.load(&info.name)?);
        }
    }
    Ok(out)
}

/// The Hugging Face config of the dense base with both spellings of RoPE (transformers 4's
/// `rope_theta` / `rope_scaling`, 5's `rope_parameters`), f32 weights.
fn base_config(cfg: &ModelConfig, path: &Path) -> Result<Value, ExportError> {
    let mut v = cfg.to_hf_json().map_err(|msg| ExportError::Output {
        path: path.to_path_buf(),
        msg,
    })?;
    let mut rope = match &v["rope_scaling"] {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({"rope_type": "default"}),
    };
    rope["rope_theta"] = v["rope_theta"].clone();
    v["rope_parameters"] = rope;
    Ok(v)
}

/// A folder written under `.NAME.partial` and renamed to `out` by [`Staging::finish`]
/// (a [`ladimo_io::atomic::AtomicDir`]: an export that fails half-way leaves nothing behind),
/// with the names of the files written into it.
struct Staging {
    dir: ladimo_io::atomic::AtomicDir,
    files: Vec<String>,
}

impl Staging {
    fn new(out: &Path) -> Result<Self, ExportError> {
        if out.exists() {
            return Err(ExportError::Output {
                path: out.to_path_buf(),
                msg: "already exists; refusing to overwrite".into(),
            });
        }
        Ok(Self {
            dir: ladimo_io::atomic::AtomicDir::new(out)?,
            files: Vec::new(),
        })
    }

    fn path(&mut self, file: &str) -> PathBuf {
        self.files.push(file.to_string());
        self.dir.path().join(file)
    }

    fn write(&mut self, file: &str, text: &str) -> Result<(), ExportError> {
        let p = self.path(file);
        std::fs::write(&p, text).map_err(|e| ExportError::Output {
            path: p.clone(),
            msg: e.to_string(),
        })
    }

    fn finish(self) -> Result<Vec<String>, ExportError> {
        self.dir.commit()?;
        Ok(self.files)
    }
}

/// The tokenizer files every Hugging Face export carries.
fn write_tokenizer(ckpt: &Checkpoint, st: &mut Staging) -> Result<(), ExportError> {
    let tok = ckpt.tokenizer()?;
    st.write("tokenizer.json", &tok.to_json()?)?;
    let mut cfg = json!({"tokenizer_class": "PreTrainedTokenizerFast"});
    if let Some(t) = &tok.chat_template {
        cfg["chat_template"] = t.clone().into();
    }
    st.write("tokenizer_config.json", &serde_json::to_string_pretty(&cfg).unwrap())
}

fn write_weights(st: &mut Staging, tensors: &BTreeMap<String, HostTensor>) -> Result<(), ExportError> {
    let p = st.path("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    ladimo_io::write_safetensors(&p, tensors, Some(meta))?;
    Ok(())
}

/// Which format can carry a model that `format` cannot.
fn suggestion(format: Format, cfg: &ModelConfig, layers: &[Layer]) -> String {
    let has_shared = layers
        .iter()
        .any(|l| matches!(l, Layer::Moe(b) if b.params.shared.is_some()));
    let mut s = String::from("`hf-remote` (transformers with trust_remote_code) carries it exactly");
    if cfg.use_post_norm {
        return s + "; no stock format has Peri-LN";
    }
    if format == Format::Mixtral && has_shared {
        s += "; `granitemoe` and `gguf` (granitemoe architecture) carry shared experts";
    }
    if matches!(format, Format::Mixtral | Format::GraniteMoe | Format::Gguf) {
        s += "; `--approximate` writes the nearest stock form where only the routing or combine rule differs";
    }
    s
}

/// Export `model` (loaded from `ckpt`, with any policy file applied) to `out` in `opts.format`.
pub fn export(
    ckpt: &Checkpoint,
    model: &Transformer,
    opts: &ExportOptions,
    out: &Path,
) -> Result<ExportReport, ExportError> {
    let cfg = &model.config;
    let layers = layers(model).map_err(|msg| ExportError::Output {
        path: ckpt.path.clone(),
        msg,
    })?;
    let cannot = |missing: Vec<String>| ExportError::Cannot {
        format: opts.format,
        missing,
        suggestion: suggestion(opts.format, cfg, &layers),
    };
    // Only hf-remote carries thresholds inside MoE experts (ladimo's own format keeps them in the
    // policy file): refuse rather than write a model that runs without them.
    let thresholded = thresholded_layers(&layers);
    if !thresholded.is_empty() && opts.format != Format::HfRemote {
        return Err(ExportError::Cannot {
            format: opts.format,
            missing: thresholded,
            suggestion: "`hf-remote` (transformers with trust_remote_code) carries them exactly; ladimo runs \
                         them from the policy file (--policy)"
                .into(),
        });
    }
    match opts.format {
        Format::Ladimo => {
            if let Some(l) = layers.iter().position(|l| matches!(l, Layer::Sparse(..))) {
                return Err(ExportError::Cannot {
                    format: Format::Ladimo,
                    missing: vec![format!(
                        "layer {l} has activation sparsity, which ladimo keeps in a policy file (pass it with --policy)"
                    )],
                    suggestion: "`hf-remote` carries sparsity in the folder".into(),
                });
            }
            let blocks: Vec<Option<&MoeBlock>> = layers
                .iter()
                .map(|l| match l {
                    Layer::Moe(b) => Some(*b),
                    _ => None,
                })
                .collect();
            let section = crate::save_moe_checkpoint(ckpt, &blocks, out)?;
            Ok(ExportReport {
                format: opts.format,
                target: if section.mixtral_exact {
                    "MixtralForCausalLM (ladimo format)".into()
                } else {
                    "LadimoMoeForCausalLM (ladimo format)".into()
                },
                approximations: vec![],
                files: vec![
                    "config.json".into(),
                    "model.safetensors".into(),
                    "tokenizer.json".into(),
                ],
            })
        }
        Format::Mixtral | Format::GraniteMoe => {
            let granite = opts.format == Format::GraniteMoe;
            let plan = stock_plan(cfg, &layers, granite, granite, opts.approximate).map_err(cannot)?;
            write_hf_stock(ckpt, cfg, &layers, &plan, granite, out).map(|files| ExportReport {
                format: opts.format,
                target: if granite {
                    "GraniteMoeSharedForCausalLM".into()
                } else {
                    "MixtralForCausalLM".into()
                },
                approximations: plan.approximations,
                files,
            })
        }
        Format::HfRemote => write_hf_remote(ckpt, cfg, &layers, out).map(|files| ExportReport {
            format: opts.format,
            target: "LadimoForCausalLM (trust_remote_code)".into(),
            approximations: vec![],
            files,
        }),
        Format::Gguf => write_gguf(ckpt, cfg, &layers, opts, out).map_err(|e| match e {
            GgufFail::Missing(m) => cannot(m),
            GgufFail::Other(e) => e,
        }),
    }
}

/// A Mixtral or GraniteMoeShared checkpoint folder following `plan`.
fn write_hf_stock(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    layers: &[Layer],
    plan: &StockPlan,
    granite: bool,
    out: &Path,
) -> Result<Vec<String>, ExportError> {
    let mut st = Staging::new(out)?;
    let mut tensors = non_ffn_tensors(ckpt)?;
    for (l, layer) in layers.iter().enumerate() {
        let Layer::Moe(b) = layer else {
            unreachable!("the plan has every layer MoE")
        };
        let (router, experts, shared) = block_weights(b, plan.routed_factor);
        let p = format!("model.layers.{l}");
        if granite {
            // The layout of GraniteMoe's hub checkpoints (transformers 5 renames it on load):
            // input_linear = [gate; up] per expert, output_linear = down.
            let gate_up: Vec<HostTensor> = experts.iter().map(|e| cat_rows(&e.gate, &e.up)).collect();
            tensors.insert(
                format!("{p}.block_sparse_moe.input_linear.weight"),
                stack(&gate_up.iter().collect::<Vec<_>>()),
            );
            tensors.insert(
                format!("{p}.block_sparse_moe.output_linear.weight"),
                stack(&experts.iter().map(|e| &e.down).collect::<Vec<_>>()),
            );
            tensors.insert(format!("{p}.block_sparse_moe.router.layer.weight"), router);
            if let Some(s) = shared {
                tensors.insert(format!("{p}.shared_mlp.input_linear.weight"), cat_rows(&s.gate, &s.up));
                tensors.insert(format!("{p}.shared_mlp.output_linear.weight"), s.down);
            }
        } else {
            tensors.insert(format!("{p}.block_sparse_moe.gate.weight"), router);
            for (e, f) in experts.into_iter().enumerate() {
                let q = format!("{p}.block_sparse_moe.experts.{e}");
                tensors.insert(format!("{q}.w1.weight"), f.gate);
                tensors.insert(format!("{q}.w3.weight"), f.up);
                tensors.insert(format!("{q}.w2.weight"), f.down);
            }
        }
    }
    write_weights(&mut st, &tensors)?;
    drop(tensors);
    let mut config = base_config(cfg, &ckpt.path)?;
    for key in ["mlp_bias", "use_post_norm", "head_dim"] {
        config.as_object_mut().expect("object").remove(key);
    }
    config["intermediate_size"] = plan.expert_size.into();
    config["num_local_experts"] = plan.experts.into();
    config["num_experts_per_tok"] = plan.k.into();
    config["output_router_logits"] = false.into();
    config["router_aux_loss_coef"] = 0.0.into();
    if granite {
        config["architectures"] = json!(["GraniteMoeSharedForCausalLM"]);
        config["model_type"] = "granitemoeshared".into();
        config["shared_intermediate_size"] = plan.shared_size.into();
        let (emb, attn, resid, logits) = mup_scalars(cfg);
        config["embedding_multiplier"] = emb.into();
        config["attention_multiplier"] = attn.into();
        config["residual_multiplier"] = resid.into();
        config["logits_scaling"] = logits.into();
    } else {
        config["architectures"] = json!(["MixtralForCausalLM"]);
        config["model_type"] = "mixtral".into();
        config["sliding_window"] = Value::Null;
        config["router_jitter_noise"] = 0.0.into();
    }
    if !plan.approximations.is_empty() {
        config["ladimo_approximations"] = json!(plan.approximations);
    }
    st.write("config.json", &serde_json::to_string_pretty(&config).unwrap())?;
    write_tokenizer(ckpt, &mut st)?;
    st.finish()
}

/// Granite's scalars for this base: embedding, attention (the score scale), residual and logits
/// multipliers. Granite divides the logits by `logits_scaling`; HyperCLOVA X multiplies by its
/// own, so the export writes the inverse. LLaMA: 1, 1/sqrt(head_dim), 1, 1.
fn mup_scalars(cfg: &ModelConfig) -> (f64, f64, f64, f64) {
    (
        cfg.embedding_multiplier,
        cfg.attention_multiplier,
        cfg.residual_multiplier,
        1.0 / cfg.logits_scaling,
    )
}

/// A folder transformers loads with `trust_remote_code`: the base model's attention and norms
/// (transformers' own LLaMA or HyperCLOVA X classes), each layer's FFN as ladimo computes it.
fn write_hf_remote(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    layers: &[Layer],
    out: &Path,
) -> Result<Vec<String>, ExportError> {
    let mut st = Staging::new(out)?;
    let mut tensors = non_ffn_tensors(ckpt)?;
    let mut specs = Vec::new();
    let put = |tensors: &mut BTreeMap<String, HostTensor>, q: &str, f: HostFfn| {
        tensors.insert(format!("{q}.gate_proj.weight"), f.gate);
        tensors.insert(format!("{q}.up_proj.weight"), f.up);
        tensors.insert(format!("{q}.down_proj.weight"), f.down);
    };
    for (l, layer) in layers.iter().enumerate() {
        let p = format!("model.layers.{l}.mlp");
        match layer {
            Layer::Dense(d) => put(&mut tensors, &p, HostFfn::from_dense(d)),
            Layer::Sparse(d, s) => {
                put(&mut tensors, &p, HostFfn::from_dense(d));
                specs.push(json!({"layer": l, "kind": "sparse", "sparsity": s}));
            }
            Layer::Moe(b) => {
                let w = block_host_weights(b);
                let (router, bias, experts, shared) = (w.full_router(), w.router_bias, w.experts, w.shared);
                let sizes: Vec<usize> = experts.iter().map(|e| e.gate.shape[0]).collect();
                let shared_size = shared.as_ref().map_or(0, |s| s.gate.shape[0]);
                tensors.insert(format!("{p}.router.weight"), router);
                let has_bias = bias.is_some();
                if let Some(bias) = bias {
                    tensors.insert(format!("{p}.router.bias"), bias);
                }
                for (e, f) in experts.into_iter().enumerate() {
                    put(&mut tensors, &format!("{p}.experts.{e}"), f);
                }
                if let Some(s) = shared {
                    put(&mut tensors, &format!("{p}.shared"), s);
                }
                specs.push(json!({
                    "layer": l, "kind": "moe", "experts": sizes, "shared": shared_size,
                    "router_bias": has_bias, "policy": b.policy,
                    // The combine scale is folded into the routed down projections.
                    "weights": b.combine.weights,
                    // TEAL thresholds inside the experts that run, or null.
                    "sparsity": b.sparsity(),
                }));
            }
        }
    }
    write_weights(&mut st, &tensors)?;
    drop(tensors);
    let mut config = base_config(cfg, &ckpt.path)?;
    let (config_class, model_class, base_type) = match cfg.architecture {
        Architecture::Llama => ("LadimoConfig", "LadimoForCausalLM", "llama"),
        Architecture::HyperClovaX => ("LadimoHyperClovaXConfig", "LadimoHyperClovaXForCausalLM", "hyperclovax"),
    };
    config["architectures"] = json!([model_class]);
    config["model_type"] = "ladimo_moe".into();
    config["ladimo_base_model_type"] = base_type.into();
    config["auto_map"] = json!({
        "AutoConfig": format!("configuration_ladimo.{config_class}"),
        "AutoModelForCausalLM": format!("modeling_ladimo.{model_class}"),
    });
    config["ladimo_layers"] = Value::Array(specs);
    st.write("config.json", &serde_json::to_string_pretty(&config).unwrap())?;
    st.write("modeling_ladimo.py", REMOTE_MODELING)?;
    st.write("configuration_ladimo.py", REMOTE_CONFIGURATION)?;
    write_tokenizer(ckpt, &mut st)?;
    st.finish()
}

enum GgufFail {
    Missing(Vec<String>),
    Other(ExportError),
}

impl From<ExportError> for GgufFail {
    fn from(e: ExportError) -> Self {
        GgufFail::Other(e)
    }
}

impl From<ladimo_io::Error> for GgufFail {
    fn from(e: ladimo_io::Error) -> Self {
        GgufFail::Other(e.into())
    }
}

/// llama.cpp's `permute(w, n_head)` of Q/K rows (interleaved RoPE): GGUF row `h*hd + 2i + j`
/// holds HF row `h*hd + j*hd/2 + i`. `ladimo_io`'s reader undoes it.
fn permute_rows(t: &HostTensor, n_head: usize) -> HostTensor {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = t.clone();
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let to = h * hd + 2 * i + j;
                let from = h * hd + j * half + i;
                out.data[to * cols..(to + 1) * cols].copy_from_slice(&t.data[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// LLaMA 3's RoPE frequency divisors (`rope_freqs.weight`, one per frequency), as llama.cpp's
/// converter writes them.
fn llama3_rope_divisors(cfg: &ModelConfig, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..cfg.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let d = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            d as f32
        })
        .collect()
}

/// The tokenizer as llama.cpp's `gpt2` (byte-level BPE) metadata.
fn gguf_tokenizer(ckpt: &Checkpoint, cfg: &ModelConfig, w: &mut GgufWriter) -> Result<(), GgufFail> {
    let tok = ckpt.tokenizer()?;
    let json: Value = serde_json::from_str(&tok.to_json()?).map_err(|e| {
        GgufFail::Other(ExportError::Output {
            path: ckpt.path.clone(),
            msg: format!("tokenizer: {e}"),
        })
    })?;
    let model = &json["model"];
    let not_bpe = || {
        GgufFail::Missing(vec![
            "the tokenizer is not byte-level BPE (llama.cpp's gpt2 tokenizer)".to_string(),
        ])
    };
    if model["type"] != "BPE" {
        return Err(not_bpe());
    }
    let vocab = model["vocab"].as_object().ok_or_else(not_bpe)?;
    let n = cfg.vocab_size.max(vocab.len());
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![1i32; n];
    for (t, id) in vocab {
        if let Some(id) = id.as_u64().filter(|&i| (i as usize) < n) {
            tokens[id as usize] = t.clone();
        }
    }
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str())
            && (id as usize) < n
        {
            tokens[id as usize] = c.to_string();
            types[id as usize] = if a["special"] == true { 3 } else { 4 };
        }
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .ok_or_else(not_bpe)?
        .iter()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
            _ => None,
        })
        .collect();
    // The pre-tokenizer by its shape: SmolLM's splits digits one by one before the GPT-2 regex.
    let pre = json["pre_tokenizer"].to_string();
    let pre = if pre.contains("\"Digits\"") && pre.contains("\"individual_digits\":true") {
        "smollm"
    } else if json["pre_tokenizer"]["type"] == "ByteLevel" {
        "gpt-2"
    } else {
        "default"
    };
    w.set("tokenizer.ggml.model", MetaValue::Str("gpt2".into()));
    w.set("tokenizer.ggml.pre", MetaValue::Str(pre.into()));
    w.set("tokenizer.ggml.tokens", MetaValue::StrArray(tokens));
    w.set("tokenizer.ggml.token_type", MetaValue::I32Array(types));
    w.set("tokenizer.ggml.merges", MetaValue::StrArray(merges));
    if let Some(b) = cfg.bos_token_id {
        w.set("tokenizer.ggml.bos_token_id", MetaValue::U32(b));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        w.set("tokenizer.ggml.eos_token_id", MetaValue::U32(e));
    }
    w.set("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    if let Some(t) = &tok.chat_template {
        w.set("tokenizer.chat_template", MetaValue::Str(t.clone()));
    }
    Ok(())
}

/// A GGUF file `out/model.gguf` that llama.cpp runs.
fn write_gguf(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    layers: &[Layer],
    opts: &ExportOptions,
    out: &Path,
) -> Result<ExportReport, GgufFail> {
    let dense = layers.iter().all(|l| matches!(l, Layer::Dense(_)));
    let has_shared = layers
        .iter()
        .any(|l| matches!(l, Layer::Moe(b) if b.params.shared.is_some()));
    let needs_mup = cfg.architecture == Architecture::HyperClovaX;
    let arch = opts.gguf_arch.unwrap_or(if has_shared || needs_mup {
        GgufArch::GraniteMoe
    } else {
        GgufArch::Llama
    });
    // The guard: llama.cpp's `llama` loads `*_shexp` tensors and never uses them.
    if arch == GgufArch::Llama && has_shared {
        return Err(GgufFail::Missing(vec![
            "shared experts: llama.cpp's `llama` architecture would load *_shexp tensors and silently skip them \
             (use the granitemoe architecture)"
                .into(),
        ]));
    }
    let (plan, target) = if dense {
        if arch != GgufArch::Llama || needs_mup || cfg.use_post_norm || cfg.mlp_bias {
            return Err(GgufFail::Missing(vec![
                "a dense model exports to llama.cpp's `llama` architecture only, without muP scalars, Peri-LN or FFN biases".into(),
            ]));
        }
        (None, "llama (dense)")
    } else {
        let plan = stock_plan(
            cfg,
            layers,
            arch == GgufArch::GraniteMoe,
            arch == GgufArch::GraniteMoe,
            opts.approximate,
        )
        .map_err(GgufFail::Missing)?;
        (Some(plan), arch.name())
    };
    let mut st = Staging::new(out)?;
    let a = arch.name();
    let mut w = GgufWriter::new();
    w.set("general.architecture", MetaValue::Str(a.into()));
    w.set("general.name", MetaValue::Str("ladimo export".into()));
    w.set("general.file_type", MetaValue::U32(opts.gguf_type.file_type()));
    w.set("general.quantization_version", MetaValue::U32(2));
    let u = |v: usize| MetaValue::U32(v as u32);
    w.set(format!("{a}.vocab_size"), u(cfg.vocab_size));
    w.set(format!("{a}.context_length"), u(cfg.max_position_embeddings));
    w.set(format!("{a}.embedding_length"), u(cfg.hidden_size));
    w.set(format!("{a}.block_count"), u(cfg.num_layers));
    w.set(
        format!("{a}.feed_forward_length"),
        u(plan.as_ref().map_or(cfg.intermediate_size, |p| p.expert_size)),
    );
    w.set(format!("{a}.attention.head_count"), u(cfg.num_heads));
    w.set(format!("{a}.attention.head_count_kv"), u(cfg.num_kv_heads));
    w.set(format!("{a}.attention.key_length"), u(cfg.head_dim));
    w.set(format!("{a}.attention.value_length"), u(cfg.head_dim));
    w.set(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(cfg.rms_norm_eps as f32),
    );
    w.set(format!("{a}.rope.freq_base"), MetaValue::F32(cfg.rope_theta as f32));
    w.set(format!("{a}.rope.dimension_count"), u(cfg.head_dim));
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        w.set(format!("{a}.rope.scaling.type"), MetaValue::Str("linear".into()));
        w.set(format!("{a}.rope.scaling.factor"), MetaValue::F32(factor as f32));
    }
    if let Some(p) = &plan {
        w.set(format!("{a}.expert_count"), u(p.experts));
        w.set(format!("{a}.expert_used_count"), u(p.k));
        w.set(format!("{a}.expert_feed_forward_length"), u(p.expert_size));
        if p.shared_size > 0 {
            w.set(format!("{a}.expert_shared_feed_forward_length"), u(p.shared_size));
        }
    }
    if arch == GgufArch::GraniteMoe {
        let (emb, attn, resid, logits) = mup_scalars(cfg);
        w.set(format!("{a}.embedding_scale"), MetaValue::F32(emb as f32));
        w.set(format!("{a}.attention.scale"), MetaValue::F32(attn as f32));
        w.set(format!("{a}.residual_scale"), MetaValue::F32(resid as f32));
        w.set(format!("{a}.logit_scale"), MetaValue::F32(logits as f32));
    }
    gguf_tokenizer(ckpt, cfg, &mut w)?;

    // Matrices in the chosen type (F16 where a Q8_0 row would not fill whole blocks); vectors
    // and routers in F32, as llama.cpp's converter keeps them.
    let big = opts.gguf_type;
    let add = |w: &mut GgufWriter, name: String, t: &HostTensor, ty: GgmlType| {
        if w.add_tensor(name.clone(), t, ty).is_err() {
            w.add_tensor(name, t, GgmlType::F16).expect("F16 takes any shape");
        }
    };
    let src = non_ffn_tensors(ckpt)?;
    let get = |n: &str| -> Result<&HostTensor, GgufFail> {
        src.get(n).ok_or_else(|| {
            GgufFail::Other(ExportError::Output {
                path: ckpt.path.clone(),
                msg: format!("missing tensor {n}"),
            })
        })
    };
    add(
        &mut w,
        "token_embd.weight".into(),
        get("model.embed_tokens.weight")?,
        big,
    );
    add(
        &mut w,
        "output_norm.weight".into(),
        get("model.norm.weight")?,
        GgmlType::F32,
    );
    if !cfg.tie_word_embeddings {
        add(&mut w, "output.weight".into(), get("lm_head.weight")?, big);
    }
    if let Some(RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    }) = cfg.rope_scaling
    {
        let d = llama3_rope_divisors(
            cfg,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        );
        add(
            &mut w,
            "rope_freqs.weight".into(),
            &HostTensor::new(vec![d.len()], d),
            GgmlType::F32,
        );
    }
    for (l, layer) in layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        add(
            &mut w,
            format!("{b}.attn_norm.weight"),
            get(&format!("{p}.input_layernorm.weight"))?,
            GgmlType::F32,
        );
        add(
            &mut w,
            format!("{b}.ffn_norm.weight"),
            get(&format!("{p}.post_attention_layernorm.weight"))?,
            GgmlType::F32,
        );
        let q = permute_rows(get(&format!("{p}.self_attn.q_proj.weight"))?, cfg.num_heads);
        let k = permute_rows(get(&format!("{p}.self_attn.k_proj.weight"))?, cfg.num_kv_heads);
        add(&mut w, format!("{b}.attn_q.weight"), &q, big);
        add(&mut w, format!("{b}.attn_k.weight"), &k, big);
        add(
            &mut w,
            format!("{b}.attn_v.weight"),
            get(&format!("{p}.self_attn.v_proj.weight"))?,
            big,
        );
        add(
            &mut w,
            format!("{b}.attn_output.weight"),
            get(&format!("{p}.self_attn.o_proj.weight"))?,
            big,
        );
        match (layer, &plan) {
            (Layer::Dense(d), None) => {
                let f = HostFfn::from_dense(d);
                add(&mut w, format!("{b}.ffn_gate.weight"), &f.gate, big);
                add(&mut w, format!("{b}.ffn_up.weight"), &f.up, big);
                add(&mut w, format!("{b}.ffn_down.weight"), &f.down, big);
            }
            (Layer::Moe(blk), Some(plan)) => {
                let (router, experts, shared) = block_weights(blk, plan.routed_factor);
                add(&mut w, format!("{b}.ffn_gate_inp.weight"), &router, GgmlType::F32);
                let st = |f: fn(&HostFfn) -> &HostTensor| stack(&experts.iter().map(f).collect::<Vec<_>>());
                add(&mut w, format!("{b}.ffn_gate_exps.weight"), &st(|e| &e.gate), big);
                add(&mut w, format!("{b}.ffn_up_exps.weight"), &st(|e| &e.up), big);
                add(&mut w, format!("{b}.ffn_down_exps.weight"), &st(|e| &e.down), big);
                if let Some(s) = shared {
                    add(&mut w, format!("{b}.ffn_gate_shexp.weight"), &s.gate, big);
                    add(&mut w, format!("{b}.ffn_up_shexp.weight"), &s.up, big);
                    add(&mut w, format!("{b}.ffn_down_shexp.weight"), &s.down, big);
                }
            }
            _ => unreachable!("the plan says every layer is MoE, or none is"),
        }
    }
    drop(src);
    let p = st.path("model.gguf");
    w.write(&p)?;
    let approximations = plan.map(|p| p.approximations).unwrap_or_default();
    Ok(ExportReport {
        format: Format::Gguf,
        target: format!("{target} GGUF, matrices in {:?}", opts.gguf_type),
        approximations,
        files: st.finish()?,
    })
}

/// The best exact stock export of `model` (GraniteMoeShared, else Mixtral), or why none is
/// exact. For `convert`, which writes it beside ladimo's own format.
pub fn best_stock_format(model: &Transformer) -> Result<Format, String> {
    let layers = layers(model)?;
    let cfg = &model.config;
    let mixtral = stock_plan(cfg, &layers, false, false, false);
    if mixtral.is_ok() {
        return Ok(Format::Mixtral);
    }
    stock_plan(cfg, &layers, true, true, false)
        .map(|_| Format::GraniteMoe)
        .map_err(|m| m.join("; "))
}

/// For `convert`: beside ladimo's own checkpoint in `folder`, the best exact stock export of
/// `model` (`folder/granitemoe`; none when `folder` is itself a Mixtral checkpoint, or when no
/// stock format is exact), and a sentence saying which in `folder/stock-export.txt`, returned.
pub fn write_stock_beside(ckpt: &Checkpoint, model: &Transformer, folder: &Path) -> Result<String, ExportError> {
    let thresholded = layers(model).map(|l| thresholded_layers(&l)).unwrap_or_default();
    let text = match best_stock_format(model) {
        _ if !thresholded.is_empty() => format!(
            "No stock format carries TEAL thresholds inside MoE experts ({}); ladimo runs them with policy.toml, and `ladimo export FOLDER --policy policy.toml --format hf-remote` writes a transformers folder (trust_remote_code) that carries them exactly.",
            thresholded.join("; ")
        ),
        Ok(Format::Mixtral) => "The checkpoint is itself a MixtralForCausalLM (transformers, vLLM).".to_string(),
        Ok(f) => {
            let r = export(ckpt, model, &ExportOptions::new(f), &folder.join(f.name()))?;
            format!("Exact stock export: {}/ ({}).", f.name(), r.target)
        }
        Err(why) => format!(
            "No stock format is exact ({why}); `ladimo export --format hf-remote` is, and `--format granitemoe --approximate` approximates."
        ),
    };
    let p = folder.join("stock-export.txt");
    std::fs::write(&p, format!("{text}\n")).map_err(|e| ExportError::Output {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_rows_is_what_the_gguf_reader_undoes() {
        // 2 heads of head_dim 4, 1 column: HF rows [h0: 0 1 2 3, h1: 4 5 6 7].
        let t = HostTensor::new(vec![8, 1], (0..8).map(|i| i as f32).collect());
        let p = permute_rows(&t, 2);
        // Interleaved: pairs (i, i + half) per head.
        assert_eq!(p.data, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn formats_parse_by_name_and_unknown_ones_list_the_choices() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        let e = "onnx".parse::<Format>().unwrap_err();
        assert!(e.contains("hf-remote") && e.contains("gguf"), "{e}");
    }
}
