//! The SwiGLU FFN `y = down(silu(gate x) * up x)` for one to a few tokens, reading only what a
//! sparsity [`Selection`] keeps.

use std::ops::Range;

use rayon::prelude::*;

use crate::matrix::{Dtype, Matrix, Weights};
use crate::simd::{Elem, axpy, axpy_rows, dot, prefetch};
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
    /// TEAL inside experts: per token, the neuron ranges of the experts that run and their
    /// weights (as [`Selection::Blocks`]); `x_i = 0` where `|x_i| < x` (the same for every range),
    /// then inside each range `h_j = 0` where `|h_j| < h`, before the range's weight.
    TealBlocks {
        x: f32,
        h: f32,
        blocks: &'a [Vec<(Range<usize>, f32)>],
    },
}

/// A SwiGLU FFN's weights in a decode layout. Down is stored `[inter, hidden]` (neuron `j`'s
/// output column contiguous), so a dropped neuron skips one contiguous read.
#[derive(Debug, Clone)]
pub struct FfnKernel {
    pub hidden: usize,
    pub inter: usize,
    pub layout: GateUpLayout,
    /// The neuron ranges the threads take (input-major layout: how gate and up are blocked).
    parts: Vec<Range<usize>>,
    /// Neuron-major: `[inter, 2 * hidden]`, neuron `j`'s gate row then its up row (one contiguous
    /// read per neuron). Input-major: per range `r` of `parts`, a row-major `[hidden, 2 * r.len()]`
    /// block (input `i`'s gate weights to the neurons of `r`, then its up weights: one contiguous
    /// read per kept input and thread). `up` is empty in both.
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
        let parts = split(inter, crate::threads(), 16);
        let (gate, up) = match layout {
            GateUpLayout::NeuronMajor => {
                // Row j: gate_j then up_j, so a neuron is one contiguous read.
                let mut gu = Vec::with_capacity(2 * inter * hidden);
                for j in 0..inter {
                    gu.extend_from_slice(&gate[j * hidden..(j + 1) * hidden]);
                    gu.extend_from_slice(&up[j * hidden..(j + 1) * hidden]);
                }
                (
                    Matrix::new(inter, 2 * hidden, &gu, dtype),
                    Matrix::new(0, hidden, &[], dtype),
                )
            }
            GateUpLayout::InputMajor => {
                // Per thread's neuron range `r` (the split `forward` uses), a `[hidden, r.len()]`
                // block: each thread reads one contiguous region, with gaps only where inputs
                // are dropped.
                let mut d = Vec::with_capacity(2 * inter * hidden);
                for r in &parts {
                    for i in 0..hidden {
                        d.extend(r.clone().map(|j| gate[j * hidden + i]));
                        d.extend(r.clone().map(|j| up[j * hidden + i]));
                    }
                }
                (
                    Matrix::new(hidden, 2 * inter, &d, dtype),
                    Matrix::new(0, hidden, &[], dtype),
                )
            }
        };
        Self {
            hidden,
            inter,
            layout,
            parts,
            gate,
            up,
            down: Matrix::transposed(inter, hidden, down, dtype),
        }
    }

    /// The layout a selection's kernel needs: input-major for TEAL, neuron-major otherwise.
    pub fn layout_for(sel: &Selection) -> GateUpLayout {
        match sel {
            Selection::Teal { .. } | Selection::TealBlocks { .. } => GateUpLayout::InputMajor,
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
        if let Selection::Blocks(b) | Selection::TealBlocks { blocks: b, .. } = sel {
            assert_eq!(b.len(), n, "{} token routes for {n} tokens", b.len());
        }
        let isa = Isa::get();
        let mut read = 0.0;
        let all: Vec<u32> = if matches!(sel, Selection::All) && self.layout == GateUpLayout::NeuronMajor {
            (0..f as u32).collect()
        } else {
            Vec::new()
        };
        for t in 0..n {
            let xt = &x[t * hd..(t + 1) * hd];
            let yt = &mut y[t * hd..(t + 1) * hd];
            read += match (*sel, self.layout) {
                (Selection::All, GateUpLayout::InputMajor) => {
                    self.columns(isa, xt, 0.0, 0.0, None, yt);
                    (3 * hd * f) as f64
                }
                (Selection::Teal { x, h }, GateUpLayout::InputMajor) => {
                    let (kept_x, kept_h) = self.columns(isa, xt, x, h, None, yt);
                    (2 * f * kept_x + hd * kept_h) as f64
                }
                (Selection::TealBlocks { x, h, blocks }, GateUpLayout::InputMajor) => {
                    let run: usize = blocks[t].iter().map(|(r, _)| r.len()).sum();
                    for (r, _) in &blocks[t] {
                        assert!(r.end <= f, "neuron range {r:?} beyond {f} neurons");
                    }
                    let (kept_x, kept_h) = self.columns(isa, xt, x, h, Some(&blocks[t]), yt);
                    (2 * run * kept_x + hd * kept_h) as f64
                }
                (Selection::All, GateUpLayout::NeuronMajor) => {
                    self.rows(isa, xt, &all, None, yt);
                    (3 * hd * f) as f64
                }
                (Selection::Neurons(keep), _) => {
                    self.rows(isa, xt, keep, None, yt);
                    (3 * hd * keep.len()) as f64
                }
                (Selection::Blocks(routes), _) => {
                    let (mut idx, mut w) = (Vec::new(), Vec::new());
                    for (r, wt) in &routes[t] {
                        assert!(r.end <= f, "neuron range {r:?} beyond {f} neurons");
                        idx.extend(r.start as u32..r.end as u32);
                        w.extend(std::iter::repeat_n(*wt, r.len()));
                    }
                    self.rows(isa, xt, &idx, Some(&w), yt);
                    (3 * hd * idx.len()) as f64
                }
                (Selection::Cats { gate }, _) => {
                    let kept = self.cats(isa, xt, gate, yt);
                    (hd * f + 2 * hd * kept) as f64
                }
                (Selection::Teal { .. } | Selection::TealBlocks { .. }, GateUpLayout::NeuronMajor) => {
                    unreachable!("checked above")
                }
            };
        }
        read
    }

    /// `y = sum_k w_k h_k down_{idx[k]}` with `h_k = silu(gate_{idx[k]} . x) * (up_{idx[k]} . x)`
    /// (neuron-major layout): the list split between the threads, each computing its neurons'
    /// activations and their share of `y` in one go (one parallel region per token).
    fn rows(&self, isa: Isa, x: &[f32], idx: &[u32], w: Option<&[f32]>, y: &mut [f32]) {
        let parts = split(idx.len(), crate::threads(), 8);
        par_sum(parts.len(), y, |p, yp| {
            let r = parts[p].clone();
            let w = w.map(|w| &w[r.clone()]);
            with_ffn!(self, (g, _u, d) => rows_part(isa, g, d, self.hidden, x, &idx[r], w, yp));
            0
        });
    }

    /// TEAL on the input-major layout: `x_i` below `tx` dropped, `h = silu(gate x) * (up x)` as a
    /// sum of the kept inputs' columns, `h_j` below `th` dropped, `y = down h`. With `blocks`, only
    /// those neuron ranges run, each neuron's `h_j` (after the threshold) times its range's weight.
    /// The neurons are split between the threads (each owns a range of every column: no shared
    /// output), and each adds its neurons' share of `y`. Returns the inputs and the neurons kept.
    fn columns(
        &self,
        isa: Isa,
        x: &[f32],
        tx: f32,
        th: f32,
        blocks: Option<&[(Range<usize>, f32)]>,
        y: &mut [f32],
    ) -> (usize, usize) {
        let mut kept = Vec::with_capacity(x.len());
        let mut xs = Vec::with_capacity(x.len());
        for (i, &v) in x.iter().enumerate() {
            if v.abs() >= tx {
                kept.push(i as u32);
                xs.push(v);
            }
        }
        let parts = &self.parts;
        let kept_h = par_sum(parts.len(), y, |p, yp| {
            let r = parts[p].clone();
            // The pieces of this thread's range that run, offsets within it, and their weights;
            // neighbours of one weight (Unit combine: every piece) merged into one longer read.
            let pieces: Vec<(Range<usize>, f32)> = match blocks {
                None => vec![(0..r.len(), 1.0)],
                Some(b) => {
                    let mut v: Vec<(Range<usize>, f32)> = b
                        .iter()
                        .filter_map(|(b, w)| {
                            let (s, e) = (b.start.max(r.start), b.end.min(r.end));
                            (s < e).then(|| (s - r.start..e - r.start, *w))
                        })
                        .collect();
                    v.sort_by_key(|(c, _)| c.start);
                    let mut merged: Vec<(Range<usize>, f32)> = Vec::with_capacity(v.len());
                    for (c, w) in v {
                        match merged.last_mut() {
                            Some((m, mw)) if m.end == c.start && *mw == w => m.end = c.end,
                            _ => merged.push((c, w)),
                        }
                    }
                    merged
                }
            };
            if pieces.is_empty() {
                return 0;
            }
            with_ffn!(self, (g, _u, d) => columns_part(isa, g, d, self.hidden, &kept, &xs, th, r, &pieces, yp))
        });
        (kept.len(), kept_h)
    }

    /// CATS: `a = silu(gate x)` for every neuron, `h_j = a_j * (up_j . x)` where `|a_j|` reaches
    /// `tg`, `y = down h`; the neurons split between the threads. Returns the neurons kept.
    fn cats(&self, isa: Isa, x: &[f32], tg: f32, y: &mut [f32]) -> usize {
        let parts = split(self.inter, crate::threads(), 16);
        par_sum(parts.len(), y, |p, yp| {
            let r = parts[p].clone();
            with_ffn!(self, (g, _u, d) => cats_part(isa, g, d, self.hidden, x, tg, r, yp))
        })
    }
}

