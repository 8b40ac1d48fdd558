//! The predictor router (issue 26): a low-rank map `hidden -> rank -> experts` that predicts,
//! from a token's FFN input `x`, each expert's log output norm `y_e = ln(||expert_e(x)|| + EPS)`,
//! the quantity a router should rank experts by. As Deja Vu's MLP predictors: two linear maps,
//! no activation, so the block stores it as [`ladimo_moe::MoeBlock::with_predictor`] and export
//! formats get its product. Its `rank * (hidden + experts) + experts` parameters count as
//! activated for every token.
//!
//! **The fit is exact, not trained.** Least squares under a rank constraint is reduced-rank
//! regression, solved in closed form from statistics summed over the calibration tokens
//! ([`PredictorStats`]: the sums of `x`, `y`, `x xᵀ`, `x yᵀ` and `|y|²`, so memory does not grow
//! with the text). With `S = Σ (x-μx)(x-μx)ᵀ + λI` (a small ridge `λ`, relative to the trace),
//! `W = S⁻¹ Σ (x-μx)(y-μy)ᵀ` the full-rank solution and `S = L Lᵀ`: the best rank-`r` predictor is
//! `W V_r V_rᵀ`, with `V_r` the top `r` right singular vectors of `M = Lᵀ W` (the directions of
//! the fitted values with the most variance). `V_r` comes from the `hidden x hidden` eigenproblem
//! of `M Mᵀ` (`V_r = Mᵀ U_r Σ_r⁻¹`). The predictor is then `down = (W V_r)ᵀ` `[rank, hidden]`,
//! `up = V_r` `[experts, rank]`, `bias = μy - up down μx`. No learning rate, no epochs, and the
//! same answer every run; [`Solved::at_rank`] reports the calibration loss of every rank from one
//! solve. Tests: the loss equals the predictor's own mean squared error on the data, falls with
//! the rank, and matches plain least squares at full rank.
//!
//! [`collect_stats`] gathers the statistics of every layer in one pass of a dense model over the
//! calibration windows, for a given cut of each FFN into experts.

use std::sync::Mutex;

use burn::tensor::{Tensor, TensorData};
use ladimo_io::HostTensor;
use ladimo_model::util::{ids_tensor, to_vec};
use ladimo_model::{DenseFfn, FeedForward, FfnError, Transformer};
use ladimo_moe::HostFfn;
use nalgebra::{DMatrix, SymmetricEigen};

use crate::DistillError;

/// Added to an expert's output norm before the log, so that an expert whose neurons are all
/// silent for a token gets a finite (very low) target.
pub const EPS: f32 = 1e-3;

/// The ridge, relative to the mean diagonal of `Σ (x-μx)(x-μx)ᵀ`.
pub const RIDGE: f64 = 1e-4;

/// Sufficient statistics of `(x, y)` pairs for a least-squares fit of `y` on `x` (f64 sums).
#[derive(Debug, Clone)]
pub struct PredictorStats {
    pub hidden: usize,
    pub experts: usize,
    pub tokens: usize,
    sx: Vec<f64>,
    sy: Vec<f64>,
    /// `Σ x xᵀ`, `[hidden, hidden]` row-major.
    xx: Vec<f64>,
    /// `Σ x yᵀ`, `[hidden, experts]` row-major.
    xy: Vec<f64>,
    yy: f64,
}

impl PredictorStats {
    pub fn new(hidden: usize, experts: usize) -> Self {
        Self {
            hidden,
            experts,
            tokens: 0,
            sx: vec![0.0; hidden],
            sy: vec![0.0; experts],
            xx: vec![0.0; hidden * hidden],
            xy: vec![0.0; hidden * experts],
            yy: 0.0,
        }
    }

    /// Add tokens: `x` `[n, hidden]`, `y` `[n, experts]` (the products are taken on the device).
    pub fn add(&mut self, x: Tensor<2>, y: Tensor<2>) {
        let n = x.dims()[0];
        let xt = x.clone().transpose();
        let add = |acc: &mut [f64], t: Tensor<2>| acc.iter_mut().zip(to_vec(t)).for_each(|(a, v)| *a += v as f64);
        add(&mut self.xx, xt.clone().matmul(x.clone()));
        add(&mut self.xy, xt.matmul(y.clone()));
        add(&mut self.sx, x.sum_dim(0));
        add(&mut self.sy, y.clone().sum_dim(0));
        self.yy += to_vec(y.clone() * y).iter().map(|&v| v as f64).sum::<f64>();
        self.tokens += n;
    }

