//! The SwiGLU FFN `y = down(silu(gate x) * up x)` for one to a few tokens, reading only what a
//! sparsity [`Selection`] keeps.

use std::ops::Range;

use rayon::prelude::*;

use crate::matrix::{Dtype, Matrix, with_slice};
use crate::simd::{Elem, axpy};
use crate::{Isa, silu, split};

/// How gate and up are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUpLayout {
    /// `[inter, hidden]`: neuron `j`'s row is contiguous, so a chosen neuron (or an expert, a run
    /// of neurons) is one contiguous read, and the product is a dot product per neuron.
    NeuronMajor,
    /// `[hidden, inter]`: input entry `i`'s column is contiguous, so a zero `x_i` skips one
    /// contiguous read (TEAL), and the product is a sum of scaled columns.
    InputMajor,
}

/// Which neurons run, per call.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// Every neuron (the dense FFN).
    All,
    /// These neurons, for every token (static pruning).
    Neurons(&'a [u32]),
    /// Per token: neuron ranges (experts, shared experts) and the weight of each range's output.
    Blocks(&'a [Vec<(Range<usize>, f32)>]),
    /// CATS: `h_j = 0` where `|silu(gate_j x)| < gate` (gate is always read).
    Cats { gate: f32 },
    /// TEAL: `x_i = 0` where `|x_i| < x`, then `h_j = 0` where `|h_j| < h`.
    Teal { x: f32, h: f32 },
}

/// A SwiGLU FFN's weights in a decode layout. Down is stored `[inter, hidden]` (neuron `j`'s
/// output column contiguous), so a dropped neuron skips one contiguous read.
#[derive(Debug, Clone)]
pub struct FfnKernel {
    pub hidden: usize,
    pub inter: usize,
    pub layout: GateUpLayout,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

impl FfnKernel {
    /// From PyTorch-layout weights: `gate`, `up` `[inter, hidden]`, `down` `[hidden, inter]`.
    pub fn new(
        gate: &[f32],
        up: &[f32],
        down: &[f32],
        hidden: usize,
        inter: usize,
        dtype: Dtype,
        layout: GateUpLayout,
    ) -> Self {
        assert_eq!(gate.len(), inter * hidden, "gate is not [{inter}, {hidden}]");
        assert_eq!(up.len(), inter * hidden, "up is not [{inter}, {hidden}]");
        assert_eq!(down.len(), inter * hidden, "down is not [{hidden}, {inter}]");
        let (gate, up) = match layout {
            GateUpLayout::NeuronMajor => (
                Matrix::new(inter, hidden, gate, dtype),
                Matrix::new(inter, hidden, up, dtype),
            ),
            GateUpLayout::InputMajor => (
                Matrix::transposed(hidden, inter, gate, dtype),
                Matrix::transposed(hidden, inter, up, dtype),
            ),
        };
        Self {
            hidden,
            inter,
            layout,
            gate,
            up,
            down: Matrix::transposed(inter, hidden, down, dtype),
        }
    }

    /// The layout a selection's kernel needs: input-major for TEAL, neuron-major otherwise.
    pub fn layout_for(sel: &Selection) -> GateUpLayout {
        match sel {
            Selection::Teal { .. } => GateUpLayout::InputMajor,
            _ => GateUpLayout::NeuronMajor,
        }
    }

    pub fn dtype(&self) -> Dtype {
        self.gate.dtype()
    }

    /// Bytes the weights take.
    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    /// `y = FFN(x)` for `n` tokens (`x`, `y`: `[n, hidden]`), reading what `sel` keeps. Returns
    /// the parameters read, summed over the tokens (the count [`Selection`]'s policy defines).
    ///
    /// Panics when `sel` needs the other layout ([`FfnKernel::layout_for`]) or does not fit.
    pub fn forward(&self, x: &[f32], n: usize, sel: &Selection, y: &mut [f32]) -> f64 {
        let (hd, f) = (self.hidden, self.inter);
        assert_eq!(x.len(), n * hd, "FFN input is not [{n}, {hd}]");
        assert_eq!(y.len(), n * hd, "FFN output is not [{n}, {hd}]");
        let need = Self::layout_for(sel);
        assert!(
            self.layout == need || matches!(sel, Selection::All),
            "{sel:?} needs gate/up stored {need:?}, they are {:?}",
            self.layout
        );
        if let Selection::Blocks(b) = sel {
            assert_eq!(b.len(), n, "{} token routes for {n} tokens", b.len());
        }
        let isa = Isa::get();
        let mut read = 0.0;
        let mut h = Vec::new();
        let mut idx: Vec<u32> = Vec::new();
        let mut scale: Vec<f32> = Vec::new();
        for t in 0..n {
            let xt = &x[t * hd..(t + 1) * hd];
            let yt = &mut y[t * hd..(t + 1) * hd];
            idx.clear();
            scale.clear();
            match (*sel, self.layout) {
                (Selection::All | Selection::Teal { .. }, GateUpLayout::InputMajor) => {
                    let (tx, th) = match sel {
                        Selection::Teal { x, h } => (*x, *h),
                        _ => (0.0, 0.0),
                    };
                    let kept_x: Vec<u32> = (0..hd as u32).filter(|&i| xt[i as usize].abs() >= tx).collect();
                    h.resize(f, 0.0);
                    self.gate_up_columns(isa, xt, &kept_x, &mut h);
                    for (j, &v) in h.iter().enumerate() {
                        if v.abs() >= th {
                            idx.push(j as u32);
                        }
                    }
                    scale.extend(idx.iter().map(|&j| h[j as usize]));
                    read += if matches!(sel, Selection::All) {
                        (3 * hd * f) as f64
                    } else {
                        (2 * f * kept_x.len() + hd * idx.len()) as f64
                    };
                }
                (Selection::All, GateUpLayout::NeuronMajor) => {
                    idx.extend(0..f as u32);
                    read += (3 * hd * f) as f64;
                    self.gate_up_rows(isa, xt, &idx, None, &mut scale);
                }
                (Selection::Neurons(keep), _) => {
                    idx.extend_from_slice(keep);
                    read += (3 * hd * keep.len()) as f64;
                    self.gate_up_rows(isa, xt, &idx, None, &mut scale);
                }
                (Selection::Blocks(routes), _) => {
                    let mut w = Vec::new();
                    for (r, wt) in &routes[t] {
                        assert!(r.end <= f, "neuron range {r:?} beyond {f} neurons");
                        idx.extend(r.start as u32..r.end as u32);
                        w.extend(std::iter::repeat_n(*wt, r.len()));
                    }
                    read += (3 * hd * idx.len()) as f64;
                    self.gate_up_rows(isa, xt, &idx, Some(&w), &mut scale);
                }
                (Selection::Cats { gate: tg }, _) => {
                    // silu(gate x) for every neuron, then up and down for the kept ones.
                    let all: Vec<u32> = (0..f as u32).collect();
                    let mut a = vec![0f32; f];
                    par_rows(&all, &mut a, |j| silu(self.gate.row_dot(isa, j as usize, xt)));
                    idx.extend(all.iter().copied().filter(|&j| a[j as usize].abs() >= tg));
                    scale.resize(idx.len(), 0.0);
                    par_rows(&idx, &mut scale, |j| {
                        a[j as usize] * self.up.row_dot(isa, j as usize, xt)
                    });
                    read += (hd * f + 2 * hd * idx.len()) as f64;
                }
                (Selection::Teal { .. }, GateUpLayout::NeuronMajor) => unreachable!("checked above"),
            }
            yt.fill(0.0);
            self.down_rows(isa, &idx, &scale, yt);
        }
        read
    }

    /// `h_j = w_j * silu(gate_j . x) * (up_j . x)` for the neurons `idx` (neuron-major layout).
    fn gate_up_rows(&self, isa: Isa, x: &[f32], idx: &[u32], w: Option<&[f32]>, h: &mut Vec<f32>) {
        h.resize(idx.len(), 0.0);
        let (g, u) = (&self.gate, &self.up);
        match w {
            None => par_rows(idx, h, |j| {
                let j = j as usize;
                silu(g.row_dot(isa, j, x)) * u.row_dot(isa, j, x)
            }),
            Some(w) => {
                par_rows(idx, h, |j| {
                    let j = j as usize;
                    silu(g.row_dot(isa, j, x)) * u.row_dot(isa, j, x)
                });
                for (h, w) in h.iter_mut().zip(w) {
                    *h *= w;
                }
            }
        }
    }

    /// `h = silu(sum_{i in kept} x_i gate_i) * (sum_{i in kept} x_i up_i)` (input-major layout),
    /// the neurons split between the threads.
    fn gate_up_columns(&self, isa: Isa, x: &[f32], kept: &[u32], h: &mut [f32]) {
        let f = self.inter;
        let parts = split(f, crate::threads(), 16);
        let mut slices = Vec::with_capacity(parts.len());
        let mut rest = h;
        for r in &parts {
            let (a, b) = rest.split_at_mut(r.len());
            slices.push((r.clone(), a));
            rest = b;
        }
        slices.into_par_iter().for_each(|(r, hs)| {
            let mut u = vec![0f32; r.len()];
            hs.fill(0.0);
            for &i in kept {
                let i = i as usize;
                self.gate.row_axpy(isa, i, r.clone(), x[i], hs);
                self.up.row_axpy(isa, i, r.clone(), x[i], &mut u);
            }
            for (g, u) in hs.iter_mut().zip(&u) {
                *g = silu(*g) * u;
            }
        });
    }

    /// `y += sum_k h[k] * down_{idx[k]}`, the output entries split between the threads.
    fn down_rows(&self, isa: Isa, idx: &[u32], h: &[f32], y: &mut [f32]) {
        let parts = split(self.hidden, crate::threads(), 16);
        let mut slices = Vec::with_capacity(parts.len());
        let mut rest = y;
        for r in &parts {
            let (a, b) = rest.split_at_mut(r.len());
            slices.push((r.clone(), a));
            rest = b;
        }
        let cols = self.hidden;
        slices
            .into_par_iter()
            .for_each(|(r, ys)| with_slice!(&self.down.weights, w => down_part(isa, w, cols, idx, h, r, ys)));
    }
}

fn down_part<T: Elem>(isa: Isa, w: &[T], cols: usize, idx: &[u32], h: &[f32], r: Range<usize>, y: &mut [f32]) {
    for (&j, &hj) in idx.iter().zip(h) {
        if hj != 0.0 {
            let base = j as usize * cols;
            axpy(isa, hj, &w[base + r.start..base + r.end], y);
        }
    }
}

/// `out[k] = f(idx[k])`, the list split between the threads.
fn par_rows(idx: &[u32], out: &mut [f32], f: impl Fn(u32) -> f32 + Sync) {
    let parts = split(idx.len(), crate::threads(), 8);
    if parts.len() <= 1 {
        for (o, &j) in out.iter_mut().zip(idx) {
            *o = f(j);
        }
        return;
    }
    let mut slices = Vec::with_capacity(parts.len());
    let mut rest = out;
    for r in &parts {
        let (a, b) = rest.split_at_mut(r.len());
        slices.push((r.clone(), a));
        rest = b;
    }
    slices.into_par_iter().for_each(|(r, os)| {
        for (o, &j) in os.iter_mut().zip(&idx[r]) {
            *o = f(j);
        }
    });
}