/// Runs `part(p, y_p)` for `p` in `0..parts` on the threads, each `y_p` a zeroed buffer as long as
/// `y`, and sets `y` to their sum (in part order, so the result does not depend on scheduling).
/// Returns the sum of what the parts return.
fn par_sum(parts: usize, y: &mut [f32], part: impl Fn(usize, &mut [f32]) -> usize + Sync) -> usize {
    y.fill(0.0);
    if parts <= 1 {
        return part(0, y);
    }
    let len = y.len();
    let (first, rest) = rayon::join(
        || part(0, y),
        || {
            (1..parts)
                .into_par_iter()
                .map(|p| {
                    let mut v = vec![0f32; len];
                    let c = part(p, &mut v);
                    (v, c)
                })
                .collect::<Vec<_>>()
        },
    );
    let mut count = first;
    for (v, c) in rest {
        for (y, v) in y.iter_mut().zip(&v) {
            *y += v;
        }
        count += c;
    }
    count
}

/// Runs `$body` with `$g`, `$u`, `$d` bound to the typed slices of an FFN kernel's gate, up and
/// down (one monomorphised copy per type).
macro_rules! with_ffn {
    ($k:expr, ($g:ident, $u:ident, $d:ident) => $body:expr) => {
        match (&$k.gate.weights, &$k.up.weights, &$k.down.weights) {
            (Weights::F32($g), Weights::F32($u), Weights::F32($d)) => {
                let ($g, $u, $d): (&[f32], &[f32], &[f32]) = ($g, $u, $d);
                $body
            }
            (Weights::F16($g), Weights::F16($u), Weights::F16($d)) => {
                let ($g, $u, $d): (&[half::f16], &[half::f16], &[half::f16]) = ($g, $u, $d);
                $body
            }
            (Weights::Bf16($g), Weights::Bf16($u), Weights::Bf16($d)) => {
                let ($g, $u, $d): (&[half::bf16], &[half::bf16], &[half::bf16]) = ($g, $u, $d);
                $body
            }
            _ => unreachable!("gate, up and down are stored in one dtype"),
        }
    };
}
use with_ffn;

