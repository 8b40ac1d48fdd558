//! Activation sparsity on a dense SwiGLU FFN: the training-free baselines a user can apply
//! without converting (static pruning, CATS, TEAL), as per-layer policies, calibrated on text.
//!
//! For one token, with `x` the FFN input (after the norm), `a = silu(gate x)`, `u = up x` and
//! `h = a * u`, the dense FFN is `y = down h`, and it reads `3 * hidden * inter` parameters:
//!
//! | method | what is zeroed | parameters read per token |
//! |---|---|---|
//! | `Static` (keep a fixed neuron set K) | `h_j`, `j not in K` | `3 * hidden * |K|` |
//! | `Cats` (arXiv 2404.08763) | `h_j` where `|a_j| < t` | `hidden * inter + 2 * hidden * kept` (gate is always read) |
//! | `Teal` (arXiv 2408.14690) | `x_i` where `|x_i| < t_x`, then `h_j` where `|h_j| < t_h` | `2 * inter * kept_x + hidden * kept_h` |
//!
//! A zero `x_i` means column `i` of gate and up is not read, a zero `h_j` that column `j` of down
//! (and, for CATS, row `j` of up) is not read: that is where a kernel saves bytes. Here, in burn,
//! the masks are applied to dense products ([`SparseFfn`]): the numbers a sparse kernel must
//! reproduce, and the count of parameters it would read.
//!
//! **Calibration** ([`calibrate`]) runs the dense model over calibration windows with every FFN
//! recording its activations, then sets each layer's thresholds so that a share `1 - b` of the
//! entries falls under them on the calibration text (`b` = the FFN budget, the share of FFN
//! parameters read): TEAL zeroes `1 - b` of `x` and of `h` (reads `b`), CATS `3 (1 - b) / 2` of
//! `a` (reads `1/3 + 2/3 (1 - s) = b`; a budget under 1/3 is impossible), static keeps the `b *
//! inter` neurons with the largest mean `|h_j| * ||down_j||`. Quantiles come from log-spaced
//! histograms (32 bins per octave, exact counts), so memory does not grow with the text.
//! On held-out text the share read differs from `b` a little; [`SparseFfn`] measures it.
//!
//! **MoE layers** take TEAL only (static sets and CATS inside experts are refused by name): the
//! router sees the unthresholded `x`, `x` is thresholded once for every expert that runs, and
//! `h` inside each expert that runs (shared and chosen routed ones); the block header
//! ([`crate::MoeBlock`]) gives the exact rule and count. Calibrating an MoE layer runs the block
//! under its current routing policy, without thresholds, and takes the quantiles of its `x` and
//! of `h` over the neurons of the experts that actually run (routed experts a token did not
//! choose contribute nothing), so `b` is the share of the *run experts'* parameters read.

use std::any::Any;
use std::sync::Mutex;

use burn::module::Module;
use burn::tensor::Tensor;
use ladimo_model::elementwise::{Cut, silu, threshold};
use ladimo_model::util::to_vec;
use ladimo_model::{DenseFfn, FeedForward, FfnError, ModelError, Transformer};
use serde::{Deserialize, Serialize};

use crate::MoeBlock;
use crate::checkpoint::{moe_block, moe_block_mut};

/// One layer's activation sparsity, as saved in policy files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Sparsity {
    /// Only these neurons (indices into the dense FFN's intermediate dimension, ascending) run.
    Static { keep: Vec<u32> },
    /// CATS: `h_j = 0` where `|silu(gate_j x)| < gate`.
    Cats { gate: f32 },
    /// TEAL: `x_i = 0` where `|x_i| < x`; then `h_j = 0` where `|h_j| < h`.
    Teal { x: f32, h: f32 },
}

impl std::fmt::Display for Sparsity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sparsity::Static { keep } => write!(f, "static {} neurons", keep.len()),
            Sparsity::Cats { gate } => write!(f, "CATS |silu(gate)| >= {gate:.4}"),
            Sparsity::Teal { x, h } => write!(f, "TEAL |x| >= {x:.4}, |h| >= {h:.4}"),
        }
    }
}

