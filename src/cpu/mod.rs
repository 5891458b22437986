//! The CPU backend: the reference every other backend is checked against, multi-threaded with
//! rayon (the global pool) and fast enough to run the network on a workstation.
//!
//! Storage is a plain `Vec<f32>`; activations are channels-last (N, D0, D1, D2, C).
//! Every op checks its shapes and parameter lengths and returns `Error::Shape`, never panics.
pub mod simd;
pub mod conv;
pub mod ops;

pub use conv::ConvPath;

use crate::backend::{Backend, ConvSpec, DevTensor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The host backend.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    path: ConvPath,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// Uses the global rayon pool and the fastest convolution path of this CPU.
    pub fn new() -> Self {
        CpuBackend { path: ConvPath::detect() }
    }
    /// The portable convolution path only (no run-time SIMD dispatch), for cross-checks.
    pub fn portable() -> Self {
        CpuBackend { path: ConvPath::Portable }
    }
    /// The convolution path in use.
    pub fn conv_path(&self) -> ConvPath {
        self.path
    }
    /// Threads of the rayon pool the ops run on.
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
}

/// The tensor's data has the length its shape says.
pub(crate) fn check_len(op: &str, t: &DevTensor<Vec<f32>>) -> Result<()> {
    if t.data.len() != t.shape.len() {
        return Err(Error::Shape(format!(
            "{op}: tensor {} needs {} values, its storage has {}",
            t.shape,
            t.shape.len(),
            t.data.len()
        )));
    }
    Ok(())
}

pub(crate) fn check_param(op: &str, what: &str, p: &[f32], want: usize) -> Result<()> {
    if p.len() != want {
        return Err(Error::Shape(format!("{op}: {what} has {} values, expected {want}", p.len())));
    }
    Ok(())
}

/// Both tensors valid and of the same shape.
pub(crate) fn check_same(op: &str, a: &DevTensor<Vec<f32>>, b: &DevTensor<Vec<f32>>) -> Result<()> {
    check_len(op, a)?;
    check_len(op, b)?;
    if a.shape != b.shape {
        return Err(Error::Shape(format!("{op}: shapes differ, {} and {}", a.shape, b.shape)));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type S = Vec<f32>;

    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn upload(&self, t: &Tensor) -> Result<DevTensor<Vec<f32>>> {
        let d = DevTensor { shape: t.shape, data: t.data.clone() };
        check_len("upload", &d)?;
        Ok(d)
    }

    fn download(&self, t: &DevTensor<Vec<f32>>) -> Result<Tensor> {
        check_len("download", t)?;
        Ok(Tensor { shape: t.shape, data: t.data.clone() })
    }

    fn upload_param(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn conv3d(&self, x: &DevTensor<Vec<f32>>, w: &Vec<f32>, bias: Option<&Vec<f32>>, spec: &ConvSpec)
        -> Result<DevTensor<Vec<f32>>> {
        check_len("conv3d", x)?;
        let s = x.shape;
        spec.check(s)?;
        check_param("conv3d", "weight", w, spec.weight_len())?;
        if let Some(b) = bias {
            check_param("conv3d", "bias", b, spec.cout)?;
        }
        let (shape, data) = conv::conv3d(&x.data, s, w, bias.map(|b| b.as_slice()), spec, self.path);
        Ok(DevTensor { shape, data })
    }

    fn channel_affine(&self, x: &DevTensor<Vec<f32>>, scale: &Vec<f32>, shift: &Vec<f32>, relu: bool)
        -> Result<DevTensor<Vec<f32>>> {
        check_len("channel_affine", x)?;
        check_param("channel_affine", "scale", scale, x.shape.c)?;
        check_param("channel_affine", "shift", shift, x.shape.c)?;
        if x.shape.c == 0 {
            return Ok(DevTensor { shape: x.shape, data: Vec::new() });
        }
        Ok(DevTensor { shape: x.shape, data: ops::channel_affine(&x.data, scale, shift, relu) })
    }

    fn relu(&self, x: &DevTensor<Vec<f32>>) -> Result<DevTensor<Vec<f32>>> {
        check_len("relu", x)?;
        Ok(DevTensor { shape: x.shape, data: ops::map(&x.data, ops::relu) })
    }

    fn add(&self, a: &DevTensor<Vec<f32>>, b: &DevTensor<Vec<f32>>, relu: bool) -> Result<DevTensor<Vec<f32>>> {
        check_same("add", a, b)?;
        let data = if relu {
            ops::zip(&a.data, &b.data, |p, q| ops::relu(p + q))
        } else {
            ops::zip(&a.data, &b.data, |p, q| p + q)
        };
        Ok(DevTensor { shape: a.shape, data })
    }

    fn maxpool2(&self, x: &DevTensor<Vec<f32>>) -> Result<DevTensor<Vec<f32>>> {
        check_len("maxpool2", x)?;
        let s = x.shape;
        if s.d.iter().any(|&d| d < 2) {
            return Err(Error::Shape(format!("maxpool2: input {s} has a spatial size below 2")));
        }
        let os = s.with_d(s.d.map(|d| d / 2));
        Ok(DevTensor { shape: os, data: ops::maxpool2(&x.data, s, os) })
    }

    fn upsample(&self, x: &DevTensor<Vec<f32>>, size: [usize; 3]) -> Result<DevTensor<Vec<f32>>> {
        check_len("upsample", x)?;
        let s = x.shape;
        if s.d.contains(&0) || size.contains(&0) {
            return Err(Error::Shape(format!("upsample: empty input {s} or target size {size:?}")));
        }
        let os = s.with_d(size);
        Ok(DevTensor { shape: os, data: ops::upsample(&x.data, s, os) })
    }

    fn sigmoid(&self, x: &DevTensor<Vec<f32>>) -> Result<DevTensor<Vec<f32>>> {
        check_len("sigmoid", x)?;
        Ok(DevTensor { shape: x.shape, data: ops::map(&x.data, ops::sigmoid) })
    }

    fn softmax(&self, x: &DevTensor<Vec<f32>>) -> Result<DevTensor<Vec<f32>>> {
        check_len("softmax", x)?;
        if x.shape.c == 0 {
            return Ok(DevTensor { shape: x.shape, data: Vec::new() });
        }
        Ok(DevTensor { shape: x.shape, data: ops::softmax(&x.data, x.shape.c) })
    }
}
