//! The MoE block: router, routed experts, optional shared experts, combine rule, sparse dispatch,
//! and optional TEAL thresholds inside the experts that run.
//!
//! **Parameters read.** Per token, with `R` the router's parameters, `S` the shared experts'
//! and `P_e` routed expert `e`'s, the block reads `R + S + sum_{e chosen} P_e`
//! ([`RoutingStats::routed_params`] sums the last term over tokens).
//!
//! **TEAL inside the experts** ([`MoeBlock::set_sparsity`], `Sparsity::Teal { x: t_x, h: t_h }`,
//! see [`crate::sparsity`]). For one token with FFN input `x` (after the norm):
//!
//! 1. the router sees the *unthresholded* `x`, so the thresholds never change which experts run;
//! 2. `x` is thresholded once, `x'_i = 0` where `|x_i| < t_x`; every expert that runs (the shared
//!    experts and the chosen routed ones) skips columns `i` of its gate and up where `x'_i = 0`;
//! 3. inside each expert `e` that runs, `h_e = silu(gate_e x') * (up_e x')`, then `h_{e,j} = 0`
//!    where `|h_{e,j}| < t_h` (before the combine weight), and column `j` of `down_e` is not read;
//! 4. `y = shared(h_s) + scale * sum_{e chosen} w_e * down_e h_e`, the combine rule unchanged.
//!
//! An expert with `f_e` neurons then reads `2 * f_e * kept_x + hidden * kept_h(e)` of its
//! `3 * hidden * f_e` weights, so a token reads `R + sum_{e run} (2 f_e kept_x + hidden kept_h(e))`
//! (the shared experts counted among the experts that run). [`RoutingStats::threshold_saved`]
//! sums, over tokens, what the thresholds kept from being read; with thresholds of 0 nothing is
//! zeroed and the output is the plain block's, bit for bit. On the burn path the thresholds are
//! masked dense products (the exact reference); a block with thresholds keeps its host kernel's
//! gate/up input-major ([`ladimo_kernel::Selection::TealBlocks`]), so a zeroed `x_i` skips one
//! contiguous slice of each run expert's columns and a zeroed `h_j` one row of its down.

use std::sync::Mutex;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData, activation::softmax};
use ladimo_io::HostTensor;
use ladimo_model::util::{to_tensor, to_vec, transpose_host};
use ladimo_model::{DenseFfn, FeedForward, FfnError};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::policy::{Policy, RoutingPolicy, order_by_prob};
use crate::sparsity::{Sparsity, teal_saved};
use crate::{HostFfn, MoeError};

/// Called with each activation `h = silu(gate x) * up x` (`[tokens, neurons]`, before any
/// threshold) of every expert that runs: what calibration records.
pub(crate) type Observe<'a> = dyn Fn(&Tensor<2>) + Sync + 'a;

/// What one sparse dispatch produced.
pub(crate) struct Dispatch {
    pub out: Tensor<2>,
    /// Tokens each routed expert received.
    pub load: Vec<usize>,
    /// Parameters of the experts that ran which TEAL thresholds kept from being read, summed over
    /// the tokens (0 without thresholds).
    pub saved: f64,
}

/// `x'_i = 0` where `|x_i| < tx` (`x: [tokens, hidden]`), and per token the entries kept.
fn threshold_x(x: Tensor<2>, tx: f32) -> (Tensor<2>, Vec<f32>) {
    let keep = x.clone().abs().greater_equal_elem(tx);
    let kept = to_vec(keep.clone().float().sum_dim(1));
    (x.mask_fill(keep.bool_not(), 0.0), kept)
}

/// [`threshold_x`] by TEAL's `t_x` when `teal` is set, else `x` as it is (and no counts).
fn teal_x(x: Tensor<2>, teal: Option<(f32, f32)>) -> (Tensor<2>, Option<Vec<f32>>) {
    match teal {
        Some((tx, _)) => {
            let (x, kept) = threshold_x(x, tx);
            (x, Some(kept))
        }
        None => (x, None),
    }
}

/// An expert's activation on `x` (already thresholded), passed to `observe`, then with
/// `h_j = 0` where `|h_j| < th`; and the number of entries kept (0 without `th`).
fn expert_activation(f: &DenseFfn, x: Tensor<2>, th: Option<f32>, observe: Option<&Observe>) -> (Tensor<2>, f64) {
    let a = f.activation(x);
    if let Some(o) = observe {
        o(&a);
    }
    match th {
        None => (a, 0.0),
        Some(th) => {
            let keep = a.clone().abs().greater_equal_elem(th);
            // Per-row counts (at most the expert's neurons) are exact in f32; their sum may not be.
            let kept = to_vec(keep.clone().float().sum_dim(1)).iter().map(|&v| v as f64).sum();
            (a.mask_fill(keep.bool_not(), 0.0), kept)
        }
    }
}

/// Up to this many tokens, [`MoeBlock::forward_tokens`] runs each token's experts directly (the
/// decode path); above it, tokens are grouped per expert (gather, run, scatter-add).
pub const FEW_TOKENS: usize = 2;

/// The token counts at which [`MoeBlock::choose_prefill_path`] times the two prefill paths.
pub const PREFILL_PROBES: &[usize] = &[64, 512];

/// Up to this many tokens, a block with a host kernel ([`FeedForward::prepare_host`]) runs on it.
pub const KERNEL_TOKENS: usize = 8;

/// Which weight each chosen expert's output gets before the outputs are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CombineWeights {
    /// The router's softmax probability of the expert (over all experts).
    Raw,
    /// The probability renormalised over the chosen experts (Mixtral's rule).
    Renormalized,
    /// 1 for every chosen expert: the router only selects. With every expert chosen, experts cut
    /// from a dense FFN sum back to it exactly.
    Unit,
    /// `Unit` in the forward pass (every weight is exactly 1, so the output is the same), but in
    /// the backward pass each chosen expert's weight is `1 + p - stop_grad(p)`: the router gets
    /// the gradient `Raw` weights would give it. This lets a loss on the block's output (the
    /// end-to-end polish) train a router that `Unit` would leave untouched.
    UnitStraightThrough,
}