impl Sparsity {
    /// Refuses thresholds that are not finite and non-negative (static sets have none).
    pub fn check_thresholds(&self) -> Result<(), String> {
        let thresholds: &[f32] = match self {
            Sparsity::Static { .. } => &[],
            Sparsity::Cats { gate } => std::slice::from_ref(gate),
            Sparsity::Teal { x, h } => &[*x, *h],
        };
        if thresholds.iter().any(|t| !(t.is_finite() && *t >= 0.0)) {
            return Err(format!("{self}: thresholds must be finite and >= 0"));
        }
        Ok(())
    }

    pub fn method(&self) -> Method {
        match self {
            Sparsity::Static { .. } => Method::Static,
            Sparsity::Cats { .. } => Method::Cats,
            Sparsity::Teal { .. } => Method::Teal,
        }
    }
}

/// The training-free methods [`calibrate`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Static,
    Cats,
    Teal,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Static, Method::Cats, Method::Teal];

    pub fn name(self) -> &'static str {
        match self {
            Method::Static => "static",
            Method::Cats => "cats",
            Method::Teal => "teal",
        }
    }

    /// Refuses, by name, a method not built inside MoE experts (all but TEAL).
    pub fn check_in_experts(self) -> Result<(), String> {
        match self {
            Method::Teal => Ok(()),
            m => Err(format!(
                "{} inside MoE experts is not supported (only teal is)",
                m.name()
            )),
        }
    }

    /// The share of entries zeroed that makes the FFN read `budget` of its parameters.
    pub fn sparsity_for(self, budget: f64) -> Result<f64, SparsityError> {
        if !(budget > 0.0 && budget <= 1.0) {
            return Err(SparsityError::Budget(format!("budget {budget} must be in (0, 1]")));
        }
        match self {
            Method::Static | Method::Teal => Ok(1.0 - budget),
            Method::Cats => {
                if budget < 1.0 / 3.0 {
                    return Err(SparsityError::Budget(format!(
                        "CATS always reads gate, a third of the FFN: a budget of {budget} (under 1/3) cannot be met"
                    )));
                }
                Ok(1.5 * (1.0 - budget))
            }
        }
    }
}

