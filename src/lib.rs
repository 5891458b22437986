//! deepis: a GPU compute engine for the DeepIS 3D segmenter of refractive-index tomograms.
pub mod backend;
pub mod config;
pub mod error;
pub mod gpu;
pub mod tensor;

pub use error::{Error, Result};
