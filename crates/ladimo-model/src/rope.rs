//! Rotary position embeddings in Hugging Face's (half-split, `rotate_half`) convention, with
//! linear, LLaMA 3 and per-frequency scaling.

use burn::tensor::{Device, Tensor, TensorData};
use ladimo_io::{ModelConfig, RopeScaling};

/// Cos/sin tables `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor<2>,
    sin: Tensor<2>,
    pub max_positions: usize,
}

/// Inverse frequencies, as Hugging Face computes them (including `rope_scaling`).
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64)) as f32)
        .collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|&f| f / *factor as f32).collect(),
        Some(RopeScaling::Factors(fs)) => base.iter().zip(fs).map(|(&f, &d)| f / d as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, lo, hi, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    pub fn new(cfg: &ModelConfig, max_positions: usize, device: &Device) -> Self {
        let inv = inv_freq(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv {
                let a = (p as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            cos: Tensor::from_data(TensorData::new(cos, [max_positions, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [max_positions, half]), device),
            max_positions,
        }
    }

    /// The cos and sin tables on the host, `[max_positions, head_dim / 2]` each (the host decode
    /// path rotates with the same values).
    pub fn host_tables(&self) -> (Vec<f32>, Vec<f32>) {
        (
            crate::util::to_vec(self.cos.clone()),
            crate::util::to_vec(self.sin.clone()),
        )
    }

    /// Rotate `x: [batch, heads, seq, head_dim]` for positions `offset..offset + seq`.
    pub fn apply(&self, x: Tensor<4>, offset: usize) -> Tensor<4> {
        let [_, _, seq, hd] = x.dims();
        let half = hd / 2;
        assert!(
            offset + seq <= self.max_positions,
            "position {} is beyond the RoPE table ({} positions)",
            offset + seq,
            self.max_positions
        );
        let cos = self.cos.clone().narrow(0, offset, seq).unsqueeze::<4>();
        let sin = self.sin.clone().narrow(0, offset, seq).unsqueeze::<4>();
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
        let r2 = x2 * cos + x1 * sin;
        Tensor::cat(vec![r1, r2], 3)
    }
}
