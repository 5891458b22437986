//! The real GPU: a `Device` on cudarc. At creation every kernel source is compiled by NVRTC
//! straight to cubin for the device's compute capability (so no PTX JIT and no driver-version
//! mismatch) or taken from the on-disk cubin cache (`nvrtc::cache`), loaded as modules, and each
//! kernel's function looked up once by name. Work is queued on a stream of its own rather than
//! the legacy default stream, which synchronises with every other stream of the context.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUfunction_attribute_enum, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};
use crate::gpu::nvrtc::cache::CubinCache;
use crate::gpu::{from_half_bits, kernels, nvrtc, DType, Device, KArg, LaunchCfg, Queue};

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_DYN_SMEM: u32 = 48 * 1024;

/// Whether a CUDA driver is installed and reports at least one device. Never panics.
pub fn cuda_available() -> bool {
    // SAFETY: only dlopens the candidate names of libcuda; cudarc panics on use without it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    matches!(CudaContext::device_count(), Ok(n) if n > 0)
}

/// A device buffer: f32, or 16-bit words of an f16 / bf16 tensor, or `len` elements of `dtype` at
/// device address `ptr` inside an arena (`Device::alloc_arena`, `Device::region`), which it keeps alive.
pub enum CudaBuf {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>, DType),
    Region { arena: Arc<CudaSlice<u8>>, ptr: u64, len: usize, dtype: DType },
}

/// Page-locked host memory, and an event after the last copy that read or wrote it.
pub struct CudaPinned {
    host: PinnedHostSlice<f32>,
    last: Option<CudaEvent>,
}

impl CudaPinned {
    /// Waits for the last copy of this memory (so that the host may touch it).
    fn settle(&self) -> Result<()> {
        match &self.last {
            Some(e) => e.synchronize().map_err(|e| drv("waiting for a copy of pinned memory", e)),
            None => Ok(()),
        }
    }
    /// The host's view, once no copy is in flight.
    fn slice(&self) -> Result<&[f32]> {
        self.settle()?;
        self.host.as_slice().map_err(|e| drv("pinned memory", e))
    }
}

impl Drop for CudaPinned {
    /// The memory is freed only after the copy that uses it (an error run may leave one in flight).
    fn drop(&mut self) {
        let _ = self.settle();
    }
}

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    /// Kernels, graphs and the synchronous copies.
    stream: Arc<CudaStream>,
    /// The asynchronous copies to and from pinned memory, one stream per direction.
    upload: Arc<CudaStream>,
    download: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    funcs: HashMap<String, CudaFunction>,
    /// The dynamic shared memory each kernel has been allowed (set once, not at every launch).
    smem_set: Mutex<HashMap<String, u32>>,
    name: String,
    arch: String,
}

fn drv(what: &str, e: impl std::fmt::Display) -> Error {
    Error::backend("cuda", format!("{what}: {e}"))
}

