//! Weights in 32 or 16 bits and the row-major matrix-vector product.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::simd::{Elem, axpy, dot};
use crate::{Isa, split};

/// How weights are stored. Products always accumulate in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    #[default]
    F32,
    /// IEEE half precision (5-bit exponent: values above 65504 become infinite).
    F16,
    /// bfloat16 (f32's exponent, 8 bits of mantissa).
    Bf16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Bytes per weight.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// `v` rounded to the nearest value this type holds (round to nearest even), as f32.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::F16 => f16::from_f32(v).to_f32(),
            Dtype::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown dtype `{s}` (f32, f16, bf16)"))
    }
}

/// A flat weight buffer in one of the [`Dtype`]s.
#[derive(Debug, Clone)]
pub enum Weights {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Weights {
    pub fn from_f32(data: &[f32], dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => Weights::F32(data.to_vec()),
            Dtype::F16 => Weights::F16(data.iter().map(|&v| f16::from_f32(v)).collect()),
            Dtype::Bf16 => Weights::Bf16(data.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Weights::F32(_) => Dtype::F32,
            Weights::F16(_) => Dtype::F16,
            Weights::Bf16(_) => Dtype::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Weights::F32(v) => v.len(),
            Weights::F16(v) => v.len(),
            Weights::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` widened to f32.
    pub fn to_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            Weights::F32(v) => v[range].to_vec(),
            Weights::F16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            Weights::Bf16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// Runs `$body` with `$data` bound to the typed slice of `$w` (one monomorphised copy per type).
macro_rules! with_slice {
    ($w:expr, $data:ident => $body:expr) => {
        match $w {
            $crate::Weights::F32(v) => {
                let $data: &[f32] = v;
                $body
            }
            $crate::Weights::F16(v) => {
                let $data: &[half::f16] = v;
                $body
            }
            $crate::Weights::Bf16(v) => {
                let $data: &[half::bf16] = v;
                $body
            }
        }
    };
}

/// A row-major `[rows, cols]` matrix.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub weights: Weights,
}

impl Matrix {
    /// From row-major f32 data, stored as `dtype`.
    pub fn new(rows: usize, cols: usize, data: &[f32], dtype: Dtype) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data is not {rows}x{cols}");
        Self {
            rows,
            cols,
            weights: Weights::from_f32(data, dtype),
        }
    }

    /// From a row-major `[cols, rows]` matrix (i.e. its transpose is stored).
    pub fn transposed(rows: usize, cols: usize, data_t: &[f32], dtype: Dtype) -> Self {
        assert_eq!(data_t.len(), rows * cols, "matrix data is not {cols}x{rows}");
        let mut d = vec![0f32; rows * cols];
        for c in 0..cols {
            for r in 0..rows {
                d[r * cols + c] = data_t[c * rows + r];
            }
        }
        Self::new(rows, cols, &d, dtype)
    }

    pub fn dtype(&self) -> Dtype {
        self.weights.dtype()
    }

    /// Bytes the weights take.
    pub fn bytes(&self) -> usize {
        self.weights.len() * self.dtype().bytes()
    }

    /// Row `r` widened to f32 (e.g. an embedding).
    pub fn row(&self, r: usize) -> Vec<f32> {
        self.weights.to_f32(r * self.cols..(r + 1) * self.cols)
    }

    /// `row r . x`.
    #[inline]
    pub fn row_dot(&self, isa: Isa, r: usize, x: &[f32]) -> f32 {
        let c = self.cols;
        with_slice!(&self.weights, w => dot(isa, &w[r * c..(r + 1) * c], x))
    }

    /// `y += a * row r[cols]` for the columns `cols` (`y` as long as that range).
    #[inline]
    pub fn row_axpy(&self, isa: Isa, r: usize, cols: std::ops::Range<usize>, a: f32, y: &mut [f32]) {
        let c = self.cols;
        with_slice!(&self.weights, w => axpy(isa, a, &w[r * c + cols.start..r * c + cols.end], y))
    }

    /// `y = x W^T` for `n` tokens: `x: [n, cols]`, `y: [n, rows]`. Rows are split between the
    /// threads.
    pub fn matvec(&self, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "matvec input is not [{n}, {}]", self.cols);
        assert_eq!(y.len(), n * self.rows, "matvec output is not [{n}, {}]", self.rows);
        let isa = Isa::get();
        let parts = split(self.rows, crate::threads(), 16);
        with_slice!(&self.weights, w => matvec_typed(isa, w, self.cols, x, n, &parts, y))
    }
}

fn matvec_typed<T: Elem>(
    isa: Isa,
    w: &[T],
    cols: usize,
    x: &[f32],
    n: usize,
    parts: &[std::ops::Range<usize>],
    y: &mut [f32],
) {
    let rows = w.len() / cols;
    // One row at a time: the rows are contiguous, so the matrix is one sequential read (reading
    // several rows side by side in one pass, to share the loads of `x`, measured slower: the
    // interleaved streams defeat the processor's prefetcher, and memory is the bound here).
    let part = |rr: &std::ops::Range<usize>, out: &mut [f32]| {
        // out: [n, rr.len()]
        let m = rr.len();
        for r in rr.clone() {
            let row = &w[r * cols..(r + 1) * cols];
            for t in 0..n {
                out[t * m + r - rr.start] = dot(isa, row, &x[t * cols..(t + 1) * cols]);
            }
        }
    };
    if n == 1 {
        let mut slices = Vec::with_capacity(parts.len());
        let mut rest = y;
        for rr in parts {
            let (a, b) = rest.split_at_mut(rr.len());
            slices.push((rr.clone(), a));
            rest = b;
        }
        slices.into_par_iter().for_each(|(rr, out)| part(&rr, out));
    } else {
        let outs: Vec<Vec<f32>> = parts
            .par_iter()
            .map(|rr| {
                let mut out = vec![0f32; n * rr.len()];
                part(rr, &mut out);
                out
            })
            .collect();
        for (rr, out) in parts.iter().zip(outs) {
            for t in 0..n {
                y[t * rows + rr.start..t * rows + rr.end].copy_from_slice(&out[t * rr.len()..(t + 1) * rr.len()]);
            }
        }
    }
}