/// One thread's share of [`FfnKernel::rows`]: per neuron its gate and up rows (one contiguous
/// read, scattered rows prefetched ahead), then the down rows of the nonzero activations.
#[allow(clippy::too_many_arguments)]
fn rows_part<T: Elem>(isa: Isa, g: &[T], d: &[T], hd: usize, x: &[f32], idx: &[u32], w: Option<&[f32]>, y: &mut [f32]) {
    let gu = |j: u32| at(g, j as usize * 2 * hd, 2 * hd);
    let mut h = vec![0f32; idx.len()];
    let mut ahead = Ahead::default();
    for (k, (h, &j)) in h.iter_mut().zip(idx).enumerate() {
        if let Some(&n) = idx.get(k + AHEAD)
            && ahead.scattered(n)
        {
            prefetch(gu(n));
        }
        let r = gu(j);
        *h = silu(dot(isa, &r[..hd], x)) * dot(isa, &r[hd..], x);
    }
    if let Some(w) = w {
        h.iter_mut().zip(w).for_each(|(h, w)| *h *= w);
    }
    down_nonzero(isa, d, hd, idx.iter().copied().zip(h), y);
}

/// `m[start..start + len]`.
#[inline(always)]
fn at<T>(m: &[T], start: usize, len: usize) -> &[T] {
    &m[start..start + len]
}

