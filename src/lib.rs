//! deepis: a GPU compute engine for the DeepIS 3D segmenter of refractive-index tomograms.
pub mod analysis;
pub mod backend;
pub mod batch;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod demo;
pub mod error;
pub mod finite;
pub mod gpu;
pub mod import;
pub mod io;
pub mod limits;
pub mod model;
pub mod ome_tiff;
pub mod plan;
pub mod plot;
pub mod rng;
pub mod segment;
pub mod sidecar;
pub mod synth;
pub mod tcf;
pub mod tensor;
pub mod train;
pub mod voxel;
pub mod weights;

pub use error::{Error, Result};
