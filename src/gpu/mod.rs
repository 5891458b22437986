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

/// The element type of a device buffer: float32, or a 16-bit float stored as its bit pattern
/// (kernels see `gptr<f16>` / `gptr<bf16>`, deepis_device.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// `data` rounded to nearest even in a 16-bit type (the host side of `f16_from_f32` /
/// `bf16_from_f32`); NaN stays NaN.
pub fn to_half_bits(data: &[f32], dtype: DType) -> Vec<u16> {
    match dtype {
        DType::F16 => data.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect(),
        DType::BF16 => data.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect(),
        DType::F32 => panic!("to_half_bits: f32 is not a 16-bit type"),
    }
}

/// The exact f32 value of each 16-bit word.
pub fn from_half_bits(bits: &[u16], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
        DType::BF16 => bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
        DType::F32 => panic!("from_half_bits: f32 is not a 16-bit type"),
    }
}

/// `v` rounded to tf32 (10 mantissa bits, the low 13 bits of the f32 zero) as `cvt.rna.tf32.f32`
/// rounds: to nearest, ties away from zero (half an ulp added to the magnitude's bit pattern, then
/// truncated; a carry into the exponent is the next binade, past the largest tf32 it is infinity).
/// Infinities are kept; a NaN stays a NaN (quieted). The same rule as the emulator's
/// `f32_to_tf32_bits` (kernels/emu/tensor.h), used for the tensor-core weights and the tests.
pub fn round_tf32(v: f32) -> f32 {
    let x = v.to_bits();
    let r = if v.is_nan() {
        (x | 0x0040_0000) & 0xffff_e000
    } else if v.is_infinite() {
        x
    } else {
        x.wrapping_add(0x1000) & 0xffff_e000
    };
    f32::from_bits(r)
}

/// Offsets of arena regions are multiples of this many bytes (cp.async and vector loads need 16).
pub const REGION_ALIGN: usize = 64;

/// The checks every `Device::region` makes: alignment and bounds.
fn check_region(dev: &str, offset: usize, bytes: usize, arena_bytes: usize) -> Result<()> {
    if !offset.is_multiple_of(REGION_ALIGN) || offset + bytes > arena_bytes {
        return Err(crate::error::Error::backend(
            dev,
            format!("region of {bytes} bytes at {offset}: outside the {arena_bytes}-byte arena or not {REGION_ALIGN}-byte aligned"),
        ));
    }
    Ok(())
}

/// A queue of a device. Kernels and graphs run on `Compute`, and so do the synchronous copies
/// (`htod`, `dtoh`, ...). `Upload` and `Download` carry the asynchronous copies between pinned
/// host memory and the device (a GPU's two copy engines), so that they overlap the kernels. Work
/// on two queues is ordered only by an event recorded on one and waited for on the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    Compute,
    Upload,
    Download,
}

