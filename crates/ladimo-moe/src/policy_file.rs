//! The policy file: per layer, the routing policy of an MoE layer (with, optionally, TEAL
//! thresholds inside its experts) or the activation sparsity of a dense one (TOML), as
//! `ladimo solve` / `ladimo sparsify` write it and as `generate` / `perplexity` / `eval` / a
//! converted checkpoint apply it.
//!
//! ```toml
//! model = "3f2a…"          # fingerprint of the model the policies were chosen for
//! note = "solver: 75% of dense FFN parameters"
//! [[layers]]
//! layer = 0
//! policy = { type = "TopK", k = 6 }
//! [[layers]]
//! layer = 1                # an MoE layer: top-2, and TEAL inside the experts that run
//! policy = { type = "TopK", k = 2 }
//! sparsity = { type = "Teal", x = 0.02, h = 0.0031 }
//! [[layers]]
//! layer = 2                # a dense layer: TEAL thresholds (see `sparsity`)
//! sparsity = { type = "Teal", x = 0.031, h = 0.0042 }
//! ```

use std::path::{Path, PathBuf};

use ladimo_model::Transformer;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{moe_block, moe_block_mut};
use crate::sparsity::{SparseFfn, Sparsity, dense_ffn, set_sparsity};
use crate::{MoeBlock, MoeError, Policy, RoutingPolicy};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// [`model_fingerprint`] of the model these policies were chosen for.
    pub model: String,
    /// Free text: where the policies came from.
    #[serde(default)]
    pub note: String,
    pub layers: Vec<LayerPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerPolicy {
    pub layer: usize,
    /// The routing policy: every MoE layer has one, a dense layer none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Activation sparsity of a dense layer, or TEAL inside an MoE layer's experts (see
    /// [`crate::MoeBlock`]); none: the layer runs without thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<Sparsity>,
}

impl std::fmt::Display for LayerPolicy {
    /// The layer's routing policy and sparsity, or `dense`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.policy, &self.sparsity) {
            (Some(p), Some(s)) => write!(f, "{p}, {s}"),
            (Some(p), None) => write!(f, "{p}"),
            (None, Some(s)) => write!(f, "{s}"),
            (None, None) => write!(f, "dense"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("{path}: layer {layer}: {source}")]
    Policy {
        path: PathBuf,
        layer: usize,
        #[source]
        source: MoeError,
    },
}

/// Identifies an MoE model by what routing depends on: the config, and each MoE layer's router
/// (its weights rounded to f16) and expert shapes (hex SHA-256, 16 characters). Profiles and
/// policy files carry it so that one made for another model is refused. The rounding makes the
/// model loaded with f16 weights (`--dtype f16`, which rounds the routers as it reads them) the
/// same model as in f32: rounding to f16 twice is rounding once.
pub fn model_fingerprint(model: &Transformer) -> String {
    fingerprint_with(model, |v| ladimo_model::Dtype::F16.round(v))
}

/// Whether `fp` (from a profile or policy file) names `model`: [`model_fingerprint`], or the
/// exact-router fingerprint that files written before session 31 carry.
pub fn fingerprint_matches(model: &Transformer, fp: &str) -> bool {
    fp == model_fingerprint(model) || fp == fingerprint_with(model, |v| v)
}

fn fingerprint_with(model: &Transformer, round: impl Fn(f32) -> f32) -> String {
    let mut h = ladimo_io::hash::Hasher::new();
    h.update(serde_json::to_vec(&model.config).unwrap_or_default());
    for layer in 0..model.layers.len() {
        if let Some(b) = moe_block(model, layer) {
            h.update((layer as u64).to_le_bytes());
            for e in &b.params.experts {
                h.update((e.intermediate_size() as u64).to_le_bytes());
            }
            for v in ladimo_model::util::to_vec(b.params.router.weight.val()) {
                h.update(round(v).to_le_bytes());
            }
        }
    }
    h.short_hex()
}

impl PolicyFile {
    pub fn read(path: &Path) -> Result<Self, PolicyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| PolicyFileError::Invalid {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Write atomically (`ladimo_io::atomic`).
    pub fn write(&self, path: &Path) -> Result<(), PolicyFileError> {
        let text = toml::to_string_pretty(self).map_err(|e| PolicyFileError::Invalid {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        ladimo_io::atomic::write_atomic(path, text.as_bytes()).map_err(|e| {
            let (path, source) = e.into_io();
            PolicyFileError::Io { path, source }
        })
    }

    /// Set every MoE layer's routing policy and thresholds (none when the file gives none) and
    /// every named dense layer's sparsity. Refuses (changing nothing) a file made for another
    /// model, one that names a layer the model lacks or twice, a routing policy for a dense layer,
    /// one that misses an MoE layer's policy, and a policy or sparsity that does not fit its layer
    /// (inside MoE experts only TEAL runs). `path` is for the messages.
    pub fn apply(&self, model: &mut Transformer, path: &Path) -> Result<(), PolicyFileError> {
        let bad = |msg: String| PolicyFileError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        if !fingerprint_matches(model, &self.model) {
            let fp = model_fingerprint(model);
            return Err(bad(format!("made for model {}, but this model is {fp}", self.model)));
        }
        let n = model.layers.len();
        let moe: Vec<usize> = (0..n).filter(|&l| moe_block(model, l).is_some()).collect();
        let mut seen = vec![false; n];
        for lp in &self.layers {
            if lp.layer >= n {
                return Err(bad(format!("names layer {}, but the model has {n} layers", lp.layer)));
            }
            if std::mem::replace(&mut seen[lp.layer], true) {
                return Err(bad(format!("names layer {} twice", lp.layer)));
            }
            match (moe_block(model, lp.layer), &lp.policy, &lp.sparsity) {
                (Some(b), Some(p), s) => {
                    let policy_err = |source| PolicyFileError::Policy {
                        path: path.to_path_buf(),
                        layer: lp.layer,
                        source,
                    };
                    p.validate(b.num_experts()).map_err(policy_err)?;
                    if let Some(s) = s {
                        MoeBlock::check_sparsity(s).map_err(policy_err)?;
                    }
                }
                (Some(_), None, _) => {
                    return Err(bad(format!(
                        "layer {} is an MoE layer but has no routing policy",
                        lp.layer
                    )));
                }
                (None, Some(_), _) => {
                    return Err(bad(format!(
                        "names a routing policy for layer {}, which is dense",
                        lp.layer
                    )));
                }
                (None, None, None) => {}
                (None, None, Some(s)) => {
                    let Some(d) = dense_ffn(model, lp.layer) else {
                        return Err(bad(format!(
                            "layer {} is neither an MoE nor a dense SwiGLU FFN",
                            lp.layer
                        )));
                    };
                    SparseFfn::new(d, s.clone()).map_err(|msg| bad(format!("layer {}: {msg}", lp.layer)))?;
                }
            }
        }
        let missing: Vec<usize> = moe.iter().copied().filter(|&l| !seen[l]).collect();
        if !missing.is_empty() {
            return Err(bad(format!("has no policy for MoE layers {missing:?}")));
        }
        for lp in &self.layers {
            if let Some(p) = &lp.policy {
                let b = moe_block_mut(model, lp.layer).expect("checked above");
                b.set_policy(p.clone()).expect("validated above");
                b.set_sparsity(lp.sparsity.clone()).expect("validated above");
            } else if dense_ffn(model, lp.layer).is_some() {
                set_sparsity(model, lp.layer, lp.sparsity.clone()).expect("validated above");
            }
        }
        Ok(())
    }
}
