//! GPU devices: the launch layer shared by the CUDA device and the kernel emulator.
//! Ops compute their grid, block, shared-memory size and argument list once (in `ops`),
//! then `Device::launch` runs them on a real GPU (cudarc) or on the host emulator.
use crate::error::Result;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shmem: u32,
}

impl LaunchCfg {
    /// A 1D launch covering `n` threads with `block` threads per block.
    pub fn linear(n: usize, block: u32) -> Self {
        let g = (n as u64).div_ceil(block as u64).max(1) as u32;
        LaunchCfg { grid: [g, 1, 1], block: [block, 1, 1], shmem: 0 }
    }
}

/// One kernel argument: a device buffer or a scalar. Kernels take `gptr<T>`, `int` and `float` only.
pub enum KArg<'a, B> {
    Buf(&'a B),
    I32(i32),
    F32(f32),
}

/// A device that stores float32 buffers and launches the kernels of `kernels/` by name.
pub trait Device {
    type Buf;
    fn name(&self) -> String;
    fn alloc_zeros(&self, len: usize) -> Result<Self::Buf>;
    fn htod(&self, data: &[f32]) -> Result<Self::Buf>;
    fn dtoh(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// Launches `kernel` (its `extern "C"` name) with `args` in the kernel's parameter order.
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[KArg<'_, Self::Buf>]) -> Result<()>;
    fn synchronize(&self) -> Result<()>;
}

pub mod cuda;
pub mod emu;
pub mod kernels;
pub mod nvrtc;
pub mod ops;
pub mod train_ops;