impl CudaDevice {
    /// Opens GPU `ordinal` and compiles and loads every kernel for it.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        // SAFETY: only dlopens the candidate names of libcuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::backend("cuda", "no GPU: libcuda (the NVIDIA driver) is not installed"));
        }
        let count = CudaContext::device_count().map_err(|e| drv("cuInit / device count", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::backend("cuda", format!("no GPU {ordinal}: {count} device(s) found")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| drv("context", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| drv("compute capability", e))?;
        let arch = format!("sm_{major}{minor}");
        let dev_name = ctx.name().map_err(|e| drv("device name", e))?;
        // One stream carries every allocation, copy, launch and free of this device, so its order
        // alone keeps them correct: cudarc's per-buffer event tracking (for buffers shared between
        // streams) would only add an event record per kernel argument.
        // SAFETY: no buffer of this context exists yet, and all later ones live on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| drv("stream", e))?;
        let upload = ctx.new_stream().map_err(|e| drv("stream", e))?;
        let download = ctx.new_stream().map_err(|e| drv("stream", e))?;
        let cache = CubinCache::from_env();
        let (built, stats) = nvrtc::build_all(&arch, &cache)?;
        for w in &stats.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("{}", stats.summary(&cache, &arch));
        let name = format!("cuda:{ordinal} {dev_name} ({arch})");
        let mut dev = CudaDevice { ctx, stream, upload, download, _modules: Vec::new(), funcs: HashMap::new(), smem_set: Mutex::default(), name, arch };
        for nvrtc::Compiled { file, cubin, .. } in built {
            dev.load(&file, cubin, &kernels::kernels_of(&file).collect::<Vec<_>>())?;
        }
        Ok(dev)
    }

    /// Copies `dst.len()` elements at device address `ptr` (inside a live arena region) to the host.
    fn region_dtoh<T>(&self, ptr: u64, dst: &mut [T]) -> Result<()> {
        // SAFETY: the caller's region holds `dst.len()` elements of T at `ptr` (checked by
        // `region`); the copy is complete when `synchronize` returns, while `dst` is borrowed.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, ptr, self.stream.cu_stream()) }.map_err(|e| drv("copy to host", e))?;
        self.synchronize()
    }

    /// The stream of `q`.
    fn queue(&self, q: Queue) -> &Arc<CudaStream> {
        match q {
            Queue::Compute => &self.stream,
            Queue::Upload => &self.upload,
            Queue::Download => &self.download,
        }
    }

    /// The device address of an f32 buffer of `len` values, for a copy `what`.
    fn f32_ptr(&self, b: &CudaBuf, len: usize, what: &str) -> Result<u64> {
        if self.buf_dtype(b) != DType::F32 || self.buf_len(b) != len {
            return Err(Error::backend("cuda", format!("{what}: {len} f32 values against a buffer of {} {} values", self.buf_len(b), self.buf_dtype(b).name())));
        }
        match b {
            CudaBuf::F32(s) => Ok(s.device_ptr(&self.stream).0),
            CudaBuf::Region { ptr, .. } => Ok(*ptr),
            CudaBuf::Half(..) => Err(Error::backend("cuda", format!("{what}: not an f32 buffer"))),
        }
    }

    /// Loads a cubin and looks up its `kernels`.
    fn load(&mut self, file: &str, cubin: Vec<u8>, kernels: &[&str]) -> Result<()> {
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| Error::kernel(file, format!("loading the {} cubin: {e}", self.arch)))?;
        for &kernel in kernels {
            let f = module.load_function(kernel).map_err(|e| Error::kernel(kernel, format!("lookup: {e}")))?;
            self.funcs.insert(kernel.to_string(), f);
        }
        self._modules.push(module);
        Ok(())
    }

    /// Lets `f` use `shmem` bytes of dynamic shared memory (past the default 48 KB, the kernel must
    /// opt in); set once per kernel and size, so that launches, and a graph capture, make no call.
    fn allow_smem(&self, kernel: &str, f: &CudaFunction, shmem: u32) -> Result<()> {
        let mut set = self.smem_set.lock().unwrap_or_else(|p| p.into_inner());
        if shmem <= DEFAULT_DYN_SMEM || set.get(kernel).is_some_and(|&s| s >= shmem) {
            return Ok(());
        }
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shmem as i32)
            .map_err(|e| Error::kernel(kernel, format!("{shmem} bytes of dynamic shared memory: {e}")))?;
        set.insert(kernel.to_string(), shmem);
        Ok(())
    }

    /// Compiles and loads one more source (a test kernel of kernels/testing/) with its `kernels`.
    pub fn load_source(&mut self, file: &str, src: &str, kernels: &[&str]) -> Result<()> {
        let compiled = nvrtc::compile_cubin(file, src, nvrtc::arch_for(src, &self.arch))?;
        self.load(file, compiled.cubin, kernels)
    }
}

