//! Choosing where the network runs, below every command that runs it: the backend kinds, how
//! `auto` resolves, and the dispatch of generic work to a concrete backend. Also the one parser of
//! volume sizes the commands share.
use crate::backward::TrainBackend;
use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::gpu::cuda::{cuda_available, CudaDevice};
use crate::gpu::emu::EmuDevice;
use crate::gpu::ops::GpuBackend;
use clap::ValueEnum;

/// Where the network runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The GPU when one is found, otherwise the CPU
    Auto,
    /// The CPU (all cores): the fused inference plan (`deepis::plan`)
    Cpu,
    /// The CPU, unfused reference backend (op by op; for checking)
    CpuRef,
    /// The CUDA kernels emulated on the CPU (slow; for checking the GPU code without a GPU)
    Emu,
    /// The first NVIDIA GPU
    Cuda,
}

/// Parses "A,B,C" (or AxBxC) into three positive sizes: every `--size`-like option.
pub fn parse_size(s: &str) -> std::result::Result<[usize; 3], String> {
    let v: Vec<usize> = s
        .split([',', 'x', 'X'])
        .map(|p| p.trim().parse::<usize>().map_err(|_| format!("`{p}` is not a whole number")))
        .collect::<std::result::Result<_, _>>()?;
    match v[..] {
        [a, b, c] if a > 0 && b > 0 && c > 0 => match crate::limits::product(&[a as u64, b as u64, c as u64]) {
            Some(n) if n <= MAX_VOXELS => Ok([a, b, c]),
            _ => Err(format!("{a} x {b} x {c} is more than 2^40 voxels (4 TiB as float32)")),
        },
        _ => Err(format!("expected three positive sizes like 128,128,64, got `{s}`")),
    }
}

/// The largest volume any `--size`-like option takes: beyond it voxel counts times channels
/// could overflow, and no machine holds it anyway (memory is checked against the budget later).
const MAX_VOXELS: u64 = 1 << 40;

/// Work that needs a concrete backend (every backend also runs the training ops).
pub trait Job {
    type Out;
    fn run<B: TrainBackend>(self, backend: B) -> Result<Self::Out>;
}

/// A backend chosen and opened: the fused CPU plan, one of the op-by-op backends, or a GPU.
pub enum Chosen {
    Plan,
    CpuRef,
    Emu,
    Cuda(CudaDevice),
}

/// Resolves `kind` once (auto: CUDA when a GPU opens, else the CPU plan, saying so on stderr).
pub fn choose(kind: BackendKind) -> Result<Chosen> {
    Ok(match kind {
        BackendKind::Cpu => Chosen::Plan,
        BackendKind::CpuRef => Chosen::CpuRef,
        BackendKind::Emu => Chosen::Emu,
        BackendKind::Cuda => Chosen::Cuda(CudaDevice::new(0)?),
        BackendKind::Auto if !cuda_available() => {
            eprintln!("no GPU found: using the CPU backend");
            Chosen::Plan
        }
        BackendKind::Auto => match CudaDevice::new(0) {
            Ok(dev) => Chosen::Cuda(dev),
            Err(e) => {
                eprintln!("no usable GPU ({e}): using the CPU backend");
                Chosen::Plan
            }
        },
    })
}

/// Runs `job` on an op-by-op backend (the fused plan is not a `Backend`: inference callers handle
/// `Plan`; training runs the CPU reference ops for both CPU kinds).
pub fn with_backend<J: Job>(chosen: Chosen, job: J) -> Result<J::Out> {
    match chosen {
        Chosen::Plan | Chosen::CpuRef => job.run(CpuBackend::new()),
        Chosen::Emu => job.run(GpuBackend::new(EmuDevice::new())),
        Chosen::Cuda(dev) => job.run(GpuBackend::new(dev)),
    }
}

