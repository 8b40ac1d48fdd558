//! Mixture-of-Experts blocks that replace a dense SwiGLU FFN, layer by layer.
//!
//! - [`HostFfn`]: a SwiGLU FFN's weights on the host, and [`HostFfn::select_neurons`] to cut an
//!   expert out of it (the same neuron indices of gate, up and down).
//! - [`Policy`] / [`RoutingPolicy`]: which experts run for a token (top-k, top-p, confidence).
//! - [`MoeBlock`]: router + routed experts (+ optional always-on shared experts), implementing
//!   [`ladimo_model::FeedForward`]. Inference dispatch is sparse: the tokens routed to each expert
//!   are gathered, the expert runs once on its group, the weighted results are scatter-added.
//!   Compute is proportional to the experts that run.
//!
//! - [`checkpoint`]: MoE checkpoints on disk (Mixtral naming; Mixtral config when exact) and
//!   [`load_model`], which loads dense and MoE checkpoints alike.
//! - [`block_file`]: one block in a file of its own, the same tensor layout as a checkpoint's
//!   layer (stage 1 keeps its per-layer results this way).
//! - [`export`]: the model in formats other tools run (Mixtral, GraniteMoeShared, a
//!   `trust_remote_code` folder for transformers, GGUF for llama.cpp), exact or refused.
//! - [`PolicyFile`]: one routing policy per layer (TOML), applied to a loaded model.
//! - [`sparsity`]: activation sparsity on dense FFNs (static pruning, CATS, TEAL): the
//!   training-free baselines, calibrated on text and saved in policy files too.
//!
//! The block is backend-agnostic (a burn `Device` decides where it runs).

mod block;
pub mod block_file;
pub mod checkpoint;
mod error;
pub mod export;
mod host;
mod policy;
pub mod policy_file;
pub mod sparsity;

pub use block::{
    Combine, CombineWeights, FEW_TOKENS, MoeBlock, MoeParams, PREFILL_PROBES, RoutingStats, check_predictor_rank,
};
pub use checkpoint::{
    CheckpointError, MoeSection, load_model, moe_block, moe_block_mut, save_moe_checkpoint, write_dense_checkpoint,
};
pub use error::MoeError;
pub use host::HostFfn;
pub use policy::{Policy, RoutingPolicy};
pub use policy_file::{PolicyFile, fingerprint_matches, model_fingerprint};
pub use sparsity::{Method as SparsityMethod, SparseFfn, Sparsity};
