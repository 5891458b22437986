//! The backward ops the autograd tape needs, declared once: the CPU backend implements them in
//! `train::cpu`; the CUDA backend and the kernel emulator implement the same trait with backward
//! kernels, and are checked against the CPU implementation op by op.
//!
//! Conventions (as the forward `Backend`): activations are channels-last (N, D0, D1, D2, C);
//! conv weights are in the engine layout [k0][k1][k2][cin][cout]; per-channel vectors are plain
//! parameter storage (`Backend::S` of length C). Reductions over voxels (weight, bias, gamma and
//! beta gradients, batch statistics) must be deterministic: the same inputs give the same bits on
//! every run (fixed reduction order), which bit-for-bit resumption of training relies on.
use crate::backend::{Backend, ConvSpec, DevTensor};
use crate::error::Result;

/// What training-mode batch norm saves for its backward: per-channel batch mean and
/// 1 / sqrt(biased var + eps), and the biased variance itself (for the running-stat update).
pub struct BnSaved<S> {
    pub mean: S,
    pub invstd: S,
    pub var: S,
}

/// A training-mode batch norm's output and what its backward needs.
pub type BnForward<S> = (DevTensor<S>, BnSaved<S>);
/// (dx, dgamma, dbeta) of a batch norm.
pub type BnBackward<S> = (DevTensor<S>, S, S);

/// Backward ops of every op of the DeepIS network, plus the few helpers the tape needs.
pub trait TrainBackend: Backend {
    /// A parameter-sized vector back to the host (gradients, batch statistics).
    fn download_param(&self, s: &Self::S) -> Result<Vec<f32>>;

    /// A copy of `t` on the device (a gradient that flows into both inputs of an add).
    fn duplicate(&self, t: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
    /// acc += g (same shape).
    fn accumulate(&self, acc: &mut DevTensor<Self::S>, g: &DevTensor<Self::S>) -> Result<()>;
    /// acc += g for parameter vectors of the same length.
    fn accumulate_param(&self, acc: &mut Self::S, g: &Self::S) -> Result<()>;
    /// a * b element-wise (same shape): dropout with a host-made mask, and its backward.
    fn mul(&self, a: &DevTensor<Self::S>, b: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;

    /// Gradient of `conv3d` with respect to its input: `dy` has the conv's output shape, `in_d` is
    /// the input's spatial size (stride 2 maps several input sizes to one output size).
    fn conv3d_backward_input(&self, dy: &DevTensor<Self::S>, w: &Self::S, spec: &ConvSpec, in_d: [usize; 3])
        -> Result<DevTensor<Self::S>>;
    /// Gradient with respect to the weights, in the engine layout [k0][k1][k2][cin][cout]:
    /// dw[t][ci][co] = sum over n and output voxels o of x[n, o * stride + t - pad][ci] * dy[n, o][co].
    fn conv3d_backward_weight(&self, x: &DevTensor<Self::S>, dy: &DevTensor<Self::S>, spec: &ConvSpec) -> Result<Self::S>;
    /// Gradient with respect to the bias: the sum of `dy` over every voxel, per channel.
    fn conv3d_backward_bias(&self, dy: &DevTensor<Self::S>) -> Result<Self::S>;

    /// Training-mode batch norm: normalises with the batch mean and biased variance over
    /// (N, D0, D1, D2), y = (x - mean) * invstd * gamma + beta.
    fn batch_norm_train(&self, x: &DevTensor<Self::S>, gamma: &Self::S, beta: &Self::S, eps: f64)
        -> Result<BnForward<Self::S>>;
    /// Backward of `batch_norm_train`: (dx, dgamma, dbeta) with
    /// xhat = (x - mean) * invstd, dbeta = sum dy, dgamma = sum dy * xhat,
    /// dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M), M = N * voxels.
    fn batch_norm_backward(&self, dy: &DevTensor<Self::S>, x: &DevTensor<Self::S>, gamma: &Self::S, saved: &BnSaved<Self::S>)
        -> Result<BnBackward<Self::S>>;

    /// dx = dy where y > 0, else 0 (PyTorch's threshold_backward on the output).
    fn relu_backward(&self, dy: &DevTensor<Self::S>, y: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
    /// Routes each output gradient to the first maximum of its 2x2x2 window (PyTorch's scan
    /// order, NaN counts as maximum); voxels cut off by flooring odd sizes get 0.
    fn maxpool2_backward(&self, dy: &DevTensor<Self::S>, x: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
    /// Adjoint of trilinear up-sampling (align_corners=True) from `in_d` to dy's size.
    fn upsample_backward(&self, dy: &DevTensor<Self::S>, in_d: [usize; 3]) -> Result<DevTensor<Self::S>>;
    /// dx = dy * y * (1 - y).
    fn sigmoid_backward(&self, dy: &DevTensor<Self::S>, y: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
    /// Softmax over channels: dx = y * (dy - sum_c dy * y).
    fn softmax_backward(&self, dy: &DevTensor<Self::S>, y: &DevTensor<Self::S>) -> Result<DevTensor<Self::S>>;
}
