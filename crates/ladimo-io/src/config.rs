//! The model hyperparameters, read from Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Which decoder family. Both share one implementation; HyperCLOVA X adds muP scalars and Peri-LN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM`.
    Llama,
    /// `HyperCLOVAXForCausalLM` (`model_type` `hyperclovax`).
    HyperClovaX,
}

/// Rotary-embedding frequency scaling (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency divided by `factor`).
    Linear { factor: f64 },
    /// LLaMA 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// One divisor per frequency (GGUF `rope_freqs.weight`).
    Factors(Vec<f64>),
}

/// Everything the transformer needs to know about the model's shape and arithmetic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// muP: the embeddings are multiplied by this (1 for LLaMA).
    pub embedding_multiplier: f64,
    /// muP: the attention score scale (1/sqrt(head_dim) for LLaMA).
    pub attention_multiplier: f64,
    /// muP: each sub-layer's output is multiplied by this before the residual add (1 for LLaMA).
    pub residual_multiplier: f64,
    /// muP: the logits are multiplied by this (1 for LLaMA).
    pub logits_scaling: f64,
    /// Peri-LN: an extra RMSNorm on each sub-layer's output before the residual add.
    pub use_post_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::format(path, format!("missing or non-integer field `{key}`")))
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json` (already read into `text`; `path` is for errors).
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let archs: Vec<String> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let mut model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        // ladimo's MoE exports: Mixtral (LLaMA attention), or our own format whose `ladimo`
        // section names the dense architecture it came from. The MoE part is read by ladimo-moe.
        let ladimo = v.get("ladimo");
        let mut archs = archs;
        if let Some(base) = ladimo.and_then(|l| l.get("base_architecture")).and_then(Value::as_str) {
            archs = vec![base.to_string()];
            model_type = "";
        } else if archs.iter().any(|a| a == "MixtralForCausalLM") || model_type == "mixtral" {
            archs = vec!["LlamaForCausalLM".into()];
        }
        let architecture = if archs.iter().any(|a| a == "HyperCLOVAXForCausalLM") || model_type == "hyperclovax" {
            Architecture::HyperClovaX
        } else if archs.iter().any(|a| a == "LlamaForCausalLM") || model_type == "llama" {
            Architecture::Llama
        } else {
            return Err(Error::unsupported(
                path,
                format!(
                    "architecture {archs:?} (model_type `{model_type}`); supported: LlamaForCausalLM, HyperCLOVAXForCausalLM"
                ),
            ));
        };
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(Error::unsupported(
                path,
                format!("hidden_act `{act}` (supported: silu)"),
            ));
        }
        let hidden_size = get_usize(&v, "hidden_size", path)?;
        let num_heads = get_usize(&v, "num_attention_heads", path)?;
        let num_kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(Error::format(
                path,
                format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"),
            ));
        }
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(Error::format(
                        path,
                        "hidden_size is not a multiple of num_attention_heads and no head_dim is given",
                    ));
                }
                hidden_size / num_heads
            }
        };
        // transformers 5 writes `rope_parameters` ({rope_type, rope_theta, ...}); 4.x writes
        // `rope_theta` and `rope_scaling` at the top level. Accept both.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_scaling = match v.get("rope_scaling").filter(|r| !r.is_null()).or(rope_params) {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let ty = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let factor = opt_f64(rs, "factor").unwrap_or(1.0);
                match ty {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear { factor }),
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor: opt_f64(rs, "low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: opt_f64(rs, "high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: opt_f64(rs, "original_max_position_embeddings")
                            .unwrap_or(8192.0),
                    }),
                    other => {
                        return Err(Error::unsupported(
                            path,
                            format!("rope_scaling type `{other}` (supported: linear, llama3)"),
                        ));
                    }
                }
            }
        };
        let hcx = architecture == Architecture::HyperClovaX;
        let mup = |key: &str| if hcx { opt_f64(&v, key) } else { None };
        Ok(ModelConfig {
            architecture,
            vocab_size: get_usize(&v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: match ladimo
                .and_then(|l| l.get("dense_intermediate_size"))
                .and_then(Value::as_u64)
            {
                Some(n) => n as usize,
                None => get_usize(&v, "intermediate_size", path)?,
            },
            num_layers: get_usize(&v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(&v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta: opt_f64(&v, "rope_theta")
                .or_else(|| rope_params.and_then(|p| opt_f64(p, "rope_theta")))
                .unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(2048) as usize,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            attention_bias: v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            embedding_multiplier: mup("embedding_multiplier").unwrap_or(1.0),
            attention_multiplier: mup("attention_multiplier").unwrap_or(1.0 / (head_dim as f64).sqrt()),
            residual_multiplier: mup("residual_multiplier").unwrap_or(1.0),
            logits_scaling: mup("logits_scaling").unwrap_or(1.0),
            // transformers' HyperCLOVAXConfig defaults use_post_norm to true.
            use_post_norm: hcx && v.get("use_post_norm").and_then(Value::as_bool).unwrap_or(true),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
        })
    }

    /// A Hugging Face `config.json` (transformers 4 layout, which transformers 5 also reads) that
    /// [`ModelConfig::from_hf_json`] reads back to `self`. For checkpoints that came from GGUF.
    pub fn to_hf_json(&self) -> std::result::Result<Value, String> {
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => serde_json::json!({"rope_type": "linear", "factor": factor}),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            Some(RopeScaling::Factors(_)) => {
                return Err("per-frequency RoPE factors (GGUF rope_freqs) have no config.json form".into());
            }
        };
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::HyperClovaX => ("HyperCLOVAXForCausalLM", "hyperclovax"),
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.into(),
            },
            "torch_dtype": "float32",
            "dtype": "float32",
        });
        if self.architecture == Architecture::HyperClovaX {
            v["embedding_multiplier"] = self.embedding_multiplier.into();
            v["attention_multiplier"] = self.attention_multiplier.into();
            v["residual_multiplier"] = self.residual_multiplier.into();
            v["logits_scaling"] = self.logits_scaling.into();
            v["use_post_norm"] = self.use_post_norm.into();
        }
        Ok(v)
    }

    /// Parameters of one layer's attention block (projections and, with bias, their biases).
    pub fn attention_params(&self) -> usize {
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let w = self.hidden_size * (q + 2 * kv) + q * self.hidden_size;
        let b = if self.attention_bias {
            q + 2 * kv + self.hidden_size
        } else {
            0
        };
        w + b
    }

    /// Parameters of one layer's dense SwiGLU FFN.
    pub fn ffn_params(&self) -> usize {
        let w = 3 * self.hidden_size * self.intermediate_size;
        let b = if self.mlp_bias {
            2 * self.intermediate_size + self.hidden_size
        } else {
            0
        };
        w + b
    }

    /// Parameters of one layer's norms.
    pub fn norm_params(&self) -> usize {
        self.hidden_size * if self.use_post_norm { 4 } else { 2 }
    }

    /// Embedding parameters, counting the output head separately when it is not tied.
    pub fn embedding_params(&self) -> usize {
        let e = self.vocab_size * self.hidden_size;
        if self.tie_word_embeddings { e } else { 2 * e }
    }

    pub fn total_params(&self) -> usize {
        self.embedding_params()
            + self.num_layers * (self.attention_params() + self.ffn_params() + self.norm_params())
            + self.hidden_size
    }
}
