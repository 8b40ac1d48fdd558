//! Host-side CPU kernels for decode (one to a few tokens), with no deep-learning dependency.
//!
//! At one token per step a decoder reads every weight once and does two flops per weight: it is
//! bound by memory, and a tensor library's per-op overhead is a large share of the step. This
//! crate holds weights in the layout the decode step reads them in, in 32 or 16 bits ([`Dtype`];
//! products always accumulate in f32), and computes:
//!
//! - [`Matrix::matvec`]: `y = W x` for a row-major `[out, in]` matrix (attention projections,
//!   the LM head, a dense FFN's parts), rows split between the threads;
//! - [`FfnKernel`]: a SwiGLU FFN `down(silu(gate x) * up x)` that reads only what a sparsity
//!   policy keeps ([`Selection`]): chosen experts' contiguous neuron blocks, a fixed neuron set,
//!   CATS (gate always, up/down for kept neurons) or TEAL (gate/up stored input-major, so a zero
//!   input entry skips one contiguous column; then down rows of kept neurons).
//!
//! - [`attend`]: one query head's attention over a host KV cache;
//! - [`elementwise`]: for many tokens (prefill), SwiGLU's `silu(g) * u` and the policies'
//!   thresholds in one pass each, on activations a tensor library computed the products of.
//!
//! [`testdata`] gives the deterministic inputs the workspace's tests and benchmarks share.
//!
//! The inner loops ([`simd`]) have AVX-512F, AVX2+FMA+F16C and scalar versions, chosen once at run
//! time ([`Isa::get`]; `LADIMO_KERNEL_ISA=scalar|avx2|avx512` overrides it).

mod attention;
pub mod elementwise;
mod ffn;
mod isa;
mod matrix;
pub mod simd;
pub mod testdata;

pub use attention::attend;
pub use ffn::{FfnKernel, GateUpLayout, Selection};
pub use isa::Isa;
pub use matrix::{Dtype, Matrix, Weights};

/// `[0, len)` cut into at most `parts` contiguous ranges of nearly equal length, none empty,
/// each a multiple of `align` long except the last.
pub fn split(len: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let align = align.max(1);
    let chunk = len.div_ceil(parts).div_ceil(align) * align;
    (0..parts)
        .map(|p| (p * chunk).min(len)..((p + 1) * chunk).min(len))
        .filter(|r| !r.is_empty())
        .collect()
}

/// How many threads a kernel call splits its work into (rayon's pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// SiLU, `v / (1 + exp(-v))`.
#[inline]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}