    /// Solve the full-rank problem once; [`Solved::at_rank`] then gives every rank.
    pub fn solve(&self) -> Result<Solved, DistillError> {
        let (h, e, n) = (self.hidden, self.experts, self.tokens as f64);
        if self.tokens < 2 {
            return Err(DistillError::Invalid(format!(
                "the predictor fit needs at least 2 calibration tokens, got {}",
                self.tokens
            )));
        }
        let mx = DMatrix::from_iterator(h, 1, self.sx.iter().map(|v| v / n));
        let my = DMatrix::from_iterator(e, 1, self.sy.iter().map(|v| v / n));
        // Centered sums (nalgebra is column-major: the row-major sums are read transposed).
        let sxx = DMatrix::from_row_slice(h, h, &self.xx) - &mx * mx.transpose() * n;
        let sxy = DMatrix::from_row_slice(h, e, &self.xy) - &mx * my.transpose() * n;
        let total = self.yy - n * my.norm_squared();
        let ridge = RIDGE * sxx.trace() / h as f64;
        let reg = &sxx + DMatrix::identity(h, h) * ridge.max(f64::MIN_POSITIVE);
        let chol = reg.cholesky().ok_or_else(|| {
            DistillError::Invalid("the predictor fit: the FFN inputs' covariance is not positive definite".into())
        })?;
        let w = chol.solve(&sxy);
        let m = chol.l().transpose() * &w;
        let eig = SymmetricEigen::new(&m * m.transpose());
        let mut order: Vec<usize> = (0..h).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        Ok(Solved {
            mx,
            my,
            sxx,
            sxy,
            total,
            n,
            w,
            m,
            eigenvectors: eig.eigenvectors,
            eigenvalues: eig.eigenvalues,
            order,
        })
    }
}

/// The full-rank solve of [`PredictorStats::solve`].
pub struct Solved {
    mx: DMatrix<f64>,
    my: DMatrix<f64>,
    sxx: DMatrix<f64>,
    sxy: DMatrix<f64>,
    total: f64,
    n: f64,
    w: DMatrix<f64>,
    m: DMatrix<f64>,
    eigenvectors: DMatrix<f64>,
    eigenvalues: nalgebra::DVector<f64>,
    order: Vec<usize>,
}

/// A fitted predictor and its loss on the calibration tokens.
#[derive(Debug, Clone)]
pub struct PredictorFit {
    /// `[rank, hidden]`.
    pub down: HostTensor,
    /// `[experts, rank]`.
    pub up: HostTensor,
    /// `[experts]`.
    pub bias: HostTensor,
    /// Mean squared error per (token, expert) of the predicted log norms on the calibration tokens.
    pub loss: f64,
    /// The same for the best constant (each expert's mean): what the rank buys is measured against it.
    pub constant_loss: f64,
}

impl Solved {
    /// The best predictor of rank `rank` (at most the hidden size and the number of experts).
    pub fn at_rank(&self, rank: usize) -> Result<PredictorFit, DistillError> {
        let (h, e) = (self.w.nrows(), self.w.ncols());
        ladimo_moe::check_predictor_rank(rank, h)?;
        if rank > e {
            return Err(DistillError::Invalid(format!(
                "predictor rank {rank} is larger than the {e} experts it scores"
            )));
        }
        // V_r = Mᵀ U_r Σ_r⁻¹ (orthonormal columns; a zero singular value gives a zero column).
        let mut v = DMatrix::zeros(e, rank);
        for (j, &i) in self.order.iter().take(rank).enumerate() {
            let s = self.eigenvalues[i].max(0.0).sqrt();
            if s > 1e-12 * self.eigenvalues[self.order[0]].max(1e-300).sqrt() {
                let col = self.m.transpose() * self.eigenvectors.column(i) / s;
                v.set_column(j, &col);
            }
        }
        let q = &self.w * &v; // [h, r]; the rank-r coefficients are Q Vᵀ
        // Residual sum of squares of P = Q Vᵀ: total - 2 tr(Pᵀ Sxy) + tr(Pᵀ Sxx P).
        let cross = (q.component_mul(&(&self.sxy * &v))).sum();
        let quad = (q.transpose() * &self.sxx * &q).trace();
        let loss = (self.total - 2.0 * cross + quad).max(0.0) / (self.n * e as f64);
        let bias = &self.my - &v * (q.transpose() * &self.mx);
        let f32s = |it: &mut dyn Iterator<Item = f64>| it.map(|v| v as f32).collect::<Vec<f32>>();
        Ok(PredictorFit {
            // Row-major [r, h] is column-major Q [h, r].
            down: HostTensor::new(vec![rank, h], f32s(&mut q.iter().copied())),
            // Row-major [e, r] is column-major Vᵀ [r, e].
            up: HostTensor::new(vec![e, rank], f32s(&mut v.transpose().iter().copied())),
            bias: HostTensor::new(vec![e], f32s(&mut bias.iter().copied())),
            loss,
            constant_loss: self.total.max(0.0) / (self.n * e as f64),
        })
    }
}