/// `y += sum h_j down_j` over the pairs `(j, h_j)` with `h_j != 0`, scattered rows prefetched
/// ahead.
fn down_nonzero<T: Elem>(isa: Isa, d: &[T], hd: usize, pairs: impl Iterator<Item = (u32, f32)>, y: &mut [f32]) {
    let kept: Vec<(u32, f32)> = pairs.filter(|&(_, h)| h != 0.0).collect();
    let row = |j: u32| at(d, j as usize * hd, hd);
    let mut ahead = Ahead::default();
    for (k, &(j, h)) in kept.iter().enumerate() {
        if let Some(&(n, _)) = kept.get(k + AHEAD)
            && ahead.scattered(n)
        {
            prefetch(row(n));
        }
        axpy(isa, h, row(j), y);
    }
}

/// How many rows ahead of the one in use the scattered-row loops prefetch.
const AHEAD: usize = 4;

/// Which rows of a list to prefetch: neurons are often scattered (experts of a few neurons), and
/// a short read at a new place waits for memory line by line, so such rows are asked for `AHEAD`
/// rows before they are used (several reads in flight). Inside a long contiguous run the
/// processor's own prefetcher already streams, and a software prefetch only costs issue slots.
#[derive(Default)]
struct Ahead {
    last: Option<u32>,
    run: usize,
}

impl Ahead {
    /// Whether to prefetch row `n`, the next in the list after those seen.
    fn scattered(&mut self, n: u32) -> bool {
        self.run = if self.last.is_some_and(|l| l + 1 == n) {
            self.run + 1
        } else {
            0
        };
        self.last = Some(n);
        self.run < 8
    }
}

