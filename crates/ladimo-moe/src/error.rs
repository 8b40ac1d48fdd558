#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MoeError {
    /// Weights whose shapes disagree with each other or with the hidden size.
    #[error("MoE shapes: {0}")]
    Shape(String),
    /// A policy that cannot run on this many experts (e.g. k > N), or nonsense parameters.
    #[error("routing policy {policy}: {msg}")]
    Policy { policy: String, msg: String },
    /// Activation sparsity an MoE block cannot take (a method not built inside experts, a bad
    /// threshold).
    #[error("activation sparsity in an MoE block: {0}")]
    Sparsity(String),
    /// The router produced NaN or infinite logits (bad weights or inputs upstream).
    #[error("router logits are not finite (NaN or inf) for {bad} of {tokens} tokens")]
    NonFiniteRouter { bad: usize, tokens: usize },
}