/// An FFN cut into experts, as the predictor sees it: the experts merged into one FFN in order,
/// and each expert's rows of `down` for the norms of its output.
#[derive(Debug)]
pub struct ExpertCut {
    merged: DenseFfn,
    /// Neurons per expert, in order.
    sizes: Vec<usize>,
    /// Per expert `[size, hidden]` rows of down (burn layout), for experts of more than one neuron.
    downs: Vec<Tensor<2>>,
    /// Experts of one neuron: `||down_j||` per neuron `[1, experts]`.
    single_norms: Option<Tensor<2>>,
}

impl ExpertCut {
    pub fn new(experts: &[HostFfn], device: &burn::tensor::Device) -> Self {
        let sizes: Vec<usize> = experts.iter().map(|f| f.gate.shape[0]).collect();
        let cat = |pick: fn(&HostFfn) -> &HostTensor| {
            let first = pick(&experts[0]);
            let cols = first.shape[1];
            let data: Vec<f32> = experts.iter().flat_map(|f| pick(f).data.iter().copied()).collect();
            HostTensor::new(vec![data.len() / cols, cols], data)
        };
        let (gate, up) = (cat(|f| &f.gate), cat(|f| &f.up));
        // down is [hidden, neurons] per expert: concatenate along the neurons.
        let hidden = experts[0].down.shape[0];
        let inter: usize = sizes.iter().sum();
        let mut down = vec![0f32; hidden * inter];
        let mut start = 0;
        for f in experts {
            let s = f.down.shape[1];
            for r in 0..hidden {
                down[r * inter + start..r * inter + start + s].copy_from_slice(&f.down.data[r * s..(r + 1) * s]);
            }
            start += s;
        }
        let merged = HostFfn {
            gate,
            up,
            down: HostTensor::new(vec![hidden, inter], down),
        };
        let merged = merged.to_dense(device);
        let d = merged.down_proj.weight.val(); // [inter, hidden]
        let (downs, single_norms) = if sizes.iter().all(|&s| s == 1) {
            (Vec::new(), Some(d.powi_scalar(2).sum_dim(1).sqrt().transpose()))
        } else {
            let mut start = 0;
            let downs = sizes
                .iter()
                .map(|&s| {
                    let t = d.clone().narrow(0, start, s);
                    start += s;
                    t
                })
                .collect();
            (downs, None)
        };
        Self {
            merged,
            sizes,
            downs,
            single_norms,
        }
    }

    /// The targets `ln(||expert_e(x)|| + EPS)` `[n, experts]` for `x` `[n, hidden]`.
    pub fn log_norms(&self, x: Tensor<2>) -> Tensor<2> {
        let f = &self.merged;
        let a = burn::tensor::activation::silu(f.gate_proj.forward(x.clone())) * f.up_proj.forward(x);
        let norms = match &self.single_norms {
            Some(dn) => a.abs() * dn.clone(),
            None => {
                let mut start = 0;
                let cols: Vec<Tensor<2>> = self
                    .sizes
                    .iter()
                    .zip(&self.downs)
                    .map(|(&s, d)| {
                        let y = a.clone().narrow(1, start, s).matmul(d.clone());
                        start += s;
                        y.powi_scalar(2).sum_dim(1).sqrt()
                    })
                    .collect();
                Tensor::cat(cols, 1)
            }
        };
        norms.add_scalar(EPS).log()
    }
}

