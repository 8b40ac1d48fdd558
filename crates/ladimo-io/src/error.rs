//! One error type for everything that can go wrong reading a checkpoint; every variant names the file.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not what it claims to be (truncated, bad header, bad magic...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A specific tensor is wrong (missing, wrong shape, unsupported dtype).
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor { path: PathBuf, tensor: String, msg: String },
    /// The checkpoint is valid but describes something we do not support.
    #[error("{path}: unsupported: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    /// Fetching the model or data failed.
    #[error("fetch {what}: {msg}")]
    Fetch { what: String, msg: String },
}

impl Error {
    /// The file and an IO error, for crates with error types of their own (an error that is not
    /// an IO error becomes one with the same text; the path is then empty where it had none).
    pub fn into_io(self) -> (PathBuf, std::io::Error) {
        match self {
            Error::Io { path, source } => (path, source),
            Error::Format { ref path, .. } | Error::Tensor { ref path, .. } | Error::Unsupported { ref path, .. } => {
                (path.clone(), std::io::Error::other(self.to_string()))
            }
            Error::Fetch { .. } => (PathBuf::new(), std::io::Error::other(self.to_string())),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn format(path: &Path, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn tensor(path: &Path, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
    pub fn unsupported(path: &Path, msg: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}
