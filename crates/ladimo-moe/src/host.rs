//! SwiGLU weights on the host, for cutting experts out of a dense FFN.

use burn::tensor::Device;
use ladimo_io::{Checkpoint, HostTensor};
use ladimo_model::DenseFfn;

/// A SwiGLU FFN's weights in PyTorch layout: gate, up `[inter, hidden]`, down `[hidden, inter]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostFfn {
    pub gate: HostTensor,
    pub up: HostTensor,
    pub down: HostTensor,
}

impl HostFfn {
    /// Layer `layer`'s dense FFN, as stored in the checkpoint (biases are not supported here).
    pub fn from_checkpoint(ckpt: &Checkpoint, layer: usize) -> Result<Self, ladimo_io::Error> {
        let c = &ckpt.config;
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let p = format!("model.layers.{layer}.mlp");
        Ok(Self {
            gate: ckpt.load(&format!("{p}.gate_proj.weight"), &[f, h])?,
            up: ckpt.load(&format!("{p}.up_proj.weight"), &[f, h])?,
            down: ckpt.load(&format!("{p}.down_proj.weight"), &[h, f])?,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.gate.shape[1]
    }

    pub fn intermediate_size(&self) -> usize {
        self.gate.shape[0]
    }

    pub fn num_params(&self) -> usize {
        3 * self.hidden_size() * self.intermediate_size()
    }

    /// The FFN restricted to intermediate neurons `idx` (rows of gate/up, columns of down).
    pub fn select_neurons(&self, idx: &[usize]) -> HostFfn {
        let (h, f) = (self.hidden_size(), self.intermediate_size());
        let rows = |t: &HostTensor| {
            let mut d = Vec::with_capacity(idx.len() * h);
            for &i in idx {
                d.extend_from_slice(&t.data[i * h..(i + 1) * h]);
            }
            HostTensor::new(vec![idx.len(), h], d)
        };
        let mut down = Vec::with_capacity(h * idx.len());
        for r in 0..h {
            down.extend(idx.iter().map(|&i| self.down.data[r * f + i]));
        }
        HostFfn {
            gate: rows(&self.gate),
            up: rows(&self.up),
            down: HostTensor::new(vec![h, idx.len()], down),
        }
    }

    /// Check the three matrices agree; `what` names the FFN in the error.
    pub fn check(&self, hidden: usize, what: &str) -> Result<(), crate::MoeError> {
        let f = self.gate.shape.first().copied().unwrap_or(0);
        let ok = self.gate.shape == [f, hidden] && self.up.shape == [f, hidden] && self.down.shape == [hidden, f];
        if ok && f > 0 {
            Ok(())
        } else {
            Err(crate::MoeError::Shape(format!(
                "{what}: gate {:?}, up {:?}, down {:?} do not form a SwiGLU FFN of hidden size {hidden}",
                self.gate.shape, self.up.shape, self.down.shape
            )))
        }
    }

    pub fn to_dense(&self, device: &Device) -> DenseFfn {
        DenseFfn::from_host(&self.gate, &self.up, &self.down, None, device)
    }

    /// A dense FFN's weights copied to the host, in PyTorch layout (the inverse of [`Self::to_dense`]).
    pub fn from_dense(d: &DenseFfn) -> Self {
        use crate::checkpoint::linear_host_weight;
        Self {
            gate: linear_host_weight(&d.gate_proj),
            up: linear_host_weight(&d.up_proj),
            down: linear_host_weight(&d.down_proj),
        }
    }
}