/// Records one layer's statistics while the dense FFN runs.
#[derive(Debug)]
struct Recorder {
    ffn: DenseFfn,
    cut: ExpertCut,
    stats: Mutex<PredictorStats>,
}

impl FeedForward for Recorder {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, h] = x.dims();
        let flat = x.clone().reshape([b * s, h]);
        let y = self.cut.log_norms(flat.clone());
        self.stats.lock().unwrap().add(flat, y);
        self.ffn.forward(x)
    }
    fn total_params(&self) -> usize {
        self.ffn.total_params()
    }
    fn active_params_per_token(&self) -> f64 {
        self.ffn.active_params_per_token()
    }
    fn describe(&self) -> String {
        "dense (recording the predictor's statistics)".into()
    }
}

/// One pass of the dense `model` over `windows`: per layer, the statistics of its FFN inputs and
/// of the log output norms of `cuts[layer]`'s experts. Every layer must be a dense SwiGLU FFN;
/// the model is left as it was.
pub fn collect_stats(
    model: &mut Transformer,
    cuts: Vec<ExpertCut>,
    windows: &[&[u32]],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<PredictorStats>, DistillError> {
    let n = model.layers.len();
    if cuts.len() != n {
        return Err(DistillError::Invalid(format!(
            "{} expert cuts for {n} layers",
            cuts.len()
        )));
    }
    let mut originals = Vec::with_capacity(n);
    for (l, cut) in cuts.into_iter().enumerate() {
        let Some(ffn) = ladimo_moe::sparsity::dense_ffn(model, l).cloned() else {
            // Put back what was swapped so far before refusing.
            for (l, o) in originals.into_iter().enumerate() {
                model.layers[l].ffn = o;
            }
            return Err(DistillError::Invalid(format!(
                "layer {l} is not a dense SwiGLU FFN ({}): the predictor is fitted on a dense model",
                model.layers[l].ffn.describe()
            )));
        };
        let stats = Mutex::new(PredictorStats::new(ffn.hidden_size(), cut.sizes.len()));
        let rec: Box<dyn FeedForward> = Box::new(Recorder { ffn, cut, stats });
        originals.push(std::mem::replace(&mut model.layers[l].ffn, rec));
    }
    let mut run = || -> Result<(), DistillError> {
        for (i, w) in windows.iter().enumerate() {
            model.forward(ids_tensor(w, 1, &model.device))?;
            progress(i + 1, windows.len());
        }
        Ok(())
    };
    let ran = run();
    let mut stats = Vec::with_capacity(n);
    for (l, orig) in originals.into_iter().enumerate() {
        let rec = std::mem::replace(&mut model.layers[l].ffn, orig);
        let rec: Box<dyn std::any::Any> = rec;
        let rec = rec.downcast::<Recorder>().expect("installed above");
        stats.push(rec.stats.into_inner().unwrap());
    }
    ran?;
    Ok(stats)
}

/// The predictor's prediction `[n, experts]` for `x` `[n, hidden]` on the host (for tests and
/// checks): `up (down x) + bias`.
pub fn predict(fit: &PredictorFit, x: &[f32], n: usize) -> Vec<f32> {
    let (r, h) = (fit.down.shape[0], fit.down.shape[1]);
    let e = fit.up.shape[0];
    let mut out = vec![0f32; n * e];
    for t in 0..n {
        let xt = &x[t * h..(t + 1) * h];
        let z: Vec<f64> = (0..r)
            .map(|k| {
                fit.down.data[k * h..(k + 1) * h]
                    .iter()
                    .zip(xt)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            })
            .collect();
        for i in 0..e {
            let v: f64 = (0..r).map(|k| fit.up.data[i * r + k] as f64 * z[k]).sum();
            out[t * e + i] = (v + fit.bias.data[i] as f64) as f32;
        }
    }
    out
}

/// A device tensor from host rows (tests and callers that hold host data).
pub fn rows_tensor(data: Vec<f32>, n: usize, cols: usize, device: &burn::tensor::Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data, [n, cols]), device)
}