impl std::str::FromStr for Method {
    type Err = SparsityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| SparsityError::Budget(format!("unknown method `{s}` (static, cats, teal)")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SparsityError {
    #[error("{0}")]
    Budget(String),
    #[error("layer {layer}: {msg}")]
    Layer { layer: usize, msg: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Parameters read and tokens seen since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ReadStats {
    tokens: u64,
    params: f64,
}

/// A dense SwiGLU FFN with activation sparsity applied by masks (exact, not faster: the
/// reference a sparse kernel reproduces), counting the parameters each token would read.
#[derive(Debug)]
pub struct SparseFfn {
    /// The whole dense FFN (what `Static` indices refer to).
    dense: DenseFfn,
    /// For `Static`, the FFN cut down to the kept neurons; else the dense FFN again.
    ffn: DenseFfn,
    sparsity: Sparsity,
    stats: Mutex<ReadStats>,
    /// The host-side kernel for decode ([`FeedForward::prepare_host`]): `ffn`'s weights, laid
    /// out for the policy (input-major gate/up for TEAL).
    kernel: Option<ladimo_kernel::FfnKernel>,
}

impl SparseFfn {
    /// Refuses thresholds that are not finite and non-negative, and static sets with indices out
    /// of range, repeated or unsorted.
    pub fn new(dense: &DenseFfn, sparsity: Sparsity) -> Result<Self, String> {
        let inter = dense.intermediate_size();
        sparsity.check_thresholds()?;
        let ffn = match &sparsity {
            Sparsity::Static { keep } => {
                if keep.is_empty() {
                    return Err("static: keeps no neuron".into());
                }
                if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&k| k as usize >= inter) {
                    return Err(format!(
                        "static: neuron indices must be ascending, distinct and below {inter}"
                    ));
                }
                select_neurons(dense, keep)
            }
            _ => dense.clone(),
        };
        Ok(Self {
            dense: dense.clone(),
            ffn,
            sparsity,
            stats: Mutex::new(ReadStats::default()),
            kernel: None,
        })
    }

    pub fn sparsity(&self) -> &Sparsity {
        &self.sparsity
    }

    /// `[tokens, hidden] -> [tokens, hidden]` and the parameters read, summed over the tokens.
    pub fn forward_tokens(&self, x: Tensor<2>) -> (Tensor<2>, f64) {
        let [n, hidden] = x.dims();
        let inter = self.ffn.intermediate_size();
        let (h, read) = match self.sparsity {
            Sparsity::Static { .. } => (self.ffn.activation(x), (3 * hidden * inter * n) as f64),
            Sparsity::Cats { gate: t } => {
                let (h, kept) = self.ffn.activation_cut(x, Cut::Gate(t));
                (h, (hidden * inter * n) as f64 + 2.0 * hidden as f64 * kept)
            }
            Sparsity::Teal { x: tx, h: th } => {
                let (x, kept_x) = threshold(x, tx);
                let (h, kept_h) = self.ffn.activation_cut(x, Cut::H(th));
                (h, 2.0 * inter as f64 * kept_x + hidden as f64 * kept_h)
            }
        };
        (self.ffn.down_proj.forward(h), read)
    }

    /// The kernel's selection for this policy (`Static` runs the cut-down FFN whole).
    fn selection(&self) -> ladimo_kernel::Selection<'static> {
        use ladimo_kernel::Selection;
        match self.sparsity {
            Sparsity::Static { .. } => Selection::All,
            Sparsity::Cats { gate } => Selection::Cats { gate },
            Sparsity::Teal { x, h } => Selection::Teal { x, h },
        }
    }

    /// [`SparseFfn::forward_tokens`] on the host kernel (`x: [n, hidden]`), when
    /// [`FeedForward::prepare_host`] has built it: the same output, reading only what the policy
    /// keeps. Returns the output and the parameters read.
    pub fn forward_kernel(&self, x: &[f32], n: usize) -> Option<(Vec<f32>, f64)> {
        let k = self.kernel.as_ref()?;
        let mut y = vec![0f32; x.len()];
        let read = k.forward(x, n, &self.selection(), &mut y);
        Some((y, read))
    }

    /// The dense FFN's parameter count (what the budget is a share of).
    pub fn dense_params(&self) -> usize {
        3 * self.dense.hidden_size() * self.dense.intermediate_size()
    }
}

/// The FFN restricted to neurons `keep` (gate/up rows and down columns).
fn select_neurons(dense: &DenseFfn, keep: &[u32]) -> DenseFfn {
    let device = dense.gate_proj.weight.device();
    let idx = burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(keep.iter().map(|&k| k as i64).collect::<Vec<_>>(), [keep.len()]),
        &device,
    );
    // burn's Linear weight is [in, out]: gate/up [hidden, inter] (select columns), down [inter, hidden] (rows).
    let mut f = dense.clone();
    f.gate_proj.weight = f.gate_proj.weight.map(|w| w.select(1, idx.clone()));
    f.up_proj.weight = f.up_proj.weight.map(|w| w.select(1, idx.clone()));
    f.down_proj.weight = f.down_proj.weight.map(|w| w.select(0, idx.clone()));
    for b in [&mut f.gate_proj.bias, &mut f.up_proj.bias].into_iter().flatten() {
        *b = b.clone().map(|b| b.select(0, idx.clone()));
    }
    f
}

impl FeedForward for SparseFfn {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, h] = x.dims();
        let (y, read) = self.forward_tokens(x.reshape([b * s, h]));
        let mut st = self.stats.lock().unwrap();
        st.tokens += (b * s) as u64;
        st.params += read;
        Ok(y.reshape([b, s, h]))
    }

    fn total_params(&self) -> usize {
        self.dense_params()
    }

    fn active_params_per_token(&self) -> f64 {
        let st = self.stats.lock().unwrap();
        if st.tokens == 0 {
            self.dense_params() as f64
        } else {
            st.params / st.tokens as f64
        }
    }

    fn reset_stats(&self) {
        *self.stats.lock().unwrap() = ReadStats::default();
    }

    fn forward_host(&self, x: &[f32], n: usize) -> Option<Result<Vec<f32>, FfnError>> {
        let (y, read) = self.forward_kernel(x, n)?;
        let mut st = self.stats.lock().unwrap();
        st.tokens += n as u64;
        st.params += read;
        Some(Ok(y))
    }

    fn prepare_host(&mut self, dtype: ladimo_kernel::Dtype) {
        let layout = ladimo_kernel::FfnKernel::layout_for(&self.selection());
        self.kernel = ladimo_model::ffn_kernel(&self.ffn, dtype, layout);
    }

    fn describe(&self) -> String {
        format!(
            "dense {}x{}, {}",
            self.dense.hidden_size(),
            self.dense.intermediate_size(),
            self.sparsity
        )
    }
}

