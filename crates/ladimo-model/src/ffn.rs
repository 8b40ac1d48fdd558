//! The feed-forward block behind a trait, and the dense SwiGLU FFN of LLaMA.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};
use ladimo_io::HostTensor;

use crate::elementwise::Cut;
use crate::util::{to_tensor, transpose_host};

/// An error a feed-forward block hits at run time (e.g. NaN router logits in an MoE block).
pub type FfnError = Box<dyn std::error::Error + Send + Sync>;

/// What a decoder layer needs from its feed-forward block. A dense SwiGLU and an MoE block both
/// implement it, so a model can mix them layer by layer.
///
/// `Any` lets code that knows a concrete block type reach it (`&mut dyn FeedForward as &mut dyn
/// Any`, then `downcast_mut`), e.g. to change an MoE block's routing policy.
pub trait FeedForward: std::any::Any + Send + Sync + std::fmt::Debug {
    /// `[batch, seq, hidden] -> [batch, seq, hidden]`.
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError>;
    /// All parameters of the block.
    fn total_params(&self) -> usize;
    /// Parameters one token activates, on average over the tokens seen so far (exact for dense).
    fn active_params_per_token(&self) -> f64;
    /// A short description for logs and `inspect` (e.g. `dense 576x1536`).
    fn describe(&self) -> String;
    /// Forget the tokens seen so far (what [`FeedForward::active_params_per_token`] averages
    /// over). Blocks whose activated parameters do not depend on the input keep no count.
    fn reset_stats(&self) {}
    /// The block on the host for decode (`x: [n, hidden]` -> `[n, hidden]`), when it has a
    /// host-side kernel (built by [`FeedForward::prepare_host`]); `None` sends the caller to
    /// [`FeedForward::forward`].
    fn forward_host(&self, _x: &[f32], _n: usize) -> Option<Result<Vec<f32>, FfnError>> {
        None
    }
    /// Build the block's host-side decode weights in `dtype` from its current weights (call it
    /// once the weights are final: a later change of the burn weights does not reach them).
    /// Blocks without a host path ignore it.
    fn prepare_host(&mut self, _dtype: ladimo_kernel::Dtype) {}
    /// Choose, by timing on this machine, how the block runs many tokens at once (prefill), where
    /// it has more than one way (an MoE block: grouped per expert or dense-masked). Call it once
    /// the weights and policy are final. Blocks with one way ignore it.
    fn prepare_prefill(&mut self) {}
}

/// LLaMA's FFN: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct DenseFfn {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

fn linear(w: &HostTensor, b: Option<HostTensor>, device: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(to_tensor(transpose_host(w), device)),
        bias: b.map(|b| Param::from_tensor(to_tensor(b, device))),
    }
}

impl DenseFfn {
    /// From PyTorch-layout weights: gate/up `[inter, hidden]`, down `[hidden, inter]`.
    pub fn from_host(
        gate: &HostTensor,
        up: &HostTensor,
        down: &HostTensor,
        biases: Option<[HostTensor; 3]>,
        device: &Device,
    ) -> Self {
        let [bg, bu, bd] = match biases {
            Some([a, b, c]) => [Some(a), Some(b), Some(c)],
            None => [None, None, None],
        };
        Self {
            gate_proj: linear(gate, bg, device),
            up_proj: linear(up, bu, device),
            down_proj: linear(down, bd, device),
        }
    }

    pub fn hidden_size(&self) -> usize {
        self.gate_proj.weight.dims()[0]
    }

    pub fn intermediate_size(&self) -> usize {
        self.gate_proj.weight.dims()[1]
    }

    /// The intermediate activation `silu(gate(x)) * up(x)`, `[.., intermediate]` (the product
    /// in one pass where the tensors are on the host: [`crate::elementwise`]).
    pub fn activation<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.activation_cut(x, Cut::None).0
    }

    /// [`DenseFfn::activation`] with the entries `cut` names set to 0, and how many were kept.
    pub fn activation_cut<const D: usize>(&self, x: Tensor<D>, cut: Cut) -> (Tensor<D>, f64) {
        let g = self.gate_proj.forward(x.clone());
        crate::elementwise::swiglu(g, self.up_proj.forward(x), cut)
    }

    /// Works on any rank (`[.., hidden]`), for callers that hold tokens flattened.
    pub fn forward_any<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.down_proj.forward(self.activation(x))
    }
}

