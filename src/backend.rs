//! The op API: every op the network needs, declared once; the CPU, emulated and CUDA backends
//! implement it (the pattern of candle's backend trait). Activations are channels-last.
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// Geometry of a 3D convolution. Weights are laid out [k0][k1][k2][cin][cout] (see `conv_weight_layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub k: [usize; 3],
    pub stride: [usize; 3],
    pub pad: [usize; 3],
}

impl ConvSpec {
    /// Output spatial size, as PyTorch computes it.
    pub fn out_dims(&self, d: [usize; 3]) -> [usize; 3] {
        std::array::from_fn(|i| (d[i] + 2 * self.pad[i] - self.k[i]) / self.stride[i] + 1)
    }
    /// The output of this conv on input `x` (n volumes).
    pub fn out_shape(&self, x: Shape) -> Shape {
        Shape::new(x.n, self.out_dims(x.d), self.cout)
    }
    /// `out_shape(x)`, or why this conv cannot run on `x` (every backend's check).
    pub fn check(&self, x: Shape) -> Result<Shape> {
        if x.c != self.cin {
            return Err(Error::Shape(format!("conv3d: input {x} has {} channels, the conv takes {}", x.c, self.cin)));
        }
        if self.cin == 0 || self.cout == 0 || (0..3).any(|a| self.k[a] == 0 || self.stride[a] == 0) {
            return Err(Error::Shape(format!("conv3d: zero channels, kernel size or stride in {self:?}")));
        }
        if (0..3).any(|a| x.d[a] + 2 * self.pad[a] < self.k[a]) {
            return Err(Error::Shape(format!("conv3d: input {x} padded by {:?} is smaller than the kernel {:?}", self.pad, self.k)));
        }
        Ok(self.out_shape(x))
    }
    pub fn weight_len(&self) -> usize {
        self.k[0] * self.k[1] * self.k[2] * self.cin * self.cout
    }
    /// Multiply-adds x 2 for one output shape.
    pub fn flops(&self, out: Shape) -> f64 {
        2.0 * (out.n * out.voxels()) as f64 * (self.weight_len()) as f64
    }
}

/// From the PyTorch layout [cout][cin][k0][k1][k2] to the engine's [k0][k1][k2][cin][cout].
pub fn conv_weight_layout(spec: &ConvSpec, torch: &[f32]) -> Vec<f32> {
    permute_conv_weight(spec, torch, true)
}

/// From the engine layout back to PyTorch's (gradients, checkpoints).
pub fn conv_weight_to_torch(spec: &ConvSpec, engine: &[f32]) -> Vec<f32> {
    permute_conv_weight(spec, engine, false)
}

fn permute_conv_weight(spec: &ConvSpec, src: &[f32], to_engine: bool) -> Vec<f32> {
    let kv = spec.k[0] * spec.k[1] * spec.k[2];
    let (ci, co) = (spec.cin, spec.cout);
    let mut out = vec![0.0f32; src.len()];
    for o in 0..co {
        for i in 0..ci {
            for t in 0..kv {
                let (torch, engine) = ((o * ci + i) * kv + t, (t * ci + i) * co + o);
                if to_engine {
                    out[engine] = src[torch];
                } else {
                    out[torch] = src[engine];
                }
            }
        }
    }
    out
}

/// A tensor living on a backend: its shape and the backend's storage.
pub struct DevTensor<S> {
    pub shape: Shape,
    pub data: S,
}

/// Every forward op of the network. Implementations must match the CPU backend to float32 rounding.
pub trait Backend {
    /// Storage of `len` float32 values on this backend.
    type S;

    /// A short name ("cpu", "emu", "cuda:0 NVIDIA H100 ...").
    fn name(&self) -> String;

    fn upload(&self, t: &Tensor) -> Result<DevTensor<Self::S>>;
    fn download(&self, t: &DevTensor<Self::S>) -> Result<Tensor>;
    /// A parameter vector (conv weights in the engine layout, biases, per-channel scales).
    fn upload_param(&self, data: &[f32]) -> Result<Self::S>;

    /// 3D convolution with zero padding; `w` in [k0][k1][k2][cin][cout] layout; optional bias.
    fn conv3d(&self, x: &DevTensor<Self::S>, w: &Self::S, bias: Option<&Self::S>, spec: &ConvSpec)
        -> Result<DevTensor<Self::S>>;
    /// y = x * scale[c] + shift[c], then ReLU if `relu` (eval-mode batch norm, input scaling).
    fn channel_affine(&self, x: &DevTensor<Self::S>, scale: &Self::S, shift: &Self::S, relu: bool)
        -> Result<DevTensor<Self::S>>;
    fn relu(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
    /// a + b (same shape), then ReLU if `relu`.
    fn add(&self, a: &DevTensor<Self::S>, b: &DevTensor<Self::S>, relu: bool) -> Result<DevTensor<Self::S>>;
    /// 2x2x2 max-pool, stride 2, floor of odd sizes.
    fn maxpool2(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
    /// Trilinear up-sampling to `size` with align_corners=True.
    fn upsample(&self, x: &DevTensor<Self::S>, size: [usize; 3]) -> Result<DevTensor<Self::S>>;
    fn sigmoid(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
    /// Softmax over channels.
    fn softmax(&self, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
}