/// One thread's share of [`FfnKernel::columns`], neurons `r`: for each piece of `r` that runs
/// (offsets within `r`, with its weight), the kept columns' slices added eight per pass (the f32
/// sums loaded and stored once per eight columns), then the down rows of the kept neurons.
/// Returns the neurons kept (`|h_j| >= th`).
#[allow(clippy::too_many_arguments)]
fn columns_part<T: Elem>(
    isa: Isa,
    g: &[T],
    d: &[T],
    hd: usize,
    kept: &[u32],
    xs: &[f32],
    th: f32,
    r: Range<usize>,
    pieces: &[(Range<usize>, f32)],
    y: &mut [f32],
) -> usize {
    let mut gs = vec![0f32; r.len()];
    let mut us = vec![0f32; r.len()];
    // This thread's block: `[hidden, 2 * r.len()]` from `2 * r.start * hidden`.
    let block = at(g, 2 * r.start * hd, 2 * hd * r.len());
    let mut count = 0;
    let mut pairs: Vec<(u32, f32)> = Vec::new();
    for (c, w) in pieces {
        columns_sum(
            isa,
            block,
            r.len(),
            c.clone(),
            kept,
            xs,
            &mut gs[c.clone()],
            &mut us[c.clone()],
        );
        for k in c.clone() {
            let h = silu(gs[k]) * us[k];
            if h.abs() >= th {
                count += 1;
                pairs.push(((r.start + k) as u32, h * w));
            }
        }
    }
    down_nonzero(isa, d, hd, pairs.into_iter(), y);
    count
}

/// `gs += sum_k xs[k] * gate_{kept[k]}[c]` and `us += sum_k xs[k] * up_{kept[k]}[c]`, where row
/// `i` of `m` is `gate_i` then `up_i` (each `len` long) and `c` the columns that run: eight rows
/// per pass, so the sums are loaded and stored once per eight, the next eight rows' slices
/// prefetched meanwhile.
#[allow(clippy::too_many_arguments)]
fn columns_sum<T: Elem>(
    isa: Isa,
    m: &[T],
    len: usize,
    c: Range<usize>,
    kept: &[u32],
    xs: &[f32],
    gs: &mut [f32],
    us: &mut [f32],
) {
    let row = |k: usize| at(m, kept[k] as usize * 2 * len, 2 * len);
    let gate = |k: usize| &row(k)[c.clone()];
    let up = |k: usize| &row(k)[len + c.start..len + c.end];
    let n = kept.len();
    let mut k = 0;
    while k + 8 <= n {
        for q in k + 8..(k + 16).min(n) {
            if c.len() == len {
                prefetch(row(q));
            } else {
                prefetch(gate(q));
                prefetch(up(q));
            }
        }
        let a: [f32; 8] = std::array::from_fn(|q| xs[k + q]);
        axpy_rows(isa, a, std::array::from_fn(|q| gate(k + q)), gs);
        axpy_rows(isa, a, std::array::from_fn(|q| up(k + q)), us);
        k += 8;
    }
    for (q, &a) in xs.iter().enumerate().skip(k) {
        axpy_rows(isa, [a], [gate(q)], gs);
        axpy_rows(isa, [a], [up(q)], us);
    }
}

/// One thread's share of [`FfnKernel::cats`], neurons `r`: each gate row, the up row of a kept
/// neuron, then the kept neurons' down rows. Returns the neurons kept.
#[allow(clippy::too_many_arguments)]
fn cats_part<T: Elem>(
    isa: Isa,
    g: &[T],
    d: &[T],
    hd: usize,
    x: &[f32],
    tg: f32,
    r: Range<usize>,
    y: &mut [f32],
) -> usize {
    let gu = |j: usize| at(g, j * 2 * hd, 2 * hd);
    let mut kept: Vec<(u32, f32)> = Vec::with_capacity(r.len());
    for j in r {
        // Gate is always read; up only for the kept neurons (the rest of the row is skipped).
        let row = gu(j);
        let a = silu(dot(isa, &row[..hd], x));
        if a.abs() >= tg {
            kept.push((j as u32, a * dot(isa, &row[hd..], x)));
        }
    }
    let n = kept.len();
    down_nonzero(isa, d, hd, kept.into_iter(), y);
    n
}
