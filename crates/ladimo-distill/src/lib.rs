//! LaDiMo stage 1: expert construction and layer-wise distillation.
//!
//! ```text
//! calibration tokens -> capture (teacher FFN inputs x and outputs y per layer, f16 on disk)
//!                    -> per layer: partition neurons -> experts + centroid router -> MoE block
//!                                  -> train (AdamW, MSE to y under the training routing policy)
//!                                  -> layerNNN.moe.safetensors + layerNNN.json
//! ```
//! - [`partition`]: cut an FFN's intermediate neurons into experts (contiguous, random, balanced
//!   k-means on weight rows, co-activation clustering) and pick always-on shared neurons.
//! - [`capture`]: the teacher's per-layer FFN inputs and outputs, bounded memory, on disk.
//! - [`train`]: distil one layer's MoE block; a run covers a range of layers and resumes.
//! - [`run_dir`]: a run folder: the per-layer blocks (ladimo-moe's block file) and reports, what
//!   is finished, summaries, the polish's checkpoint to resume from.
//! - [`sequential`]: the same, layer by layer in order on the partly converted model's own hidden
//!   states (`inputs = "student"`), optionally aiming each block at the teacher's residual stream.
//! - [`finetune`]: an optional end-to-end polish after the layer-wise pass: every block's experts
//!   trained at once to match the teacher's next-token distribution (KL).
//! - [`teacher_topk`]: the teacher's side of the polishes' KL, whole or from its top K next
//!   tokens computed once (and kept in a run folder).
//! - [`predictor`]: the predictor router: a low-rank map fitted in closed form to each expert's
//!   log output norm on the teacher's FFN inputs.
//! - [`thresholded`]: thresholds in the loop: each layer's dense FFN trained, in order on the
//!   student's own hidden states, under the TEAL thresholds it will run with.
//! - [`teal_polish`]: every layer's dense FFN trained at once under its TEAL thresholds to match
//!   the teacher's next-token distribution (KL), from the dense weights or a thresholded run.

pub mod capture;
mod error;
pub mod finetune;
pub mod partition;
pub mod predictor;
pub mod run_dir;
pub mod sequential;
mod stream;
pub mod teacher_topk;
pub mod teal_polish;
pub mod thresholded;
pub mod train;

pub use error::DistillError;