/// The combine rule: `y = scale * sum_{e chosen} w_e * expert_e(x)` (+ shared experts' output).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Combine {
    pub weights: CombineWeights,
    pub scale: f32,
}

impl Default for Combine {
    fn default() -> Self {
        Self {
            weights: CombineWeights::Renormalized,
            scale: 1.0,
        }
    }
}

/// The trainable parameters (a burn module, so an optimizer can update them).
#[derive(Module, Debug)]
pub struct MoeParams {
    /// A low-rank router's first map, hidden -> rank (no bias): with it the router scores
    /// `router(predictor(x))` and `router` maps rank -> experts (a predictor fitted to the
    /// experts' output norms, `ladimo_distill::predictor`). Two linear maps and no activation, so
    /// their product is an ordinary router of full rank, exactly (what export formats get).
    pub predictor: Option<Linear>,
    /// hidden (or the predictor's rank) -> number of experts.
    pub router: Linear,
    pub experts: Vec<DenseFfn>,
    /// Always-on shared experts, merged into one FFN (their sum is one wider SwiGLU).
    pub shared: Option<DenseFfn>,
}

impl MoeParams {
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// The router's logits `[tokens, experts]` (through the predictor, when there is one).
    pub fn router_logits(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.predictor {
            Some(p) => self.router.forward(p.forward(x)),
            None => self.router.forward(x),
        }
    }

    /// Router probabilities `[tokens, experts]` on the device (differentiable) and on the host,
    /// refusing non-finite logits.
    pub fn router_probs(&self, x: Tensor<2>) -> Result<(Tensor<2>, Vec<f32>), MoeError> {
        let n = x.dims()[0];
        let probs = softmax(self.router_logits(x), 1);
        let host = to_vec(probs.clone());
        let e = self.num_experts();
        let bad = host.chunks(e).filter(|p| p.iter().any(|v| !v.is_finite())).count();
        if bad > 0 {
            return Err(MoeError::NonFiniteRouter { bad, tokens: n });
        }
        Ok((probs, host))
    }

    /// Sparse forward (see [`MoeBlock::forward_tokens`]); also returns how many tokens each
    /// expert received.
    pub fn forward_sparse(
        &self,
        combine: &Combine,
        policy: &Policy,
        x: Tensor<2>,
    ) -> Result<(Tensor<2>, Vec<usize>), MoeError> {
        let d = self.forward_sparse_with(combine, policy, None, None, x)?;
        Ok((d.out, d.load))
    }

    /// [`MoeParams::forward_sparse`] with TEAL thresholds `(t_x, t_h)` inside the experts that run
    /// (the module header's rule), and `observe` called with every run expert's activation.
    pub(crate) fn forward_sparse_with(
        &self,
        combine: &Combine,
        policy: &Policy,
        teal: Option<(f32, f32)>,
        observe: Option<&Observe>,
        x: Tensor<2>,
    ) -> Result<Dispatch, MoeError> {
        let [n, h] = x.dims();
        let e = self.num_experts();
        let device = x.device();
        let (probs, host) = self.router_probs(x.clone())?;
        let chosen = choose(policy, &host, e);
        let mut groups: Vec<Vec<i64>> = vec![Vec::new(); e];
        let mut mask = vec![0f32; n * e];
        for (t, c) in chosen.iter().enumerate() {
            for &i in c {
                groups[i].push(t as i64);
                mask[t * e + i] = 1.0;
            }
        }
        // Combine weights as device tensors, so the router gets gradients through them.
        let weights = match combine.weights {
            CombineWeights::Unit => None,
            // p - p is exactly 0, so every weight is exactly 1.
            CombineWeights::UnitStraightThrough => Some((probs.clone() - probs.detach()).add_scalar(1.0)),
            CombineWeights::Raw => Some(probs),
            CombineWeights::Renormalized => {
                let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, e]), &device);
                let norm = (probs.clone() * mask).sum_dim(1);
                Some(probs / norm)
            }
        };
        let weights = match weights {
            Some(w) if combine.scale != 1.0 => Some(w.mul_scalar(combine.scale)),
            w => w,
        };
        // The router saw the unthresholded x; every expert that runs sees x'.
        let (x, kept_x) = teal_x(x, teal);
        let th = teal.map(|t| t.1);
        let (mut out, mut saved) = self.shared_forward(&x, th, kept_x.as_deref(), observe);
        let load: Vec<usize> = groups.iter().map(Vec::len).collect();
        // One gather for all experts: the routed (token, expert) pairs sorted by expert, so each
        // expert's rows are a contiguous slice; one scatter-add at the end. (Per-expert gathers
        // and scatters cost more than the small experts' matmuls once there are 16 experts.)
        let total: usize = load.iter().sum();
        if total == 0 {
            return Ok(Dispatch { out, load, saved });
        }
        let mut rows = Vec::with_capacity(total);
        let mut flat = Vec::with_capacity(total);
        for (i, tokens) in groups.iter().enumerate() {
            for &t in tokens {
                rows.push(t);
                flat.push(t * e as i64 + i as i64);
            }
        }
        // (expert, first row, rows, kept x entries of those rows) of every expert that got tokens.
        let mut jobs = Vec::with_capacity(e);
        let mut start = 0;
        for (i, &m) in load.iter().enumerate() {
            if m > 0 {
                let kx = kept_x
                    .as_ref()
                    .map(|k| rows[start..start + m].iter().map(|&t| k[t as usize] as f64).sum())
                    .unwrap_or(0.0);
                jobs.push((i, start, m, kx));
            }
            start += m;
        }
        let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [total]), &device);
        let xs = x.select(0, idx.clone());
        let ws = weights.map(|w| {
            let flat = Tensor::<1, Int>::from_data(TensorData::new(flat, [total]), &device);
            w.reshape([n * e, 1]).select(0, flat)
        });
        // Experts are independent: run them on rayon's threads (the small expert matmuls do not
        // keep every core busy on their own). `unzip` keeps the experts' order.
        let (mut ys, saved_each): (Vec<Tensor<2>>, Vec<f64>) = jobs
            .par_iter()
            .map(|&(i, start, m, kx)| {
                let expert = &self.experts[i];
                let (a, kept_h) = expert_activation(expert, xs.clone().narrow(0, start, m), th, observe);
                let saved = if th.is_some() {
                    teal_saved(h, expert.intermediate_size(), m, kx, kept_h)
                } else {
                    0.0
                };
                let y = match &ws {
                    None if combine.scale == 1.0 => expert.down_proj.forward(a),
                    None => expert.down_proj.forward(a).mul_scalar(combine.scale),
                    Some(w) => {
                        let w = w.clone().narrow(0, start, m);
                        // Weighting the activation ([m, inter]) before the down projection
                        // touches fewer values than weighting its output ([m, hidden]) for small
                        // experts; a bias forbids it.
                        if expert.down_proj.bias.is_none() && expert.intermediate_size() <= h {
                            expert.down_proj.forward(a * w)
                        } else {
                            expert.down_proj.forward(a) * w
                        }
                    }
                };
                (y, saved)
            })
            .unzip();
        saved += saved_each.iter().sum::<f64>();
        let y = if ys.len() == 1 {
            ys.pop().expect("one")
        } else {
            Tensor::cat(ys, 0)
        };
        // `out` is uniquely owned, so the backend can add in place; repeated rows accumulate.
        out = out.select_assign(0, idx, y, IndexingUpdateOp::Add);
        Ok(Dispatch { out, load, saved })
    }
}