impl Device for CudaDevice {
    type Buf = CudaBuf;
    type Graph = CudaGraph;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn alloc_zeros(&self, len: usize) -> Result<Self::Buf> {
        if len == 0 {
            return self.stream.null::<f32>().map(CudaBuf::F32).map_err(|e| drv("alloc", e));
        }
        self.stream.alloc_zeros::<f32>(len).map(CudaBuf::F32).map_err(|e| drv("alloc", e))
    }

    fn alloc_zeros_as(&self, len: usize, dtype: DType) -> Result<Self::Buf> {
        match dtype {
            DType::F32 => self.alloc_zeros(len),
            _ if len == 0 => self.htod_bits(&[], dtype),
            _ => self.stream.alloc_zeros::<u16>(len).map(|s| CudaBuf::Half(s, dtype)).map_err(|e| drv("alloc", e)),
        }
    }

    fn has_tensor_cores(&self) -> bool {
        self.arch.trim_start_matches("sm_").trim_end_matches('a').parse::<u32>().is_ok_and(|cc| cc >= 80)
    }

    fn has_wgmma(&self) -> bool {
        self.arch == "sm_90"
    }

    fn htod(&self, data: &[f32]) -> Result<Self::Buf> {
        if data.is_empty() {
            return self.alloc_zeros(0);
        }
        self.stream.clone_htod(data).map(CudaBuf::F32).map_err(|e| drv("copy to device", e))
    }

    fn dtoh(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        match buf {
            CudaBuf::F32(s) => self.stream.clone_dtoh(s).map_err(|e| drv("copy to host", e)),
            CudaBuf::Half(_, d) => Ok(from_half_bits(&self.dtoh_bits(buf)?, *d)),
            &CudaBuf::Region { ptr, len, dtype: DType::F32, .. } => {
                let mut v = vec![0f32; len];
                self.region_dtoh(ptr, &mut v)?;
                Ok(v)
            }
            CudaBuf::Region { dtype, .. } => Ok(from_half_bits(&self.dtoh_bits(buf)?, *dtype)),
        }
    }

    fn buf_len(&self, buf: &Self::Buf) -> usize {
        match buf {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::Half(s, _) => s.len(),
            CudaBuf::Region { len, .. } => *len,
        }
    }

    fn buf_dtype(&self, buf: &Self::Buf) -> DType {
        match buf {
            CudaBuf::F32(_) => DType::F32,
            CudaBuf::Half(_, d) | CudaBuf::Region { dtype: d, .. } => *d,
        }
    }

    fn alloc_arena(&self, bytes: usize) -> Result<Self::Buf> {
        let bytes = bytes.div_ceil(4).max(1) * 4;
        let arena = Arc::new(self.stream.alloc_zeros::<u8>(bytes).map_err(|e| drv("alloc", e))?);
        let (ptr, _sync) = arena.device_ptr(&self.stream);
        Ok(CudaBuf::Region { ptr, len: bytes / 4, dtype: DType::F32, arena: Arc::clone(&arena) })
    }

    fn region(&self, arena: &Self::Buf, offset: usize, len: usize, dtype: DType) -> Result<Self::Buf> {
        let CudaBuf::Region { arena, ptr, .. } = arena else {
            return Err(Error::backend("cuda", "region: not a buffer made by alloc_arena"));
        };
        let (base, _sync) = arena.device_ptr(&self.stream);
        let start = (*ptr - base) as usize + offset;
        crate::gpu::check_region("cuda", start, len * dtype.bytes(), arena.len())?;
        Ok(CudaBuf::Region { arena: Arc::clone(arena), ptr: base + start as u64, len, dtype })
    }

