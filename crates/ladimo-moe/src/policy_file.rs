//! The routing-policy file: one policy per MoE layer (TOML), as the solver writes it and as
//! `generate` / `perplexity` / a converted checkpoint apply it.
//!
//! ```toml
//! model = "3f2a…"          # fingerprint of the MoE model the policies were chosen for
//! note = "solver: 75% of dense FFN parameters"
//! [[layers]]
//! layer = 0
//! policy = { type = "TopK", k = 6 }
//! ```

use std::path::{Path, PathBuf};

use ladimo_model::Transformer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::{moe_block, moe_block_mut};
use crate::{MoeError, Policy, RoutingPolicy};

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
    pub policy: Policy,
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
/// and expert shapes (hex SHA-256, 16 characters). Profiles and policy files carry it so that one
/// made for another model is refused.
pub fn model_fingerprint(model: &Transformer) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&model.config).unwrap_or_default());
    for layer in 0..model.layers.len() {
        if let Some(b) = moe_block(model, layer) {
            h.update((layer as u64).to_le_bytes());
            for e in &b.params.experts {
                h.update((e.intermediate_size() as u64).to_le_bytes());
            }
            for v in ladimo_model::util::to_vec(b.params.router.weight.val()) {
                h.update(v.to_le_bytes());
            }
        }
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
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

    /// Write to a temporary name, then rename.
    pub fn write(&self, path: &Path) -> Result<(), PolicyFileError> {
        let text = toml::to_string_pretty(self).map_err(|e| PolicyFileError::Invalid {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let tmp = path.with_extension("toml.part");
        let io = |source| PolicyFileError::Io {
            path: tmp.clone(),
            source,
        };
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|source| PolicyFileError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Set every MoE layer's policy. Refuses (changing nothing) a file made for another model, one
    /// that names a layer the model lacks or a dense layer, one that misses an MoE layer, and a
    /// policy that does not fit its layer's experts. `path` is for the messages.
    pub fn apply(&self, model: &mut Transformer, path: &Path) -> Result<(), PolicyFileError> {
        let bad = |msg: String| PolicyFileError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        let fp = model_fingerprint(model);
        if self.model != fp {
            return Err(bad(format!("made for model {}, but this model is {fp}", self.model)));
        }
        let n = model.layers.len();
        let moe: Vec<usize> = (0..n).filter(|&l| moe_block(model, l).is_some()).collect();
        for lp in &self.layers {
            if lp.layer >= n {
                return Err(bad(format!("names layer {}, but the model has {n} layers", lp.layer)));
            }
            let Some(b) = moe_block(model, lp.layer) else {
                return Err(bad(format!("names layer {}, which is dense", lp.layer)));
            };
            lp.policy
                .validate(b.num_experts())
                .map_err(|source| PolicyFileError::Policy {
                    path: path.to_path_buf(),
                    layer: lp.layer,
                    source,
                })?;
        }
        let missing: Vec<usize> = moe
            .iter()
            .copied()
            .filter(|l| !self.layers.iter().any(|p| p.layer == *l))
            .collect();
        if !missing.is_empty() {
            return Err(bad(format!("has no policy for MoE layers {missing:?}")));
        }
        for lp in &self.layers {
            let b = moe_block_mut(model, lp.layer).expect("checked above");
            b.set_policy(lp.policy.clone()).expect("validated above");
        }
        Ok(())
    }
}