impl MoeParams {
    /// The shared experts on `x` (already thresholded; zeros without shared experts), and the
    /// parameters TEAL kept them from reading (`kept_x`: per token, the `x` entries kept).
    fn shared_forward(
        &self,
        x: &Tensor<2>,
        th: Option<f32>,
        kept_x: Option<&[f32]>,
        observe: Option<&Observe>,
    ) -> (Tensor<2>, f64) {
        let [n, h] = x.dims();
        match &self.shared {
            Some(s) => {
                let (a, kept_h) = expert_activation(s, x.clone(), th, observe);
                let saved = kept_x
                    .map(|k| teal_saved(h, s.intermediate_size(), n, k.iter().map(|&v| v as f64).sum(), kept_h))
                    .unwrap_or(0.0);
                (s.down_proj.forward(a), saved)
            }
            None => (Tensor::zeros([n, h], &x.device()), 0.0),
        }
    }

    /// [`MoeParams::forward_sparse_with`] computed dense-masked: every routed neuron runs on every
    /// token (the experts merged into one FFN, `m`), and each neuron's activation is multiplied by
    /// the token's combine weight of the neuron's expert, 0 for experts not chosen. The same
    /// function and the same counts (load, parameters TEAL saved) as the dispatch; it costs the
    /// whole FFN plus two masks, which at many tokens beats grouping tokens per expert once the
    /// experts are small (measured per block by [`MoeBlock::choose_prefill_path`]).
    fn forward_masked(
        &self,
        m: &Masked,
        combine: &Combine,
        policy: &Policy,
        teal: Option<(f32, f32)>,
        x: Tensor<2>,
    ) -> Result<Dispatch, MoeError> {
        let [n, h] = x.dims();
        let e = self.num_experts();
        let device = x.device();
        let (probs, host) = self.router_probs(x.clone())?;
        let chosen = choose(policy, &host, e);
        let mut load = vec![0usize; e];
        let mut mask = vec![0f32; n * e];
        for (t, c) in chosen.iter().enumerate() {
            for &i in c {
                load[i] += 1;
                mask[t * e + i] = 1.0;
            }
        }
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, e]), &device);
        let w = match combine.weights {
            CombineWeights::Unit | CombineWeights::UnitStraightThrough => mask.clone(),
            CombineWeights::Raw => probs * mask.clone(),
            CombineWeights::Renormalized => {
                let p = probs * mask.clone();
                // A token with no expert chosen has p = 0 everywhere: 0 / tiny = 0, not NaN.
                let norm = p.clone().sum_dim(1).clamp_min(f32::MIN_POSITIVE);
                p / norm
            }
        };
        let w = if combine.scale != 1.0 {
            w.mul_scalar(combine.scale)
        } else {
            w
        };
        let (x, kept_x) = teal_x(x, teal);
        let th = teal.map(|t| t.1);
        let (out, mut saved) = self.shared_forward(&x, th, kept_x.as_deref(), None);
        let mut a = m.ffn.activation(x);
        if let (Some(th), Some(kx)) = (th, &kept_x) {
            // Kept h entries count only where the neuron's expert ran, as in the dispatch.
            let keep = a.clone().abs().greater_equal_elem(th);
            let kept_h: f64 = to_vec(m.per_neuron(keep.clone().float(), mask).sum_dim(1))
                .iter()
                .map(|&v| v as f64)
                .sum();
            // teal_saved is linear in (tokens, kept_x, kept_h): sum it per expert without the
            // kept h, then take the kept h of all experts at once.
            let mut kx_e = vec![0f64; e];
            for (c, &k) in chosen.iter().zip(kx) {
                for &i in c {
                    kx_e[i] += k as f64;
                }
            }
            for (i, expert) in self.experts.iter().enumerate() {
                saved += teal_saved(h, expert.intermediate_size(), load[i], kx_e[i], 0.0);
            }
            saved -= h as f64 * kept_h;
            a = a.mask_fill(keep.bool_not(), 0.0);
        }
        let y = m.ffn.down_proj.forward(m.per_neuron(a, w));
        Ok(Dispatch {
            out: out + y,
            load,
            saved,
        })
    }
}

/// For which token counts a block takes the dense-masked path.
#[derive(Debug, Clone, Copy)]
enum When {
    /// From this many tokens on (set by hand).
    From(usize),
    /// Where its time, fitted as `a + b * tokens` through the timings at load, is below the
    /// dispatch's: the dispatch pays per expert, the masked path per token, so the faster one can
    /// change with the size either way.
    Faster { dispatch: [f64; 2], masked: [f64; 2] },
}

impl When {
    fn masked_at(&self, n: usize) -> bool {
        let at = |[a, b]: [f64; 2]| a + b * n as f64;
        match *self {
            When::From(from) => n >= from,
            When::Faster { dispatch, masked } => at(masked) < at(dispatch),
        }
    }
}