impl FeedForward for DenseFfn {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        Ok(self.forward_any(x))
    }

    fn total_params(&self) -> usize {
        self.num_params()
    }

    fn active_params_per_token(&self) -> f64 {
        self.num_params() as f64
    }

    fn describe(&self) -> String {
        format!("dense {}x{}", self.hidden_size(), self.intermediate_size())
    }
}

/// A dense FFN with a host-side kernel copy of its weights ([`ladimo_kernel::FfnKernel`], in
/// 32 or 16 bits) for decode: up to `max_tokens` tokens run on the kernel, more on burn (the
/// dense FFN). `max_tokens` is measured when the model prepares host decode
/// ([`crate::Transformer::prepare_host_decode`]), not fixed.
#[derive(Debug)]
pub struct KernelFfn {
    pub dense: DenseFfn,
    pub kernel: ladimo_kernel::FfnKernel,
    pub max_tokens: usize,
}

impl KernelFfn {
    /// `None` when the FFN has biases (the kernel has none).
    pub fn new(dense: DenseFfn, dtype: ladimo_kernel::Dtype, max_tokens: usize) -> Option<Self> {
        let kernel = ffn_kernel(&dense, dtype, ladimo_kernel::GateUpLayout::NeuronMajor)?;
        Some(Self {
            dense,
            kernel,
            max_tokens,
        })
    }

    fn run_kernel(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        self.kernel.forward(x, n, &ladimo_kernel::Selection::All, &mut y);
        y
    }
}

/// A kernel copy of `dense`'s weights in `dtype` and `layout`; `None` when it has biases (the
/// kernel has none).
pub fn ffn_kernel(
    dense: &DenseFfn,
    dtype: ladimo_kernel::Dtype,
    layout: ladimo_kernel::GateUpLayout,
) -> Option<ladimo_kernel::FfnKernel> {
    if dense.gate_proj.bias.is_some() || dense.up_proj.bias.is_some() || dense.down_proj.bias.is_some() {
        return None;
    }
    let (h, f) = (dense.hidden_size(), dense.intermediate_size());
    // burn stores [in, out]: gate/up [hidden, inter] is PyTorch's [inter, hidden] transposed.
    let t = |l: &Linear, rows: usize, cols: usize| transpose_vec(&crate::util::to_vec(l.weight.val()), rows, cols);
    Some(ladimo_kernel::FfnKernel::new(
        &t(&dense.gate_proj, h, f),
        &t(&dense.up_proj, h, f),
        &t(&dense.down_proj, f, h),
        h,
        f,
        dtype,
        layout,
    ))
}

/// A row-major `[rows, cols]` matrix transposed to `[cols, rows]`.
pub fn transpose_vec(d: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = d[i * cols + j];
        }
    }
    out
}

impl FeedForward for KernelFfn {
    fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>, FfnError> {
        let [b, s, h] = x.dims();
        if b * s > self.max_tokens {
            return Ok(self.dense.forward_any(x));
        }
        let device = x.device();
        let y = self.run_kernel(&crate::util::to_vec(x), b * s);
        Ok(Tensor::from_data(burn::tensor::TensorData::new(y, [b, s, h]), &device))
    }

    fn forward_host(&self, x: &[f32], n: usize) -> Option<Result<Vec<f32>, FfnError>> {
        Some(Ok(self.run_kernel(x, n)))
    }

    fn total_params(&self) -> usize {
        self.dense.num_params()
    }

    fn active_params_per_token(&self) -> f64 {
        self.dense.num_params() as f64
    }

    fn describe(&self) -> String {
        format!("{}, {} kernel", self.dense.describe(), self.kernel.dtype())
    }
}

impl KernelFfn {
    /// The largest token count (of 1, 2, 4, 8) up to which the kernel is faster than the burn
    /// FFN: each timed twice per size, alternating, best of two.
    pub fn measure_max_tokens(&self) -> usize {
        let h = self.dense.hidden_size();
        let device = self.dense.gate_proj.weight.device();
        let mut limit = 0;
        for n in [1usize, 2, 4, 8] {
            let x: Vec<f32> = (0..n * h).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
            let (mut tb, mut tk) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..2 {
                let t = std::time::Instant::now();
                let xt = Tensor::<2>::from_data(burn::tensor::TensorData::new(x.clone(), [n, h]), &device);
                let _ = crate::util::to_vec(self.dense.forward_any(xt));
                tb = tb.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                let _ = self.run_kernel(&x, n);
                tk = tk.min(t.elapsed().as_secs_f64());
            }
            if tk > tb {
                break;
            }
            limit = n;
        }
        limit
    }
}