    fn htod_into(&self, data: &[f32], dst: &Self::Buf) -> Result<()> {
        let ok = self.buf_dtype(dst) == DType::F32 && self.buf_len(dst) == data.len();
        if !ok {
            return Err(Error::backend("cuda", format!("htod_into: {} f32 values into a buffer of {}", data.len(), self.buf_len(dst))));
        }
        match dst {
            CudaBuf::F32(_) | CudaBuf::Half(..) => Err(Error::backend("cuda", "htod_into: only arena regions are written in place")),
            &CudaBuf::Region { ptr, .. } => {
                // SAFETY: `ptr` addresses `data.len()` f32 values inside the live arena (checked by
                // `region`); the copy is complete when `synchronize` returns, before `data` can move.
                unsafe { cudarc::driver::result::memcpy_htod_async(ptr, data, self.stream.cu_stream()) }.map_err(|e| drv("copy to device", e))?;
                self.synchronize()
            }
        }
    }

    fn htod_bits(&self, bits: &[u16], dtype: DType) -> Result<Self::Buf> {
        if dtype == DType::F32 {
            return Err(Error::backend("cuda", "htod_bits: f32 is not a 16-bit type"));
        }
        let s = if bits.is_empty() { self.stream.null::<u16>() } else { self.stream.clone_htod(bits) };
        s.map(|s| CudaBuf::Half(s, dtype)).map_err(|e| drv("copy to device", e))
    }