/// `[a, b]` of the line through two `(tokens, seconds)` points.
fn line((n0, t0): (usize, f64), (n1, t1): (usize, f64)) -> [f64; 2] {
    let b = (t1 - t0) / (n1 as f64 - n0 as f64);
    [t0 - b * n0 as f64, b]
}

/// The routed experts merged into one FFN for [`MoeParams::forward_masked`].
#[derive(Debug)]
struct Masked {
    ffn: DenseFfn,
    /// Each merged neuron's expert.
    owner: Tensor<1, Int>,
    /// The experts' size, when they all have the same (the common case: a broadcast instead of
    /// a gather in [`Masked::per_neuron`]).
    size: Option<usize>,
    /// For which token counts [`MoeBlock::forward_tokens`] takes the masked path.
    when: When,
}

impl Masked {
    /// `a` (`[tokens, merged neurons]`) times, per neuron, its expert's entry of `w`
    /// (`[tokens, experts]`).
    fn per_neuron(&self, a: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
        let [n, e] = w.dims();
        match self.size {
            Some(s) => (a.reshape([n, e, s]) * w.reshape([n, e, 1])).reshape([n, e * s]),
            None => a * w.select(1, self.owner.clone()),
        }
    }

    /// `None` when an expert has a bias (the merged down projection would add every expert's
    /// bias unweighted).
    fn new(p: &MoeParams, device: &Device) -> Option<Self> {
        let biased =
            |f: &DenseFfn| f.gate_proj.bias.is_some() || f.up_proj.bias.is_some() || f.down_proj.bias.is_some();
        if p.experts.iter().any(biased) {
            return None;
        }
        let parts: Vec<HostFfn> = p.experts.iter().map(HostFfn::from_dense).collect();
        let h = parts[0].hidden_size();
        let inter: usize = parts.iter().map(|f| f.intermediate_size()).sum();
        let cat = |rows: usize, cols: usize, f: &dyn Fn(&HostFfn) -> Vec<f32>| {
            HostTensor::new(vec![rows, cols], parts.iter().flat_map(f).collect())
        };
        let gate = cat(inter, h, &|f| f.gate.data.clone());
        let up = cat(inter, h, &|f| f.up.data.clone());
        // down is [hidden, inter] per expert: merge column blocks row by row.
        let mut down = Vec::with_capacity(h * inter);
        for r in 0..h {
            for f in &parts {
                let fi = f.intermediate_size();
                down.extend_from_slice(&f.down.data[r * fi..(r + 1) * fi]);
            }
        }
        let down = HostTensor::new(vec![h, inter], down);
        let owner: Vec<i64> = parts
            .iter()
            .enumerate()
            .flat_map(|(i, f)| std::iter::repeat_n(i as i64, f.intermediate_size()))
            .collect();
        let first = parts[0].intermediate_size();
        Some(Self {
            size: parts.iter().all(|f| f.intermediate_size() == first).then_some(first),
            ffn: DenseFfn::from_host(&gate, &up, &down, None, device),
            owner: Tensor::from_data(TensorData::new(owner, [inter]), device),
            when: When::From(usize::MAX),
        })
    }
}

/// Per token, the experts `policy` runs (most probable first).
fn choose(policy: &Policy, probs: &[f32], e: usize) -> Vec<Vec<usize>> {
    // Tokens are independent; at prefill with hundreds of experts the sorts are a visible share
    // of the block, so they run on rayon's threads (order kept).
    probs
        .par_chunks(e)
        .map_init(
            || (Vec::with_capacity(e), Vec::with_capacity(e)),
            |(order, chosen), p| {
                order_by_prob(p, order);
                policy.select(p, order, chosen);
                chosen.clone()
            },
        )
        .collect()
}

/// Exact routing counts since the last reset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingStats {
    pub tokens: u64,
    /// Tokens routed to each expert.
    pub load: Vec<u64>,
    /// Sum over tokens of the routed-expert parameters that ran.
    pub routed_params: f64,
    /// Sum over tokens of the parameters of the experts that ran (shared ones included) that TEAL
    /// thresholds kept from being read (0 without thresholds). The block read
    /// `tokens * (router + shared) + routed_params - threshold_saved` parameters.
    pub threshold_saved: f64,
}

#[derive(Debug)]
pub struct MoeBlock {
    pub params: MoeParams,
    pub combine: Combine,
    pub policy: Policy,
    stats: Mutex<RoutingStats>,
    expert_params: Vec<usize>,
    /// TEAL thresholds inside the experts that run (the module header), if any.
    sparsity: Option<Sparsity>,
    /// The host-side decode kernel ([`FeedForward::prepare_host`]).
    host: Option<MoeKernel>,
    /// The dense-masked path for many tokens, when measured faster
    /// ([`MoeBlock::choose_prefill_path`]).
    masked: Option<Masked>,
}

/// Refuse a predictor rank of 0 or above the hidden size (naming the setting).
pub fn check_predictor_rank(rank: usize, hidden: usize) -> Result<(), MoeError> {
    if rank == 0 || rank > hidden {
        return Err(MoeError::Shape(format!(
            "predictor rank {rank} must be between 1 and the hidden size {hidden}"
        )));
    }
    Ok(())
}

/// An MoE block's weights for host-side decode: the router (f32) and every neuron of the shared
/// and routed experts in one [`ladimo_kernel::FfnKernel`], each expert a contiguous block of
/// neurons (neuron-major: a chosen expert is one contiguous read of gate, up and down;
/// input-major, for TEAL thresholds: one contiguous slice per kept input).
#[derive(Debug)]
struct MoeKernel {
    /// The low-rank router's first map (rank x hidden), when there is one.
    predictor: Option<ladimo_kernel::Matrix>,
    router: ladimo_kernel::Matrix,
    router_bias: Option<Vec<f32>>,
    ffn: ladimo_kernel::FfnKernel,
    shared: Option<std::ops::Range<usize>>,
    experts: Vec<std::ops::Range<usize>>,
}

