//! One error type for the whole engine: every failure says what is wrong and where.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("weights: {0}")]
    Weights(String),
    #[error("config: {0}")]
    Config(String),
    #[error("shape: {0}")]
    Shape(String),
    #[error("input: {0}")]
    Input(String),
    #[error("backend {backend}: {msg}")]
    Backend { backend: String, msg: String },
    #[error("kernel {kernel}: {msg}")]
    Kernel { kernel: String, msg: String },
    /// A NaN or infinite network output (see `crate::finite`).
    #[error("{0}")]
    NonFinite(String),
    #[error("{0}")]
    Other(String),
    /// `segment --keep-going` finished, but some inputs failed (exit status 3).
    #[error("{failed} input(s) failed ({done} done); they are listed in {}", list.display())]
    InputsFailed { failed: usize, done: usize, list: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The process exit status for this error: 3 when `--keep-going` inputs failed, else 1.
    pub fn exit_status(&self) -> i32 {
        match self {
            Error::InputsFailed { .. } => 3,
            _ => 1,
        }
    }

    /// The message without its kind's prefix ("input: ", "backend nvrtc: "), for a caller that
    /// names the context itself.
    pub fn message(&self) -> String {
        match self {
            Error::Input(m) | Error::Backend { msg: m, .. } => m.clone(),
            e => e.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    pub fn backend(backend: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Backend { backend: backend.into(), msg: msg.to_string() }
    }
    pub fn kernel(kernel: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Kernel { kernel: kernel.into(), msg: msg.to_string() }
    }
}
