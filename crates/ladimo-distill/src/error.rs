use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] ladimo_model::ModelError),
    #[error(transparent)]
    Moe(#[from] ladimo_moe::MoeError),
}

impl DistillError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DistillError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