impl MoeKernel {
    fn new(p: &MoeParams, dtype: ladimo_kernel::Dtype, layout: ladimo_kernel::GateUpLayout) -> Self {
        let [r, e] = p.router.weight.dims();
        let predictor = p.predictor.as_ref().map(|q| {
            let [h, r] = q.weight.dims();
            ladimo_kernel::Matrix::transposed(r, h, &to_vec(q.weight.val()), ladimo_kernel::Dtype::F32)
        });
        let h = p.predictor.as_ref().map_or(r, |q| q.weight.dims()[0]);
        let (mut gate, mut up, mut down_t) = (Vec::new(), Vec::new(), Vec::new());
        let mut add = |f: &DenseFfn| {
            let inter = f.intermediate_size();
            let start = gate.len() / h;
            // burn: gate/up [hidden, inter] -> PyTorch [inter, hidden]; down [inter, hidden] is
            // already one row per neuron.
            gate.extend(ladimo_model::ffn_transpose(&to_vec(f.gate_proj.weight.val()), h, inter));
            up.extend(ladimo_model::ffn_transpose(&to_vec(f.up_proj.weight.val()), h, inter));
            down_t.extend(to_vec(f.down_proj.weight.val()));
            start..start + inter
        };
        let shared = p.shared.as_ref().map(&mut add);
        let experts: Vec<_> = p.experts.iter().map(&mut add).collect();
        let inter = gate.len() / h;
        let down = ladimo_model::ffn_transpose(&down_t, inter, h);
        Self {
            predictor,
            router: ladimo_kernel::Matrix::transposed(e, r, &to_vec(p.router.weight.val()), ladimo_kernel::Dtype::F32),
            router_bias: p.router.bias.as_ref().map(|b| to_vec(b.val())),
            ffn: ladimo_kernel::FfnKernel::new(&gate, &up, &down, h, inter, dtype, layout),
            shared,
            experts,
        }
    }
}

impl MoeBlock {
    /// Build and validate a block from host weights. `router` is `[num_experts, hidden]`
    /// (PyTorch layout), `router_bias` `[num_experts]`.
    pub fn new(
        router: &HostTensor,
        router_bias: Option<&HostTensor>,
        experts: &[HostFfn],
        shared: Option<&HostFfn>,
        combine: Combine,
        policy: Policy,
        device: &Device,
    ) -> Result<Self, MoeError> {
        let n = experts.len();
        if n == 0 {
            return Err(MoeError::Shape("an MoE block needs at least one expert".into()));
        }
        let hidden = experts[0].gate.shape.get(1).copied().unwrap_or(0);
        for (i, e) in experts.iter().enumerate() {
            e.check(hidden, &format!("expert {i}"))?;
        }
        if let Some(s) = shared {
            s.check(hidden, "shared experts")?;
        }
        if router.shape != [n, hidden] {
            return Err(MoeError::Shape(format!(
                "router is {:?} but {n} experts of hidden size {hidden} need [{n}, {hidden}]",
                router.shape
            )));
        }
        if let Some(b) = router_bias
            && b.shape != [n]
        {
            return Err(MoeError::Shape(format!("router bias is {:?}, expected [{n}]", b.shape)));
        }
        policy.validate(n)?;
        if !combine.scale.is_finite() {
            return Err(MoeError::Shape(format!(
                "combine scale {} is not finite",
                combine.scale
            )));
        }
        let params = MoeParams {
            predictor: None,
            router: Linear {
                weight: Param::from_tensor(to_tensor(transpose_host(router), device)),
                bias: router_bias.map(|b| Param::from_tensor(to_tensor(b.clone(), device))),
            },
            experts: experts.iter().map(|e| e.to_dense(device)).collect(),
            shared: shared.map(|s| s.to_dense(device)),
        };
        Ok(Self::from_params(params, combine, policy))
    }

    /// This block with a low-rank router: `predictor` `[rank, hidden]` then `router`
    /// `[num_experts, rank]` (PyTorch layouts) and its bias, replacing the router. A rank of 0 or
    /// above the hidden size is refused (the second would cost more than a full router and
    /// predict nothing more).
    pub fn with_predictor(
        mut self,
        predictor: &HostTensor,
        router: &HostTensor,
        router_bias: Option<&HostTensor>,
    ) -> Result<Self, MoeError> {
        let (n, hidden) = (self.num_experts(), self.hidden_size());
        let &[r, h] = predictor.shape.as_slice() else {
            return Err(MoeError::Shape(format!(
                "predictor is {:?}, not a matrix",
                predictor.shape
            )));
        };
        check_predictor_rank(r, hidden)?;
        if h != hidden || router.shape != [n, r] {
            return Err(MoeError::Shape(format!(
                "predictor {:?} and router {:?} do not map hidden {hidden} to rank {r} to {n} experts",
                predictor.shape, router.shape
            )));
        }
        if let Some(b) = router_bias
            && b.shape != [n]
        {
            return Err(MoeError::Shape(format!("router bias is {:?}, expected [{n}]", b.shape)));
        }
        let device = self.params.router.weight.device();
        self.params.predictor = Some(Linear {
            weight: Param::from_tensor(to_tensor(transpose_host(predictor), &device)),
            bias: None,
        });
        self.params.router = Linear {
            weight: Param::from_tensor(to_tensor(transpose_host(router), &device)),
            bias: router_bias.map(|b| Param::from_tensor(to_tensor(b.clone(), &device))),
        };
        self.host = None;
        self.masked = None;
        Ok(self)
    }

    /// The predictor's rank, when the router is low-rank.
    pub fn predictor_rank(&self) -> Option<usize> {
        self.params.predictor.as_ref().map(|q| q.weight.dims()[1])
    }

    /// Wrap trained parameters (the policy must already be valid for them).
    pub fn from_params(params: MoeParams, combine: Combine, policy: Policy) -> Self {
        let expert_params = params.experts.iter().map(|e| e.num_params()).collect::<Vec<_>>();
        let n = expert_params.len();
        Self {
            params,
            combine,
            policy,
            stats: Mutex::new(RoutingStats {
                load: vec![0; n],
                ..Default::default()
            }),
            expert_params,
            sparsity: None,
            host: None,
            masked: None,
        }
    }

    pub fn num_experts(&self) -> usize {
        self.expert_params.len()
    }

