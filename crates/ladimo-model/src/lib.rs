//! The LLaMA-family / HyperCLOVA X decoder on burn, backend-agnostic.
//!
//! One plain implementation ([`Transformer`]) serves both families: HyperCLOVA X is a LLaMA block
//! plus muP scalars and Peri-LN, all read from [`ladimo_io::ModelConfig`]. Each layer's
//! feed-forward block is a `Box<dyn` [`FeedForward`]`>`: the dense SwiGLU ([`DenseFfn`]) after
//! loading, and whatever replaces it later (an MoE block) per layer.
//!
//! Also here: the KV cache, sampling for generation ([`generate`]), windowed perplexity
//! ([`perplexity`]) and continuation log-likelihoods for zero-shot tasks ([`loglik`]). The backend
//! is whatever [`burn::tensor::Device`] the caller passes.

mod dtype;
pub mod elementwise;
mod ffn;
pub mod generate;
mod host;
mod llama;
pub mod loglik;
pub mod perplexity;
mod rope;
pub mod timing;
pub mod util;

pub use dtype::{open_rounded, round_weights};
pub use ffn::{DenseFfn, FeedForward, FfnError, KernelFfn, ffn_kernel, transpose_vec as ffn_transpose};
pub use host::{HostDecoder, HostKv};
pub use ladimo_kernel::Dtype;
pub use llama::{Attention, DecoderLayer, KvCache, ModelError, ParamCounts, Transformer, load_dense_ffn};
pub use rope::Rope;
