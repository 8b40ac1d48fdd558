use std::path::{Path, PathBuf};

/// Everything that can go wrong; each message names the file (or package) and the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A file that is not what it should be (bad R data, bad archive, ...).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    #[error("{}: line {line}: invalid JSON: {msg}", path.display())]
    Json { path: PathBuf, line: usize, msg: String },

    /// An evaluation item whose requests do not fit together (choices, label, order).
    #[error("{}: line {line}: {msg}", path.display())]
    BadItem { path: PathBuf, line: usize, msg: String },

    #[error("{}: line {line}: {msg}", path.display())]
    MissingText { path: PathBuf, line: usize, msg: String },

    #[error("{}: line {line}: not valid UTF-8 (byte {byte} of the file)", path.display())]
    NotUtf8 { path: PathBuf, line: usize, byte: usize },

    #[error("{}: empty input: {msg}", path.display())]
    Empty { path: PathBuf, msg: String },

    #[error("{}: unsupported file type; expected a .txt file or a .jsonl file with {{\"text\": ...}} per line", path.display())]
    Unsupported { path: PathBuf },

    #[error("{}: sha256 is {actual}, expected {expected}", path.display())]
    Checksum {
        path: PathBuf,
        actual: String,
        expected: String,
    },

    /// Getting a package from its registry failed.
    #[error("fetching {package}: {msg}")]
    Fetch { package: String, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}