    fn dtoh_bits(&self, buf: &Self::Buf) -> Result<Vec<u16>> {
        match buf {
            CudaBuf::F32(_) | CudaBuf::Region { dtype: DType::F32, .. } => Err(Error::backend("cuda", "dtoh_bits: the buffer holds f32")),
            CudaBuf::Half(s, _) => self.stream.clone_dtoh(s).map_err(|e| drv("copy to host", e)),
            &CudaBuf::Region { ptr, len, .. } => {
                let mut v = vec![0u16; len];
                self.region_dtoh(ptr, &mut v)?;
                Ok(v)
            }
        }
    }

    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[KArg<'_, Self::Buf>]) -> Result<()> {
        let f = self.funcs.get(kernel).ok_or_else(|| Error::kernel(kernel, "not a known kernel"))?;
        self.allow_smem(kernel, f, cfg.shmem)?;
        // Scalars must outlive the builder, which keeps pointers to them.
        let ints: Vec<i32> = args.iter().filter_map(|a| if let KArg::I32(v) = a { Some(*v) } else { None }).collect();
        let floats: Vec<f32> = args.iter().filter_map(|a| if let KArg::F32(v) = a { Some(*v) } else { None }).collect();
        let ptrs: Vec<u64> = args.iter().filter_map(|a| if let KArg::Buf(CudaBuf::Region { ptr, .. }) = a { Some(*ptr) } else { None }).collect();
        let (mut ni, mut nf, mut np) = (0, 0, 0);
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                KArg::Buf(CudaBuf::F32(s)) => {
                    b.arg(s);
                }
                KArg::Buf(CudaBuf::Half(s, _)) => {
                    b.arg(s);
                }
                KArg::Buf(CudaBuf::Region { .. }) => {
                    b.arg(&ptrs[np]);
                    np += 1;
                }
                KArg::I32(_) => {
                    b.arg(&ints[ni]);
                    ni += 1;
                }
                KArg::F32(_) => {
                    b.arg(&floats[nf]);
                    nf += 1;
                }
            }
        }
        let lc = LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.shmem,
        };
        // SAFETY: `args` is the kernel's parameter list in order, built by `ops` from the kernel's
        // signature in kernels/*.cu: every `gptr<float>` gets a live CudaSlice<f32> and every
        // `gptr<f16>` / `gptr<bf16>` a CudaSlice<u16>, an arena region its device address as a u64
        // (the region's element type, inside its live arena) (device pointers; the emulator checks the
        // element types against the same signatures), every `int` an i32 and every `float` an f32, all alive until the launch is queued;
        // `ops` checks every index the kernel computes against the buffer lengths.
        unsafe { b.launch(lc) }.map_err(|e| Error::kernel(kernel, format!("launch {cfg:?}: {e}")))?;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        for s in [&self.stream, &self.upload, &self.download] {
            s.synchronize().map_err(|e| drv("synchronize", e))?;
        }
        Ok(())
    }

    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
        // The warm-up: lazy module loading and shared-memory opt-ins happen here, not in the capture.
        body()?;
        self.synchronize()?;
        // Thread-local mode: another thread's unsafe calls do not invalidate this capture.
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| drv("begin graph capture", e))?;
        let recorded = body();
        // The capture is ended whatever `body` returned, so that the stream leaves capture mode.
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        let graph = ended.map_err(|e| drv("end graph capture / instantiate", e))?.ok_or_else(|| drv("graph capture", "no graph was captured"))?;
        graph.upload().map_err(|e| drv("graph upload", e))?;
        Ok(graph)
    }

    fn replay(&self, graph: &CudaGraph) -> Result<()> {
        graph.launch().map_err(|e| drv("graph launch", e))
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.ctx.mem_get_info().ok()
    }

    type Pinned = CudaPinned;
    type Event = CudaEvent;

    fn alloc_pinned(&self, len: usize) -> Result<CudaPinned> {
        if len == 0 {
            return Err(Error::backend("cuda", "pinned host memory of 0 values"));
        }
        // Cached (not write-combined): the host reads what a download brings.
        // SAFETY: the memory is zeroed below before anything reads it.
        let mut host = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len, 0) }.map_err(|e| drv("pinned host memory", e))?;
        host.as_mut_slice().map_err(|e| drv("pinned host memory", e))?.fill(0.0);
        Ok(CudaPinned { host, last: None })
    }
    fn pinned_len(&self, p: &CudaPinned) -> usize {
        p.host.len()
    }
    fn pinned_mut<'a>(&self, p: &'a mut CudaPinned) -> Result<&'a mut [f32]> {
        p.settle()?;
        p.host.as_mut_slice().map_err(|e| drv("pinned memory", e))
    }
    fn pinned_ref<'a>(&self, p: &'a CudaPinned) -> Result<&'a [f32]> {
        p.slice()
    }
    fn upload(&self, src: &mut CudaPinned, dst: &CudaBuf) -> Result<()> {
        let ptr = self.f32_ptr(dst, src.host.len(), "upload")?;
        let host = src.slice()?;
        // SAFETY: `ptr` addresses `host.len()` f32 values of a live buffer (f32_ptr); `host` is
        // page-locked memory that stays allocated and unwritten until the event recorded below
        // has passed (pinned_mut and the drop of PinnedHostSlice wait for it).
        unsafe { cudarc::driver::result::memcpy_htod_async(ptr, host, self.upload.cu_stream()) }.map_err(|e| drv("upload", e))?;
        src.last = Some(self.upload.record_event(None).map_err(|e| drv("event", e))?);
        Ok(())
    }
    fn download(&self, src: &CudaBuf, dst: &mut CudaPinned) -> Result<()> {
        let ptr = self.f32_ptr(src, dst.host.len(), "download")?;
        dst.settle()?;
        let host = dst.host.as_mut_slice().map_err(|e| drv("pinned memory", e))?;
        // SAFETY: as for upload: the pinned memory is not touched by the host until the event
        // recorded below has passed, and `ptr` holds `host.len()` f32 values.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(host, ptr, self.download.cu_stream()) }.map_err(|e| drv("download", e))?;
        dst.last = Some(self.download.record_event(None).map_err(|e| drv("event", e))?);
        Ok(())
    }
    fn record(&self, q: Queue) -> Result<CudaEvent> {
        self.queue(q).record_event(None).map_err(|e| drv("event record", e))
    }
    fn wait(&self, q: Queue, e: &CudaEvent) -> Result<()> {
        self.queue(q).wait(e).map_err(|e| drv("event wait", e))
    }
    fn host_wait(&self, e: &CudaEvent) -> Result<()> {
        e.synchronize().map_err(|e| drv("event synchronize", e))
    }
}
