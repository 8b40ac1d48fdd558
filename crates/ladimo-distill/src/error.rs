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

/// From `ladimo_io::atomic` and friends: the file and the IO error.
impl From<ladimo_io::Error> for DistillError {
    fn from(e: ladimo_io::Error) -> Self {
        let (path, source) = e.into_io();
        DistillError::Io { path, source }
    }
}

impl DistillError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DistillError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
