//! A checkpoint: its config, its (lazily read) weights and its tokenizer, whatever the file format.

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::safetensors_dir::HfWeights;
use crate::tensor::{DType, HostTensor};
use crate::tokenizer::Tokenizer;

/// Name, shape (PyTorch order) and stored dtype of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Where weights come from. Names are Hugging Face names (`model.layers.0.mlp.gate_proj.weight`).
pub trait WeightSource: Send + Sync {
    /// Every tensor the source holds.
    fn infos(&self) -> Vec<TensorInfo>;
    /// Read and convert one tensor to f32.
    fn load(&self, name: &str) -> Result<HostTensor>;
    /// The file a tensor lives in (for error messages).
    fn file_of(&self, name: &str) -> PathBuf;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HuggingFace,
    Gguf,
}

pub struct Checkpoint {
    pub path: PathBuf,
    pub format: Format,
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    tokenizer: Option<Tokenizer>,
    tokenizer_problem: String,
}

impl Checkpoint {
    /// Open a Hugging Face directory or a `.gguf` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            Self::open_hf(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            // A folder that holds a GGUF file instead: say which file to give.
            let ggufs: Vec<String> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(".gguf"))
                        .collect()
                })
                .unwrap_or_default();
            let hint = match ggufs.as_slice() {
                [] => String::new(),
                names => format!(
                    " (a Hugging Face folder needs one; for GGUF give the file: {})",
                    names.join(", ")
                ),
            };
            return Err(Error::format(&config_path, format!("no such file{hint}")));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = ModelConfig::from_hf_json(&text, &config_path)?;
        let weights = HfWeights::open(dir)?;
        let tok_path = dir.join("tokenizer.json");
        let (tokenizer, tokenizer_problem) = if tok_path.exists() {
            (Some(Tokenizer::from_hf_dir(dir)?), String::new())
        } else {
            (None, format!("{}: no tokenizer.json", dir.display()))
        };
        Ok(Self {
            path: dir.to_path_buf(),
            format: Format::HuggingFace,
            config,
            weights: Box::new(weights),
            tokenizer,
            tokenizer_problem,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.model_config()?;
        let (tokenizer, tokenizer_problem) = match Tokenizer::from_gguf(&file) {
            Ok(t) => (Some(t), String::new()),
            Err(e) => (None, e.to_string()),
        };
        Ok(Self {
            path: path.to_path_buf(),
            format: Format::Gguf,
            config,
            weights: Box::new(file.into_weights()),
            tokenizer,
            tokenizer_problem,
        })
    }

    /// The tokenizer, or an error saying why there is none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Format {
            path: self.path.clone(),
            msg: format!("no usable tokenizer: {}", self.tokenizer_problem),
        })
    }

    /// Read a tensor and check that its shape is `expected` (derived from the config).
    pub fn load(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let t = self.weights.load(name)?;
        if t.shape != expected {
            let origin = match self.format {
                Format::HuggingFace => "config.json",
                Format::Gguf => "the GGUF metadata",
            };
            return Err(Error::tensor(
                &self.weights.file_of(name),
                name,
                format!(
                    "shape {:?} disagrees with {origin}, which implies {:?}",
                    t.shape, expected
                ),
            ));
        }
        Ok(t)
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.weights.infos().iter().any(|i| i.name == name)
    }
}