/// The dense FFN of layer `layer`, if that layer's block is one (plain or with sparsity).
pub fn dense_ffn(model: &Transformer, layer: usize) -> Option<&DenseFfn> {
    let ffn: &dyn Any = model.layers.get(layer)?.ffn.as_ref();
    ffn.downcast_ref::<DenseFfn>()
        .or_else(|| ffn.downcast_ref::<ladimo_model::KernelFfn>().map(|k| &k.dense))
        .or_else(|| ffn.downcast_ref::<SparseFfn>().map(|s| &s.dense))
}

/// Counts of |v| in log-spaced bins: the bin of a positive f32 is its top 14 bits (exponent and 5
/// mantissa bits: 32 bins per octave, monotonic in the value); zero (and -0) is bin 0. What
/// calibration takes its quantiles from, so memory does not grow with the text.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const HIST_SHIFT: u32 = 18;

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; 1 << (31 - HIST_SHIFT)],
            total: 0,
        }
    }

    pub fn add(&mut self, values: &[f32]) {
        for v in values {
            let bits = v.to_bits() & 0x7fff_ffff;
            // NaN and inf land in the top bins; they never become thresholds below them.
            self.counts[(bits >> HIST_SHIFT) as usize] += 1;
        }
        self.total += values.len() as u64;
    }

    /// The threshold `t` under which a share `q` of the values lies (linear within a bin).
    pub fn quantile(&self, q: f64) -> f32 {
        let target = q * self.total as f64;
        if target <= 0.0 {
            return 0.0;
        }
        let mut below = 0u64;
        for (b, &c) in self.counts.iter().enumerate() {
            if (below + c) as f64 >= target && c > 0 {
                let lo = f32::from_bits((b as u32) << HIST_SHIFT);
                let hi = f32::from_bits(((b as u32) + 1) << HIST_SHIFT);
                let frac = (target - below as f64) / c as f64;
                return lo + (hi - lo) * frac as f32;
            }
            below += c;
        }
        f32::INFINITY
    }
}

/// What one layer's FFN saw during calibration.
#[derive(Debug)]
struct LayerRecord {
    x: Histogram,
    a: Histogram,
    h: Histogram,
    /// Sum over tokens of |h_j|, per neuron.
    sum_abs_h: Vec<f64>,
}

/// A dense FFN that records its activations while computing its usual output.
#[derive(Debug)]
struct Recorder {
    ffn: DenseFfn,
    method: Method,
    record: Mutex<LayerRecord>,
}

impl FeedForward for Recorder {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, hid] = x.dims();
        let x = x.reshape([b * s, hid]);
        let a = silu(self.ffn.gate_proj.forward(x.clone()));
        let h = a.clone() * self.ffn.up_proj.forward(x.clone());
        let mut r = self.record.lock().unwrap();
        match self.method {
            Method::Teal => {
                r.x.add(&to_vec(x));
                r.h.add(&to_vec(h.clone()));
            }
            Method::Cats => r.a.add(&to_vec(a)),
            Method::Static => {
                for (acc, v) in r.sum_abs_h.iter_mut().zip(to_vec(h.clone().abs().sum_dim(0))) {
                    *acc += v as f64;
                }
            }
        }
        Ok(self.ffn.down_proj.forward(h).reshape([b, s, hid]))
    }
    fn total_params(&self) -> usize {
        self.ffn.num_params()
    }
    fn active_params_per_token(&self) -> f64 {
        self.ffn.num_params() as f64
    }
    fn describe(&self) -> String {
        "dense (recording activations)".into()
    }
}

/// An MoE block (a copy sharing the weights) that runs under its routing policy without
/// thresholds and records its `x` and the activations of the experts that run.
#[derive(Debug)]
struct MoeRecorder {
    block: MoeBlock,
    record: Mutex<LayerRecord>,
}