    /// Choose, by timing on this machine, how the block runs many tokens at once: the sparse
    /// dispatch (tokens grouped per expert) or the dense-masked path (all experts merged into one
    /// FFN, unchosen experts' neurons weighted 0; [`MoeParams::forward_masked`]). Both paths run
    /// on random inputs of each of [`PREFILL_PROBES`] tokens, alternating, best of two after a
    /// warm-up; each path's time is fitted as a line in the token count through the smallest
    /// and largest probe, and a call of `n` tokens takes the path whose line is lower at `n`.
    /// Returns `(tokens, dispatch s, masked s)` per size. Both paths compute the same function,
    /// equal to float rounding (not bit for bit: a caller that must reproduce results exactly
    /// should not let a timing choose). Call it once the policy and thresholds are final.
    /// Routing counts are reset.
    pub fn choose_prefill_path(&mut self) -> Vec<(usize, f64, f64)> {
        self.masked = None;
        let device = self.params.router.weight.device();
        let Some(mut m) = Masked::new(&self.params, &device) else {
            return Vec::new();
        };
        let h = self.hidden_size();
        let mut timings = Vec::new();
        for &n in PREFILL_PROBES {
            let mut v: u64 = 0x9E3779B97F4A7C15 ^ n as u64;
            let data: Vec<f32> = (0..n * h)
                .map(|_| {
                    v ^= v << 13;
                    v ^= v >> 7;
                    v ^= v << 17;
                    (v >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect();
            let x = Tensor::<2>::from_data(TensorData::new(data, [n, h]), &device);
            let mut best = [f64::INFINITY; 2];
            for round in 0..3 {
                for (i, masked) in [false, true].into_iter().enumerate() {
                    let t = std::time::Instant::now();
                    let d = if masked {
                        self.params
                            .forward_masked(&m, &self.combine, &self.policy, self.teal(), x.clone())
                    } else {
                        self.params
                            .forward_sparse_with(&self.combine, &self.policy, self.teal(), None, x.clone())
                    };
                    if let Ok(d) = d {
                        let _ = to_vec(d.out);
                    }
                    if round > 0 {
                        best[i] = best[i].min(t.elapsed().as_secs_f64());
                    }
                }
            }
            timings.push((n, best[0], best[1]));
        }
        let (first, last) = (timings[0], timings[timings.len() - 1]);
        m.when = When::Faster {
            dispatch: line((first.0, first.1), (last.0, last.1)),
            masked: line((first.0, first.2), (last.0, last.2)),
        };
        // Keep the merged copy only if the masked path wins somewhere from the first probe on: at
        // a probe, or beyond the last one (its line rises more slowly).
        let wins_somewhere = match m.when {
            When::Faster { dispatch, masked } => {
                masked[1] < dispatch[1] || timings.iter().any(|&(n, _, _)| m.when.masked_at(n))
            }
            When::From(_) => true,
        };
        if wins_somewhere {
            self.masked = Some(m);
        }
        self.reset_stats();
        timings
    }

    /// Set the prefill choice by hand: the dense-masked path from `from` tokens on (`None`: the
    /// dispatch always), for tests and for a caller that measured elsewhere. Refused (`false`)
    /// when an expert has a bias.
    pub fn set_masked_from(&mut self, from: Option<usize>) -> bool {
        self.masked = None;
        let Some(from) = from else { return true };
        let device = self.params.router.weight.device();
        match Masked::new(&self.params, &device) {
            Some(m) => {
                self.masked = Some(Masked {
                    when: When::From(from),
                    ..m
                });
                true
            }
            None => false,
        }
    }

    /// Whether a call of `n` tokens (more than [`FEW_TOKENS`]) takes the dense-masked path
    /// ([`MoeBlock::choose_prefill_path`]).
    pub fn masked_at(&self, n: usize) -> bool {
        n > FEW_TOKENS && self.masked.as_ref().is_some_and(|m| m.when.masked_at(n))
    }

    pub fn hidden_size(&self) -> usize {
        let p = &self.params;
        p.predictor.as_ref().unwrap_or(&p.router).weight.dims()[0]
    }

    /// Replace the routing policy (validated against the number of experts).
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), MoeError> {
        policy.validate(self.num_experts())?;
        self.policy = policy;
        Ok(())
    }

    /// Whether `sparsity` can run inside an MoE block: TEAL with finite thresholds >= 0. Static
    /// neuron sets and CATS are refused by name (not built inside experts).
    pub fn check_sparsity(sparsity: &Sparsity) -> Result<(), MoeError> {
        sparsity
            .method()
            .check_in_experts()
            .and_then(|()| sparsity.check_thresholds())
            .map_err(MoeError::Sparsity)
    }

    /// Set (or with `None` remove) TEAL thresholds inside the experts that run (the module
    /// header's rule); refuses what [`MoeBlock::check_sparsity`] refuses, changing nothing.
    pub fn set_sparsity(&mut self, sparsity: Option<Sparsity>) -> Result<(), MoeError> {
        if let Some(s) = &sparsity {
            Self::check_sparsity(s)?;
        }
        self.sparsity = sparsity;
        // The host kernel's gate/up layout follows: input-major with thresholds.
        if let Some(k) = &self.host
            && k.ffn.layout != self.kernel_layout()
        {
            self.host = Some(MoeKernel::new(&self.params, k.ffn.dtype(), self.kernel_layout()));
        }
        Ok(())
    }

    /// How the host kernel stores gate and up: input-major when thresholds skip input columns.
    fn kernel_layout(&self) -> ladimo_kernel::GateUpLayout {
        match self.sparsity {
            Some(_) => ladimo_kernel::GateUpLayout::InputMajor,
            None => ladimo_kernel::GateUpLayout::NeuronMajor,
        }
    }

    pub fn sparsity(&self) -> Option<&Sparsity> {
        self.sparsity.as_ref()
    }

    /// The TEAL thresholds `(t_x, t_h)`, if set.
    fn teal(&self) -> Option<(f32, f32)> {
        match self.sparsity {
            Some(Sparsity::Teal { x, h }) => Some((x, h)),
            _ => None,
        }
    }

    /// The sparse dispatch of [`MoeBlock::forward_tokens`] (any number of tokens, no host
    /// kernel, no statistics) under the block's routing policy but no thresholds, with `observe`
    /// called on every run expert's activation: what calibration records.
    pub(crate) fn forward_observed(&self, x: Tensor<2>, observe: &Observe) -> Result<Tensor<2>, MoeError> {
        Ok(self
            .params
            .forward_sparse_with(&self.combine, &self.policy, None, Some(observe), x)?
            .out)
    }

    pub fn stats(&self) -> RoutingStats {
        self.stats.lock().unwrap().clone()
    }

    pub fn reset_stats(&self) {
        let n = self.num_experts();
        *self.stats.lock().unwrap() = RoutingStats {
            load: vec![0; n],
            ..Default::default()
        };
    }

    /// Parameters of each routed expert.
    pub fn expert_params(&self) -> &[usize] {
        &self.expert_params
    }

    /// Parameters every token uses whatever the routing: the router and the shared experts.
    pub fn fixed_params(&self) -> usize {
        self.router_params() + self.shared_params()
    }

    fn router_params(&self) -> usize {
        let p = &self.params;
        p.router.num_params() + p.predictor.as_ref().map_or(0, |q| q.num_params())
    }

    fn shared_params(&self) -> usize {
        self.params.shared.as_ref().map(|s| s.num_params()).unwrap_or(0)
    }

    /// Router probabilities `[tokens, experts]` on the host, refusing non-finite logits.
    pub fn router_probs(&self, x: Tensor<2>) -> Result<Vec<f32>, MoeError> {
        Ok(self.params.router_probs(x)?.1)
    }

    /// Per token, the chosen experts and their combine weights (scale included).
    pub fn route(&self, probs: &[f32]) -> Vec<Vec<(usize, f32)>> {
        self.route_with(&self.policy, probs)
    }

    /// [`MoeBlock::route`] under another policy (the profiler scores many on the same tokens).
    pub fn route_with(&self, policy: &Policy, probs: &[f32]) -> Vec<Vec<(usize, f32)>> {
        let e = self.num_experts();
        choose(policy, probs, e)
            .into_iter()
            .zip(probs.chunks(e))
            .map(|(chosen, p)| {
                let norm: f32 = match self.combine.weights {
                    CombineWeights::Renormalized => chosen.iter().map(|&i| p[i]).sum(),
                    _ => 1.0,
                };
                chosen
                    .iter()
                    .map(|&i| {
                        let w = match self.combine.weights {
                            CombineWeights::Raw => p[i],
                            CombineWeights::Renormalized => p[i] / norm,
                            CombineWeights::Unit | CombineWeights::UnitStraightThrough => 1.0,
                        };
                        (i, w * self.combine.scale)
                    })
                    .collect()
            })
            .collect()
    }

    /// Sparse dispatch on flattened tokens `x: [tokens, hidden]`: each expert runs once, on the
    /// tokens routed to it, and the weighted outputs are scatter-added. Up to [`FEW_TOKENS`]
    /// tokens take the decode path instead (not differentiable in the router; training calls
    /// [`MoeParams::forward_sparse`], which is). TEAL thresholds, if set, apply on every path.
    pub fn forward_tokens(&self, x: Tensor<2>) -> Result<Tensor<2>, MoeError> {
        let n = x.dims()[0];
        if n <= KERNEL_TOKENS && self.host.is_some() {
            let [_, h] = x.dims();
            let device = x.device();
            let y = self.forward_kernel(&to_vec(x), n).expect("host kernel present")?;
            return Ok(Tensor::from_data(TensorData::new(y, [n, h]), &device));
        }
        let d = if n <= FEW_TOKENS {
            self.forward_few(x)?
        } else if let Some(m) = self.masked.as_ref().filter(|m| m.when.masked_at(n)) {
            self.params
                .forward_masked(m, &self.combine, &self.policy, self.teal(), x)?
        } else {
            self.params
                .forward_sparse_with(&self.combine, &self.policy, self.teal(), None, x)?
        };
        self.record(&d.load, n, d.saved);
        Ok(d.out)
    }

    /// Decode-sized inputs: each token runs its chosen experts one after the other, weighted by
    /// host-side scalars. No gather, scatter or thread hand-off: at one token those cost more
    /// than the experts' matmuls. Not differentiable in the router (inference only).
    fn forward_few(&self, x: Tensor<2>) -> Result<Dispatch, MoeError> {
        let [n, hidden] = x.dims();
        // The router sees the unthresholded x.
        let routes = self.route(&self.router_probs(x.clone())?);
        let teal = self.teal();
        let mut load = vec![0; self.num_experts()];
        let mut saved = 0.0;
        let mut rows = Vec::with_capacity(n);
        for (t, route) in routes.iter().enumerate() {
            let xt = if n == 1 { x.clone() } else { x.clone().narrow(0, t, 1) };
            let (xt, kept_x) = match teal {
                Some((tx, _)) => {
                    let (xt, kept) = threshold_x(xt, tx);
                    (xt, kept[0] as f64)
                }
                None => (xt, 0.0),
            };
            let mut run = |f: &DenseFfn| match teal {
                None => f.forward_any(xt.clone()),
                Some((_, th)) => {
                    let (a, kept_h) = expert_activation(f, xt.clone(), Some(th), None);
                    saved += teal_saved(hidden, f.intermediate_size(), 1, kept_x, kept_h);
                    f.down_proj.forward(a)
                }
            };
            let mut y = self.params.shared.as_ref().map(&mut run);
            for &(i, w) in route {
                load[i] += 1;
                let e = run(&self.params.experts[i]);
                let e = if w == 1.0 { e } else { e.mul_scalar(w) };
                y = Some(match y {
                    Some(y) => y + e,
                    None => e,
                });
            }
            rows.push(y.unwrap_or_else(|| xt.zeros_like()));
        }
        let out = if rows.len() == 1 {
            rows.pop().expect("one row")
        } else {
            Tensor::cat(rows, 0)
        };
        Ok(Dispatch { out, load, saved })
    }

    /// Reference path: every expert runs on every token and unchosen outputs get weight 0. Exact
    /// but costs the whole FFN; for tests, and for training where a dense graph is simpler. It
    /// ignores TEAL thresholds (the plain block's output).
    pub fn forward_dense(&self, x: Tensor<2>) -> Result<Tensor<2>, MoeError> {
        let [n, _] = x.dims();
        let device = x.device();
        let routes = self.route(&self.router_probs(x.clone())?);
        let e = self.num_experts();
        let mut w = vec![0f32; n * e];
        for (t, r) in routes.iter().enumerate() {
            for &(i, v) in r {
                w[t * e + i] = v;
            }
        }
        let w = Tensor::<2>::from_data(TensorData::new(w, [n, e]), &device);
        let mut out = match &self.params.shared {
            Some(s) => s.forward_any(x.clone()),
            None => Tensor::zeros(x.dims(), &device),
        };
        for (i, expert) in self.params.experts.iter().enumerate() {
            out = out + expert.forward_any(x.clone()) * w.clone().narrow(1, i, 1);
        }
        Ok(out)
    }

    /// The decode path on the host kernel (`x: [n, hidden]`), when [`FeedForward::prepare_host`]
    /// has built it: router on the host, then only the chosen experts' neuron blocks (and the
    /// shared experts) are read. The same function as [`MoeBlock::forward_tokens`].
    /// With TEAL thresholds the kernel reads, of each expert that runs, only the kept inputs'
    /// slices of gate and up and the kept neurons' rows of down (the module header's rule).
    pub fn forward_kernel(&self, x: &[f32], n: usize) -> Option<Result<Vec<f32>, MoeError>> {
        let k = self.host.as_ref()?;
        let e = self.num_experts();
        let mut probs = vec![0f32; n * e];
        match &k.predictor {
            Some(q) => {
                let mut z = vec![0f32; n * q.rows];
                q.matvec(x, n, &mut z);
                k.router.matvec(&z, n, &mut probs);
            }
            None => k.router.matvec(x, n, &mut probs),
        }
        let mut bad = 0;
        for row in probs.chunks_mut(e) {
            if let Some(b) = &k.router_bias {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0;
            row.iter_mut().for_each(|v| {
                *v = (*v - m).exp();
                sum += *v;
            });
            row.iter_mut().for_each(|v| *v /= sum);
            if row.iter().any(|v| !v.is_finite()) {
                bad += 1;
            }
        }
        if bad > 0 {
            return Some(Err(MoeError::NonFiniteRouter { bad, tokens: n }));
        }
        let mut load = vec![0; e];
        let blocks: Vec<Vec<(std::ops::Range<usize>, f32)>> = self
            .route(&probs)
            .into_iter()
            .map(|route| {
                let mut b: Vec<_> = k.shared.iter().map(|r| (r.clone(), 1.0)).collect();
                for (i, w) in route {
                    load[i] += 1;
                    b.push((k.experts[i].clone(), w));
                }
                b
            })
            .collect();
        let mut y = vec![0f32; x.len()];
        let sel = match self.teal() {
            None => ladimo_kernel::Selection::Blocks(&blocks),
            Some((tx, th)) => ladimo_kernel::Selection::TealBlocks {
                x: tx,
                h: th,
                blocks: &blocks,
            },
        };
        let read = k.ffn.forward(x, n, &sel, &mut y);
        // What the thresholds kept from being read (0 without them: the blocks are read whole).
        let run: usize = blocks.iter().flatten().map(|(r, _)| r.len()).sum();
        self.record(&load, n, (3 * k.ffn.hidden * run) as f64 - read);
        Some(Ok(y))
    }

    fn record(&self, load: &[usize], tokens: usize, saved: f64) {
        let mut s = self.stats.lock().unwrap();
        s.tokens += tokens as u64;
        s.threshold_saved += saved;
        for (i, &l) in load.iter().enumerate() {
            s.load[i] += l as u64;
            s.routed_params += (l * self.expert_params[i]) as f64;
        }
    }
}

impl FeedForward for MoeBlock {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, h] = x.dims();
        Ok(self.forward_tokens(x.reshape([b * s, h]))?.reshape([b, s, h]))
    }

    fn total_params(&self) -> usize {
        self.router_params() + self.shared_params() + self.expert_params.iter().sum::<usize>()
    }

    /// Router + shared experts + the routed-expert parameters that ran, less what TEAL thresholds
    /// kept from being read, averaged over every token seen since the last reset (all routed
    /// experts when none has been seen).
    fn active_params_per_token(&self) -> f64 {
        let s = self.stats.lock().unwrap();
        let routed = if s.tokens == 0 {
            self.expert_params.iter().sum::<usize>() as f64
        } else {
            (s.routed_params - s.threshold_saved) / s.tokens as f64
        };
        (self.router_params() + self.shared_params()) as f64 + routed
    }

    fn reset_stats(&self) {
        MoeBlock::reset_stats(self)
    }

    fn forward_host(&self, x: &[f32], n: usize) -> Option<Result<Vec<f32>, FfnError>> {
        self.forward_kernel(x, n).map(|r| r.map_err(Into::into))
    }

    fn prepare_prefill(&mut self) {
        self.choose_prefill_path();
    }

    fn prepare_host(&mut self, dtype: ladimo_kernel::Dtype) {
        let biased =
            |f: &DenseFfn| f.gate_proj.bias.is_some() || f.up_proj.bias.is_some() || f.down_proj.bias.is_some();
        let any_bias = self
            .params
            .experts
            .iter()
            .chain(self.params.shared.as_ref())
            .any(biased);
        self.host = (!any_bias).then(|| MoeKernel::new(&self.params, dtype, self.kernel_layout()));
    }

    fn describe(&self) -> String {
        let shared = self
            .params
            .shared
            .as_ref()
            .map(|s| format!(" + shared {}", s.intermediate_size()))
            .unwrap_or_default();
        let sparsity = self.sparsity.as_ref().map(|s| format!(", {s}")).unwrap_or_default();
        format!(
            "moe {} experts{shared}, {}, {:?} x{}{sparsity}",
            self.num_experts(),
            self.policy,
            self.combine.weights,
            self.combine.scale
        )
    }
}
