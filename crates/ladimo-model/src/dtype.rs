//! Inference in 16-bit weights: every matrix a checkpoint gives is rounded to f16 or bf16 as it
//! is read, so the burn path (prefill, perplexity) and the host decode path (which stores them in
//! 16 bits) compute with the same weights. Vectors (norms, biases) stay f32.

use std::path::PathBuf;

use ladimo_io::{Checkpoint, HostTensor, TensorInfo, WeightSource};
use ladimo_kernel::Dtype;

/// A weight source whose matrices come out rounded to `dtype`.
struct Rounded {
    inner: Box<dyn WeightSource>,
    dtype: Dtype,
}

impl WeightSource for Rounded {
    fn infos(&self) -> Vec<TensorInfo> {
        self.inner.infos()
    }
    fn load(&self, name: &str) -> ladimo_io::Result<HostTensor> {
        let mut t = self.inner.load(name)?;
        if t.shape.len() >= 2 {
            t.data.iter_mut().for_each(|v| *v = self.dtype.round(*v));
        }
        Ok(t)
    }
    fn file_of(&self, name: &str) -> PathBuf {
        self.inner.file_of(name)
    }
}

/// A source with no tensors (what `ckpt.weights` holds for a moment while it is wrapped).
struct Empty;

impl WeightSource for Empty {
    fn infos(&self) -> Vec<TensorInfo> {
        Vec::new()
    }
    fn load(&self, name: &str) -> ladimo_io::Result<HostTensor> {
        Err(ladimo_io::Error::Tensor {
            path: PathBuf::new(),
            tensor: name.into(),
            msg: "weights are being wrapped".into(),
        })
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        PathBuf::new()
    }
}

/// The checkpoint at `path` with its matrices rounded to `dtype` as they are read (`--dtype`,
/// convert's `eval.dtype`, the benchmarks).
pub fn open_rounded(path: impl AsRef<std::path::Path>, dtype: Dtype) -> ladimo_io::Result<Checkpoint> {
    let mut ckpt = Checkpoint::open(path)?;
    round_weights(&mut ckpt, dtype);
    Ok(ckpt)
}

/// Make `ckpt` give its matrices rounded to `dtype` (nothing changes for f32).
pub fn round_weights(ckpt: &mut Checkpoint, dtype: Dtype) {
    if dtype == Dtype::F32 {
        return;
    }
    let inner = std::mem::replace(&mut ckpt.weights, Box::new(Empty));
    ckpt.weights = Box::new(Rounded { inner, dtype });
}
