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
//! The block is backend-agnostic (a burn `Device` decides where it runs).

mod block;
mod error;
mod host;
mod policy;

pub use block::{Combine, CombineWeights, MoeBlock, MoeParams, RoutingStats};
pub use error::MoeError;
pub use host::HostFfn;
pub use policy::{Policy, RoutingPolicy};