impl FeedForward for MoeRecorder {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, hid] = x.dims();
        let x = x.reshape([b * s, hid]);
        let xs = to_vec(x.clone());
        self.record.lock().unwrap().x.add(&xs);
        let observe = |a: &Tensor<2>| {
            let v = to_vec(a.clone());
            self.record.lock().unwrap().h.add(&v);
        };
        Ok(self.block.forward_observed(x, &observe)?.reshape([b, s, hid]))
    }
    fn total_params(&self) -> usize {
        self.block.total_params()
    }
    fn active_params_per_token(&self) -> f64 {
        self.block.active_params_per_token()
    }
    fn describe(&self) -> String {
        format!("{} (recording activations)", self.block.describe())
    }
}

/// Per layer, the sparsity of `method` that reads `budget` of the FFN on `windows` (calibration
/// token windows, each scored as one sequence). Every layer must be a dense SwiGLU FFN or, for
/// TEAL, an MoE block (then `budget` is the share of the run experts' parameters read). The
/// model's FFNs are restored before returning. `progress(done, total)` after each window.
pub fn calibrate(
    model: &mut Transformer,
    windows: &[&[u32]],
    method: Method,
    budget: f64,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Sparsity>, SparsityError> {
    Ok(calibrate_budgets(model, windows, method, &[budget], progress)?.remove(0))
}

/// [`calibrate`] at several budgets from one pass over `windows`: `result[i][layer]` is layer
/// `layer`'s sparsity at `budgets[i]`.
pub fn calibrate_budgets(
    model: &mut Transformer,
    windows: &[&[u32]],
    method: Method,
    budgets: &[f64],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<Sparsity>>, SparsityError> {
    let shares = budgets
        .iter()
        .map(|&b| method.sparsity_for(b))
        .collect::<Result<Vec<_>, _>>()?;
    let n = model.layers.len();
    // Per layer its dense FFN, or None for an MoE block.
    let mut dense = Vec::with_capacity(n);
    for l in 0..n {
        let layer_err = |msg: String| SparsityError::Layer { layer: l, msg };
        if let Some(d) = dense_ffn(model, l) {
            dense.push(Some(d.clone()));
        } else if moe_block(model, l).is_some() {
            method.check_in_experts().map_err(layer_err)?;
            dense.push(None);
        } else {
            return Err(layer_err(format!(
                "is neither a dense SwiGLU FFN nor an MoE block ({}), so {} cannot calibrate it",
                model.layers[l].ffn.describe(),
                method.name()
            )));
        }
    }
    let record = |inter: usize| {
        Mutex::new(LayerRecord {
            x: Histogram::new(),
            a: Histogram::new(),
            h: Histogram::new(),
            sum_abs_h: vec![0.0; inter],
        })
    };
    let originals: Vec<Box<dyn FeedForward>> = (0..n)
        .map(|l| {
            let recorder: Box<dyn FeedForward> = match &dense[l] {
                Some(d) => Box::new(Recorder {
                    ffn: d.clone(),
                    method,
                    record: record(d.intermediate_size()),
                }),
                None => {
                    let b = moe_block(model, l).expect("checked above");
                    Box::new(MoeRecorder {
                        block: MoeBlock::from_params(b.params.clone(), b.combine, b.policy.clone()),
                        record: record(0),
                    })
                }
            };
            std::mem::replace(&mut model.layers[l].ffn, recorder)
        })
        .collect();
    let mut run = || -> Result<(), SparsityError> {
        for (i, w) in windows.iter().enumerate() {
            let ids = ladimo_model::util::ids_tensor(w, 1, &model.device);
            model.forward(ids)?;
            progress(i + 1, windows.len());
        }
        Ok(())
    };
    let ran = run();
    let mut records = Vec::with_capacity(n);
    for (l, orig) in originals.into_iter().enumerate() {
        let rec = std::mem::replace(&mut model.layers[l].ffn, orig);
        let rec: Box<dyn Any> = rec;
        let record = match rec.downcast::<Recorder>() {
            Ok(r) => r.record,
            Err(rec) => rec.downcast::<MoeRecorder>().expect("installed above").record,
        };
        records.push(record.into_inner().unwrap());
    }
    ran?;
    Ok(budgets
        .iter()
        .zip(&shares)
        .map(|(&budget, &s)| {
            records
                .iter()
                .zip(&dense)
                .map(|(r, d)| thresholds_of(r, d.as_ref(), method, budget, s))
                .collect()
        })
        .collect())
}

/// One layer's sparsity from what it recorded: zero a share `s` of the entries (budget `budget`).
/// `d` is the layer's dense FFN (None for an MoE block, which only TEAL calibrates).
fn thresholds_of(r: &LayerRecord, d: Option<&DenseFfn>, method: Method, budget: f64, s: f64) -> Sparsity {
    match method {
        Method::Teal => Sparsity::Teal {
            x: r.x.quantile(s),
            h: r.h.quantile(s),
        },
        Method::Cats => Sparsity::Cats { gate: r.a.quantile(s) },
        Method::Static => {
            let d = d.expect("static calibrates dense layers only (checked before running)");
            let inter = d.intermediate_size();
            let keep_n = ((budget * inter as f64).round() as usize).clamp(1, inter);
            let norms = row_norms(d.down_proj.weight.val());
            let mut order: Vec<usize> = (0..inter).collect();
            let score = |j: usize| r.sum_abs_h[j] * norms[j];
            order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
            let mut keep: Vec<u32> = order[..keep_n].iter().map(|&j| j as u32).collect();
            keep.sort_unstable();
            Sparsity::Static { keep }
        }
    }
}

/// Of the `3 * hidden * inter` weights an expert with `inter` neurons has, what TEAL kept it from
/// reading on `tokens` tokens: gate and up read `2 * inter` per kept `x` entry (`kept_x`, summed
/// over the tokens), down `hidden` per kept `h` entry (`kept_h`, summed likewise).
pub fn teal_saved(hidden: usize, inter: usize, tokens: usize, kept_x: f64, kept_h: f64) -> f64 {
    (3 * hidden * inter * tokens) as f64 - 2.0 * inter as f64 * kept_x - hidden as f64 * kept_h
}

/// The threshold under which a share `q` of `|values|` lies (the same log-spaced histogram as
/// calibration, so a threshold set again after training matches how it was first set).
pub fn abs_quantile(values: &[f32], q: f64) -> f32 {
    let mut h = Histogram::new();
    h.add(values);
    h.quantile(q)
}

/// TEAL on `x` (`[tokens, hidden]`): `x_i = 0` where `|x_i| < tx`, `h_j = 0` where `|h_j| < th`,
/// then `down h`. The same masks as [`SparseFfn`] without the read count, so it runs on an
/// autodiff device: masked entries pass no gradient (a plain masked gradient), the rest do. What
/// stage 1 trains a block under when thresholds are in the loop.
pub fn teal_forward(ffn: &DenseFfn, x: Tensor<2>, tx: f32, th: f32) -> Tensor<2> {
    let x = x.clone().mask_fill(x.abs().lower_elem(tx), 0.0);
    let h = ffn.activation(x);
    ffn.down_proj.forward(h.clone().mask_fill(h.abs().lower_elem(th), 0.0))
}

/// L2 norm of each row of a `[rows, cols]` tensor.
fn row_norms(w: Tensor<2>) -> Vec<f64> {
    to_vec(w.powf_scalar(2.0).sum_dim(1))
        .into_iter()
        .map(|v| (v as f64).sqrt())
        .collect()
}

/// Replace layer `layer`'s dense FFN by one with `sparsity` (or back to the plain dense FFN with
/// `None`); on an MoE layer, set TEAL thresholds inside its experts ([`MoeBlock::set_sparsity`]).
pub fn set_sparsity(model: &mut Transformer, layer: usize, sparsity: Option<Sparsity>) -> Result<(), SparsityError> {
    if let Some(b) = moe_block_mut(model, layer) {
        return b.set_sparsity(sparsity).map_err(|e| SparsityError::Layer {
            layer,
            msg: e.to_string(),
        });
    }
    let dense = dense_ffn(model, layer)
        .ok_or_else(|| SparsityError::Layer {
            layer,
            msg: format!(
                "activation sparsity applies to dense SwiGLU FFN and MoE layers only, not to {}",
                model
                    .layers
                    .get(layer)
                    .map(|l| l.ffn.describe())
                    .unwrap_or_else(|| "a missing layer".into())
            ),
        })?
        .clone();
    model.layers[layer].ffn = match sparsity {
        None => Box::new(dense),
        Some(s) => Box::new(SparseFfn::new(&dense, s).map_err(|msg| SparsityError::Layer { layer, msg })?),
    };
    Ok(())
}