/// A device that stores f32, f16 and bf16 buffers and launches the kernels of `kernels/` by name.
/// The f32 calls (`alloc_zeros`, `htod`) make f32 buffers; `dtoh` reads any buffer as f32 (exact).
pub trait Device {
    type Buf;
    /// A recorded sequence of launches, replayed as one ([`Device::capture`]): a CUDA graph on a GPU.
    type Graph;
    fn name(&self) -> String;
    fn alloc_zeros(&self, len: usize) -> Result<Self::Buf>;
    fn htod(&self, data: &[f32]) -> Result<Self::Buf>;
    fn dtoh(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Length in elements.
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn buf_dtype(&self, buf: &Self::Buf) -> DType;
    /// A 16-bit buffer (`dtype` F16 or BF16) holding `bits`.
    fn htod_bits(&self, bits: &[u16], dtype: DType) -> Result<Self::Buf>;
    /// The bit patterns of a 16-bit buffer (an error for an f32 buffer).
    fn dtoh_bits(&self, buf: &Self::Buf) -> Result<Vec<u16>>;
    /// `data` in `dtype`: rounded once on the host (to nearest even), uploaded once; weights are
    /// uploaded this way in the precision the kernels read.
    fn htod_as(&self, data: &[f32], dtype: DType) -> Result<Self::Buf> {
        match dtype {
            DType::F32 => self.htod(data),
            _ => self.htod_bits(&to_half_bits(data, dtype), dtype),
        }
    }
    /// `len` zeros of `dtype`.
    fn alloc_zeros_as(&self, len: usize, dtype: DType) -> Result<Self::Buf> {
        match dtype {
            DType::F32 => self.alloc_zeros(len),
            _ => self.htod_bits(&vec![0; len], dtype),
        }
    }
    /// One zeroed allocation of `bytes` (an f32 buffer) that [`Device::region`] cuts into typed
    /// buffers sharing its memory: a plan's arena, allocated once.
    fn alloc_arena(&self, bytes: usize) -> Result<Self::Buf> {
        self.alloc_zeros(bytes.div_ceil(4))
    }
    /// `len` elements of `dtype` at byte `offset` (a multiple of [`REGION_ALIGN`]) of `arena` (made
    /// by `alloc_arena`), sharing its memory; an error past its end.
    fn region(&self, arena: &Self::Buf, offset: usize, len: usize, dtype: DType) -> Result<Self::Buf>;
    /// Copies `data` into the f32 buffer `dst` of the same length (no allocation).
    fn htod_into(&self, data: &[f32], dst: &Self::Buf) -> Result<()>;
    /// Whether the device has what kernels/conv3d_tc.cu uses: mma.sync m16n8k16 in f16 / bf16,
    /// m16n8k8 in tf32, ldmatrix and cp.async (sm_80 and up; the emulator has them).
    fn has_tensor_cores(&self) -> bool {
        true
    }
    /// Whether the device runs the wgmma kernels of kernels/conv3d_tc.cu (sm_90, whose cubins of
    /// that file are built for sm_90a; the emulator has them).
    fn has_wgmma(&self) -> bool {
        true
    }
    /// Launches `kernel` (its `extern "C"` name) with `args` in the kernel's parameter order.
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[KArg<'_, Self::Buf>]) -> Result<()>;
    /// Blocks the host until the work of every queue is done.
    fn synchronize(&self) -> Result<()>;
    /// Records the launches `body` makes into a graph, to be replayed by [`Device::replay`] with the
    /// same buffers and scalars. Only launches may be recorded: an allocation, a copy or a
    /// synchronisation inside `body` is an error (a CUDA graph would not hold it, or would stall).
    /// The device may run `body` once beforehand as a warm-up (CUDA does: modules load and
    /// shared-memory limits are set outside the capture).
    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Queues every launch of `graph` in order (asynchronously, as `launch`).
    fn replay(&self, graph: &Self::Graph) -> Result<()>;
    /// Free and total device memory in bytes, where the device knows them.
    fn memory_info(&self) -> Option<(usize, usize)> {
        None
    }

    /// Page-locked host memory of f32 values, which `upload` and `download` copy asynchronously.
    type Pinned;
    /// A point in a queue's work ([`Device::record`]), that another queue or the host waits for.
    type Event;
    /// `len` zeros in pinned host memory.
    fn alloc_pinned(&self, len: usize) -> Result<Self::Pinned>;
    fn pinned_len(&self, p: &Self::Pinned) -> usize;
    /// The host's view of `p`, to fill before an upload. No copy may still be reading or writing
    /// it: the host must have waited ([`Device::host_wait`]) for an event recorded after the last
    /// copy of `p` (the emulator fails otherwise; CUDA waits for that copy itself).
    fn pinned_mut<'a>(&self, p: &'a mut Self::Pinned) -> Result<&'a mut [f32]>;
    /// The host's view of `p`, to read after a download, on the same terms as `pinned_mut`.
    fn pinned_ref<'a>(&self, p: &'a Self::Pinned) -> Result<&'a [f32]>;
    /// Queues on [`Queue::Upload`] a copy of `src` into the f32 buffer `dst` of the same length.
    fn upload(&self, src: &mut Self::Pinned, dst: &Self::Buf) -> Result<()>;
    /// Queues on [`Queue::Download`] a copy of the f32 buffer `src` into `dst` of the same length.
    fn download(&self, src: &Self::Buf, dst: &mut Self::Pinned) -> Result<()>;
    /// An event after the work queued on `q` so far.
    fn record(&self, q: Queue) -> Result<Self::Event>;
    /// Work queued on `q` from now on starts after `e`.
    fn wait(&self, q: Queue, e: &Self::Event) -> Result<()>;
    /// Blocks the host until `e` is reached.
    fn host_wait(&self, e: &Self::Event) -> Result<()>;
}

/// A device shared by several plans (one per volume size, say): each call goes to the one device.
impl<T: Device> Device for std::rc::Rc<T> {
    type Buf = T::Buf;
    type Graph = T::Graph;
    fn name(&self) -> String {
        (**self).name()
    }
    fn alloc_zeros(&self, len: usize) -> Result<Self::Buf> {
        (**self).alloc_zeros(len)
    }
    fn htod(&self, data: &[f32]) -> Result<Self::Buf> {
        (**self).htod(data)
    }
    fn dtoh(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        (**self).dtoh(buf)
    }
    fn buf_len(&self, buf: &Self::Buf) -> usize {
        (**self).buf_len(buf)
    }
    fn buf_dtype(&self, buf: &Self::Buf) -> DType {
        (**self).buf_dtype(buf)
    }
    fn htod_bits(&self, bits: &[u16], dtype: DType) -> Result<Self::Buf> {
        (**self).htod_bits(bits, dtype)
    }
    fn dtoh_bits(&self, buf: &Self::Buf) -> Result<Vec<u16>> {
        (**self).dtoh_bits(buf)
    }
    fn htod_as(&self, data: &[f32], dtype: DType) -> Result<Self::Buf> {
        (**self).htod_as(data, dtype)
    }
    fn alloc_zeros_as(&self, len: usize, dtype: DType) -> Result<Self::Buf> {
        (**self).alloc_zeros_as(len, dtype)
    }
    fn alloc_arena(&self, bytes: usize) -> Result<Self::Buf> {
        (**self).alloc_arena(bytes)
    }
    fn region(&self, arena: &Self::Buf, offset: usize, len: usize, dtype: DType) -> Result<Self::Buf> {
        (**self).region(arena, offset, len, dtype)
    }
    fn htod_into(&self, data: &[f32], dst: &Self::Buf) -> Result<()> {
        (**self).htod_into(data, dst)
    }
    fn has_tensor_cores(&self) -> bool {
        (**self).has_tensor_cores()
    }
    fn has_wgmma(&self) -> bool {
        (**self).has_wgmma()
    }
    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[KArg<'_, Self::Buf>]) -> Result<()> {
        (**self).launch(kernel, cfg, args)
    }
    fn synchronize(&self) -> Result<()> {
        (**self).synchronize()
    }
    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph> {
        (**self).capture(body)
    }
    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        (**self).replay(graph)
    }
    fn memory_info(&self) -> Option<(usize, usize)> {
        (**self).memory_info()
    }
    type Pinned = T::Pinned;
    type Event = T::Event;
    fn alloc_pinned(&self, len: usize) -> Result<Self::Pinned> {
        (**self).alloc_pinned(len)
    }
    fn pinned_len(&self, p: &Self::Pinned) -> usize {
        (**self).pinned_len(p)
    }
    fn pinned_mut<'a>(&self, p: &'a mut Self::Pinned) -> Result<&'a mut [f32]> {
        (**self).pinned_mut(p)
    }
    fn pinned_ref<'a>(&self, p: &'a Self::Pinned) -> Result<&'a [f32]> {
        (**self).pinned_ref(p)
    }
    fn upload(&self, src: &mut Self::Pinned, dst: &Self::Buf) -> Result<()> {
        (**self).upload(src, dst)
    }
    fn download(&self, src: &Self::Buf, dst: &mut Self::Pinned) -> Result<()> {
        (**self).download(src, dst)
    }
    fn record(&self, q: Queue) -> Result<Self::Event> {
        (**self).record(q)
    }
    fn wait(&self, q: Queue, e: &Self::Event) -> Result<()> {
        (**self).wait(q, e)
    }
    fn host_wait(&self, e: &Self::Event) -> Result<()> {
        (**self).host_wait(e)
    }
}

pub mod convert;
pub mod cuda;
pub mod emu;
pub mod kernels;
pub mod nvrtc;
pub mod occupancy;
pub mod ops;
pub mod plan;
pub mod tensor_conv;
pub mod train_ops;
