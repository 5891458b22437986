//! The kernel emulator: the `kernels/*.cu` sources compiled for the host (build.rs, with
//! kernels/emu/emu.h), each CUDA thread a fiber, launched through the same [`Device`] trait as a GPU.
//! It checks what a GPU would not report: out-of-bounds accesses of `gptr` arguments and dynamic
//! shared memory, barriers reached by part of a block, warp collectives that would deadlock; and a
//! race shows up as a difference between [`Schedule::Forward`] and [`Schedule::Reverse`].
use std::cell::{Cell, RefCell, UnsafeCell};
use std::ffi::{c_char, c_void, CStr};
use std::rc::Rc;

use super::{from_half_bits, DType, Device, KArg, LaunchCfg, Queue};
use crate::error::{Error, Result};

mod order;
use order::{Order, Span};

/// The order in which the threads of a block run between barriers, and the order of the blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Threads 0..n-1, blocks 0..b-1.
    #[default]
    Forward,
    /// Threads n-1..0, blocks b-1..0.
    Reverse,
}

/// H100 limits, so that a launch the emulator accepts also launches on the GPU.
const MAX_BLOCK_THREADS: u64 = 1024;
const MAX_BLOCK_DIM: [u32; 3] = [1024, 1024, 64];
const MAX_GRID_DIM: [u32; 3] = [i32::MAX as u32, 65535, 65535];
pub const MAX_SHMEM_BYTES: u32 = 227 * 1024;

#[repr(C)]
struct EmuLaunch {
    grid: [u32; 3],
    block: [u32; 3],
    shmem: u32,
    schedule: i32,
    threads: i32,
    err: *mut c_char,
    err_cap: u32,
}

#[repr(C)]
struct EmuBufArg {
    ptr: *mut c_void,
    bytes: u64,
}

struct EmuKernel {
    name: &'static str,
    file: &'static str,
    run: unsafe extern "C" fn(*const EmuLaunch, *const *mut c_void) -> i32,
    sig: unsafe extern "C" fn() -> *const c_char,
}

include!(concat!(env!("OUT_DIR"), "/emu_kernels.rs"));

/// The kernels the emulator can run (those of `kernels/*.cu` and `kernels/testing/*.cu`).
pub fn kernel_names() -> &'static [&'static str] {
    EMU_KERNEL_NAMES
}

/// The source file a kernel comes from, e.g. `kernels/conv3d.cu`.
pub fn kernel_file(name: &str) -> Option<&'static str> {
    EMU_KERNELS.iter().find(|k| k.name == name).map(|k| k.file)
}

/// Kernels whose .cu file did not compile for the host (build.rs printed the compiler's errors):
/// (kernel, file).
pub fn host_build_failures() -> &'static [(&'static str, &'static str)] {
    EMU_FAILED
}

/// 16 bytes, 16-byte aligned: the storage unit of an [`EmuBuf`], so that a buffer starts on the
/// alignment cp.async and vector loads need (cudaMalloc gives 256).
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(16))]
struct Block16([u8; 16]);

/// A device buffer in host memory: `len` elements at byte `offset` of a storage that regions of
/// one arena share (`Device::region`). Kernels write through `&EmuBuf` (as through a device pointer),
/// and each launch bounds-checks its accesses against the buffer's own bytes, so a plan step that
/// strays out of its value into a neighbour's is an error.
pub struct EmuBuf {
    data: Rc<UnsafeCell<Vec<Block16>>>,
    offset: usize,
    len: usize,
    dtype: DType,
}

impl EmuBuf {
    fn from_bytes(bytes: &[u8], len: usize, dtype: DType) -> EmuBuf {
        let mut v = vec![Block16([0; 16]); bytes.len().div_ceil(16)];
        bytemuck::cast_slice_mut::<Block16, u8>(&mut v)[..bytes.len()].copy_from_slice(bytes);
        EmuBuf { data: Rc::new(UnsafeCell::new(v)), offset: 0, len, dtype }
    }
    fn storage_bytes(&self) -> usize {
        // SAFETY: reads the length only; the Vec is never resized.
        unsafe { (*self.data.get()).len() * 16 }
    }
    fn ptr(&self) -> *mut u8 {
        // SAFETY: the Vec itself is never resized after creation; only its bytes are written, and
        // `offset + bytes()` lies within it (checked by `region`).
        unsafe { (*self.data.get()).as_mut_ptr().cast::<u8>().add(self.offset) }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> usize {
        self.len * self.dtype.bytes()
    }
    /// A copy of the buffer's bytes.
    fn to_bytes(&self) -> Vec<u8> {
        // SAFETY: launches are synchronous, so no kernel writes the buffer while it is read; the
        // storage holds at least `bytes()` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.bytes()) }.to_vec()
    }
    /// Its bytes for the order check: `write` or read.
    fn span(&self, write: bool) -> Span {
        Span { key: Rc::as_ptr(&self.data) as *const u8 as usize, lo: self.offset, hi: self.offset + self.bytes(), write }
    }
    /// Another handle to the same memory (as a device pointer is copied into a recorded launch).
    fn share(&self) -> EmuBuf {
        EmuBuf { data: Rc::clone(&self.data), offset: self.offset, len: self.len, dtype: self.dtype }
    }
}

/// One argument of a recorded launch, held by value (a buffer as another handle to its memory).
enum RecArg {
    Buf(EmuBuf),
    I32(i32),
    F32(f32),
}

/// A launch recorded by [`Device::capture`]: checked when recorded, run when replayed.
struct Recorded {
    kernel: &'static EmuKernel,
    cfg: LaunchCfg,
    args: Vec<RecArg>,
}

/// The emulator's pinned host memory: host memory whose accesses are checked against the queues'.
pub struct EmuPinned {
    data: Vec<f32>,
    /// Its identity for the order check, alive as long as it.
    alive: Rc<()>,
}

impl EmuPinned {
    fn span(&self, write: bool) -> Span {
        Span { key: Rc::as_ptr(&self.alive) as usize, lo: 0, hi: 4 * self.data.len(), write }
    }
}

/// The emulator's event: the clock of its queue when it was recorded.
pub struct EmuEvent(order::Clock);

/// The emulator's graph: the recorded launches, replayed in order with the same buffers and scalars.
pub struct EmuGraph {
    launches: Vec<Recorded>,
}

impl EmuGraph {
    /// The number of launches recorded.
    pub fn len(&self) -> usize {
        self.launches.len()
    }
    pub fn is_empty(&self) -> bool {
        self.launches.is_empty()
    }
}


/// The host emulator of the CUDA device.
#[derive(Default)]
pub struct EmuDevice {
    schedule: Schedule,
    threads: usize,
    /// A bad DEEPIS_EMU_SCHEDULE, reported by every launch.
    bad_env: Option<String>,
    /// The launches of a capture in progress ([`Device::capture`]).
    recording: RefCell<Option<Vec<Recorded>>>,
    /// The device memory it reports ([`EmuDevice::with_memory`]), and the bytes allocated so far.
    memory: Option<usize>,
    allocated: Cell<usize>,
    /// What the queues and the host did, and in which order ([`order`]).
    order: RefCell<Order>,
    /// Launches run so far, per kernel ([`EmuDevice::launch_counts`]).
    launched: RefCell<std::collections::BTreeMap<&'static str, usize>>,
}

/// The environment variable that picks the schedule of [`EmuDevice::new`] (`forward`, `reverse`),
/// so that whole-network runs (`deepis predict --backend emu`) can be repeated under both.
pub const SCHEDULE_ENV: &str = "DEEPIS_EMU_SCHEDULE";

impl EmuDevice {
    /// The schedule of DEEPIS_EMU_SCHEDULE (Forward when unset).
    pub fn new() -> Self {
        match std::env::var(SCHEDULE_ENV).ok().as_deref().map(str::trim) {
            None | Some("") | Some("forward") => Self::default(),
            Some("reverse") => Self::with_schedule(Schedule::Reverse),
            Some(v) => EmuDevice { bad_env: Some(format!("{SCHEDULE_ENV}={v:?}: expected `forward` or `reverse`")), ..Self::default() },
        }
    }
    pub fn with_schedule(schedule: Schedule) -> Self {
        EmuDevice { schedule, ..Self::default() }
    }
    /// Runs blocks on `threads` OS threads (0: the default, `DEEPIS_EMU_THREADS` or the core count).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Reports `bytes` of device memory ([`Device::memory_info`]: free = `bytes` less what was
    /// allocated), as a GPU of that size would, so that what checks it can be tested.
    pub fn with_memory(mut self, bytes: usize) -> Self {
        self.memory = Some(bytes);
        self
    }

    /// A new buffer of `bytes` (its length and type given), counted against the reported memory.
    /// A new buffer of `bytes` (its length and type given), counted against the reported memory,
    /// written by the compute queue (as a GPU's allocation is set there).
    fn new_buf(&self, bytes: &[u8], len: usize, dtype: DType) -> Result<EmuBuf> {
        self.allocated.set(self.allocated.get() + bytes.len());
        let b = EmuBuf::from_bytes(bytes, len, dtype);
        let alive: std::rc::Weak<dyn std::any::Any> = Rc::downgrade(&b.data) as _;
        let whole = Span { key: Rc::as_ptr(&b.data) as *const u8 as usize, lo: 0, hi: b.storage_bytes(), write: true };
        self.order.borrow_mut().fresh(whole.key, alive);
        self.ordered(Some(Queue::Compute), "an allocation", &[whole])?;
        Ok(b)
    }

    /// Records an operation of `q` (the host for `None`) on `spans`; an error if it conflicts with
    /// an access of another queue or the host that no event orders before it.
    fn ordered(&self, q: Option<Queue>, what: &'static str, spans: &[Span]) -> Result<()> {
        self.order.borrow_mut().access(q, what, spans).map_err(|e| Error::backend("emu", e))
    }

    /// The order check of a launch of `k` on the compute queue: its `gptr<const T>` arguments are
    /// read, the others written.
    fn ordered_launch(&self, k: &EmuKernel, args: &[KArg<'_, EmuBuf>]) -> Result<()> {
        // SAFETY: the generated signature function returns a static NUL-terminated string.
        let sig = unsafe { CStr::from_ptr((k.sig)()) }.to_string_lossy();
        let spans: Vec<Span> = sig
            .chars()
            .zip(args)
            .filter_map(|(c, a)| match a {
                KArg::Buf(b) if b.bytes() > 0 => Some(b.span(c.is_ascii_uppercase())),
                _ => None,
            })
            .collect();
        self.ordered(Some(Queue::Compute), k.name, &spans)
    }

    /// An error when a capture is in progress: `what` is not a launch, which a graph cannot hold.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.recording.borrow().is_some() {
            return Err(Error::backend("emu", format!("{what} while capturing a graph: only kernel launches can be recorded")));
        }
        Ok(())
    }

    /// How many launches of each kernel have run (each replay of a graph counts its launches):
    /// which kernels a plan or op really runs, where their outputs cannot tell.
    pub fn launch_counts(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.launched.borrow().clone()
    }

    /// Runs one checked launch now.
    fn run_launch(&self, k: &EmuKernel, cfg: LaunchCfg, args: &[KArg<'_, EmuBuf>]) -> Result<()> {
        *self.launched.borrow_mut().entry(k.name).or_default() += 1;
        // Every argument gets a slot that outlives the call; `ptrs` points into `slots`.
        enum Slot {
            Buf(EmuBufArg),
            I32(i32),
            F32(f32),
        }
        let mut slots: Vec<Slot> = args
            .iter()
            .map(|a| match a {
                KArg::Buf(b) => Slot::Buf(EmuBufArg { ptr: b.ptr().cast(), bytes: b.bytes() as u64 }),
                KArg::I32(v) => Slot::I32(*v),
                KArg::F32(v) => Slot::F32(*v),
            })
            .collect();
        let ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| match s {
                Slot::Buf(b) => (b as *mut EmuBufArg).cast(),
                Slot::I32(v) => (v as *mut i32).cast(),
                Slot::F32(v) => (v as *mut f32).cast(),
            })
            .collect();
        let mut err = vec![0 as c_char; 2048];
        let l = EmuLaunch {
            grid: cfg.grid,
            block: cfg.block,
            shmem: cfg.shmem,
            schedule: match self.schedule {
                Schedule::Forward => 0,
                Schedule::Reverse => 1,
            },
            threads: self.threads.min(64) as i32,
            err: err.as_mut_ptr(),
            err_cap: err.len() as u32,
        };
        // SAFETY: check_args matched the argument list with the kernel's parameter kinds ('B'/'b' a
        // buffer descriptor, 'i' an i32, 'f' an f32) and the generated wrapper reads exactly those;
        // buffer descriptors carry their byte length and every access is bounds-checked.
        let rc = unsafe { (k.run)(&l, ptrs.as_ptr()) };
        drop(slots);
        if rc != 0 {
            // SAFETY: the runtime wrote a NUL-terminated message within err_cap bytes.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(Error::kernel(k.name, msg));
        }
        Ok(())
    }
}

fn check_cfg(kernel: &str, cfg: &LaunchCfg) -> Result<()> {
    let bad = |m: String| Err(Error::kernel(kernel, m));
    for d in 0..3 {
        if cfg.block[d] == 0 || cfg.block[d] > MAX_BLOCK_DIM[d] {
            return bad(format!("block {:?}: dimension {d} must be in 1..={}", cfg.block, MAX_BLOCK_DIM[d]));
        }
        if cfg.grid[d] == 0 || cfg.grid[d] > MAX_GRID_DIM[d] {
            return bad(format!("grid {:?}: dimension {d} must be in 1..={}", cfg.grid, MAX_GRID_DIM[d]));
        }
    }
    let n: u64 = cfg.block.iter().map(|&b| b as u64).product();
    if n > MAX_BLOCK_THREADS {
        return bad(format!("block {:?} has {n} threads (at most {MAX_BLOCK_THREADS})", cfg.block));
    }
    if cfg.shmem > MAX_SHMEM_BYTES {
        return bad(format!("{} bytes of dynamic shared memory (at most {MAX_SHMEM_BYTES})", cfg.shmem));
    }
    Ok(())
}

fn check_args(k: &EmuKernel, args: &[KArg<'_, EmuBuf>]) -> Result<()> {
    // SAFETY: the generated signature function returns a static NUL-terminated string.
    let sig = unsafe { CStr::from_ptr((k.sig)()) }.to_string_lossy();
    let want = |c: char| match c {
        'B' | 'b' => "an f32 (32-bit) buffer",
        'H' | 'h' => "an f16 buffer",
        'G' | 'g' => "a bf16 buffer",
        'U' | 'u' => "a 16-bit buffer",
        'i' => "an int",
        _ => "a float",
    };
    if sig.len() != args.len() {
        return Err(Error::kernel(k.name, format!("takes {} arguments ({sig}), got {}", sig.len(), args.len())));
    }
    for (i, (c, a)) in sig.chars().zip(args).enumerate() {
        let ok = match (c, a) {
            ('B' | 'b', KArg::Buf(b)) => b.dtype == DType::F32,
            ('H' | 'h', KArg::Buf(b)) => b.dtype == DType::F16,
            ('G' | 'g', KArg::Buf(b)) => b.dtype == DType::BF16,
            ('U' | 'u', KArg::Buf(b)) => b.dtype != DType::F32,
            ('i', KArg::I32(_)) | ('f', KArg::F32(_)) => true,
            _ => false,
        };
        if !ok {
            let got = match a {
                KArg::Buf(b) => format!("an {} buffer", b.dtype.name()),
                KArg::I32(_) => "an int".into(),
                KArg::F32(_) => "a float".into(),
            };
            return Err(Error::kernel(k.name, format!("argument {i} must be {}, got {got}", want(c))));
        }
    }
    Ok(())
}

impl Device for EmuDevice {
    type Buf = EmuBuf;
    type Graph = EmuGraph;

    fn name(&self) -> String {
        match self.schedule {
            Schedule::Forward => "emu".into(),
            Schedule::Reverse => "emu (reverse schedule)".into(),
        }
    }
    fn alloc_zeros(&self, len: usize) -> Result<EmuBuf> {
        self.not_capturing("an allocation")?;
        // The emulated device's memory is this machine's: it answers to the memory budget.
        let what = format!("an emulated device buffer of {len} values");
        crate::limits::check(&what, crate::limits::bytes_of(Some(len as u64), 4)).map_err(Error::Input)?;
        self.new_buf(&vec![0; len * 4], len, DType::F32)
    }
    fn htod(&self, data: &[f32]) -> Result<EmuBuf> {
        self.not_capturing("a copy to the device")?;
        self.new_buf(bytemuck::cast_slice(data), data.len(), DType::F32)
    }
    fn dtoh(&self, buf: &EmuBuf) -> Result<Vec<f32>> {
        self.not_capturing("a copy to the host")?;
        self.ordered(Some(Queue::Compute), "a copy to the host", &[buf.span(false)])?;
        self.order.borrow_mut().synchronize();
        let bytes = buf.to_bytes();
        Ok(match buf.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
            d => from_half_bits(&bytemuck::pod_collect_to_vec(&bytes), d),
        })
    }
    fn buf_len(&self, buf: &EmuBuf) -> usize {
        buf.len()
    }
    fn buf_dtype(&self, buf: &EmuBuf) -> DType {
        buf.dtype
    }
    fn htod_bits(&self, bits: &[u16], dtype: DType) -> Result<EmuBuf> {
        if dtype == DType::F32 {
            return Err(Error::backend("emu", "htod_bits: f32 is not a 16-bit type"));
        }
        self.not_capturing("a copy to the device")?;
        self.new_buf(bytemuck::cast_slice(bits), bits.len(), dtype)
    }
    fn dtoh_bits(&self, buf: &EmuBuf) -> Result<Vec<u16>> {
        if buf.dtype == DType::F32 {
            return Err(Error::backend("emu", "dtoh_bits: the buffer holds f32"));
        }
        self.not_capturing("a copy to the host")?;
        self.ordered(Some(Queue::Compute), "a copy to the host", &[buf.span(false)])?;
        self.order.borrow_mut().synchronize();
        Ok(bytemuck::pod_collect_to_vec(&buf.to_bytes()))
    }
    fn region(&self, arena: &EmuBuf, offset: usize, len: usize, dtype: DType) -> Result<EmuBuf> {
        super::check_region("emu", arena.offset + offset, len * dtype.bytes(), arena.storage_bytes().min(arena.offset + arena.bytes()))?;
        Ok(EmuBuf { data: Rc::clone(&arena.data), offset: arena.offset + offset, len, dtype })
    }
    fn htod_into(&self, data: &[f32], dst: &EmuBuf) -> Result<()> {
        if dst.dtype != DType::F32 || dst.len != data.len() {
            return Err(Error::backend("emu", format!("htod_into: {} f32 values into {} {} values", data.len(), dst.len, dst.dtype.name())));
        }
        self.not_capturing("a copy to the device")?;
        self.ordered(Some(Queue::Compute), "a copy to the device", &[dst.span(true)])?;
        self.order.borrow_mut().synchronize();
        // SAFETY: launches are synchronous, so no kernel touches the buffer now; it holds `bytes()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().cast::<u8>(), dst.ptr(), dst.bytes()) };
        Ok(())
    }

    fn launch(&self, kernel: &str, cfg: LaunchCfg, args: &[KArg<'_, EmuBuf>]) -> Result<()> {
        let Some(k) = EMU_KERNELS.iter().find(|k| k.name == kernel) else {
            if let Some((_, file)) = EMU_FAILED.iter().find(|(n, _)| *n == kernel) {
                return Err(Error::kernel(kernel, format!("{file} did not compile for the host emulator (see the build warnings)")));
            }
            return Err(Error::kernel(kernel, "unknown kernel: no `extern \"C\" __global__` of that name in kernels/"));
        };
        if let Some(e) = &self.bad_env {
            return Err(Error::backend("emu", e));
        }
        check_cfg(kernel, &cfg)?;
        check_args(k, args)?;

        if let Some(rec) = self.recording.borrow_mut().as_mut() {
            let args = args
                .iter()
                .map(|a| match a {
                    KArg::Buf(b) => RecArg::Buf(b.share()),
                    KArg::I32(v) => RecArg::I32(*v),
                    KArg::F32(v) => RecArg::F32(*v),
                })
                .collect();
            rec.push(Recorded { kernel: k, cfg, args });
            return Ok(());
        }
        self.ordered_launch(k, args)?;
        self.run_launch(k, cfg, args)
    }

    fn synchronize(&self) -> Result<()> {
        self.not_capturing("a synchronisation")?;
        self.order.borrow_mut().synchronize();
        Ok(())
    }

    fn capture(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<EmuGraph> {
        if self.recording.borrow().is_some() {
            return Err(Error::backend("emu", "capture: a capture is already in progress"));
        }
        *self.recording.borrow_mut() = Some(Vec::new());
        let r = body();
        let launches = self.recording.borrow_mut().take().unwrap_or_default();
        r.map(|()| EmuGraph { launches })
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.memory.map(|total| (total.saturating_sub(self.allocated.get()), total))
    }

    fn replay(&self, graph: &EmuGraph) -> Result<()> {
        for r in &graph.launches {
            let args: Vec<KArg<'_, EmuBuf>> = r
                .args
                .iter()
                .map(|a| match a {
                    RecArg::Buf(b) => KArg::Buf(b),
                    RecArg::I32(v) => KArg::I32(*v),
                    RecArg::F32(v) => KArg::F32(*v),
                })
                .collect();
            self.ordered_launch(r.kernel, &args)?;
            self.run_launch(r.kernel, r.cfg, &args)?;
        }
        Ok(())
    }

    type Pinned = EmuPinned;
    type Event = EmuEvent;

    fn alloc_pinned(&self, len: usize) -> Result<EmuPinned> {
        self.not_capturing("a pinned allocation")?;
        let what = format!("pinned host memory of {len} values");
        crate::limits::check(&what, crate::limits::bytes_of(Some(len as u64), 4)).map_err(Error::Input)?;
        let p = EmuPinned { data: vec![0.0; len], alive: Rc::new(()) };
        let alive: std::rc::Weak<dyn std::any::Any> = Rc::downgrade(&p.alive) as _;
        self.order.borrow_mut().fresh(p.span(true).key, alive);
        Ok(p)
    }
    fn pinned_len(&self, p: &EmuPinned) -> usize {
        p.data.len()
    }
    fn pinned_mut<'a>(&self, p: &'a mut EmuPinned) -> Result<&'a mut [f32]> {
        self.ordered(None, "a host write of pinned memory", &[p.span(true)])?;
        Ok(&mut p.data)
    }
    fn pinned_ref<'a>(&self, p: &'a EmuPinned) -> Result<&'a [f32]> {
        self.ordered(None, "a host read of pinned memory", &[p.span(false)])?;
        Ok(&p.data)
    }
    fn upload(&self, src: &mut EmuPinned, dst: &EmuBuf) -> Result<()> {
        if dst.dtype != DType::F32 || dst.len != src.data.len() {
            return Err(Error::backend("emu", format!("upload: {} f32 values into {} {} values", src.data.len(), dst.len, dst.dtype.name())));
        }
        self.not_capturing("an upload")?;
        self.ordered(Some(Queue::Upload), "an upload", &[src.span(false), dst.span(true)])?;
        // SAFETY: copies run at once, so nothing else touches `dst` now; it holds `bytes()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.data.as_ptr().cast::<u8>(), dst.ptr(), dst.bytes()) };
        Ok(())
    }
    fn download(&self, src: &EmuBuf, dst: &mut EmuPinned) -> Result<()> {
        if src.dtype != DType::F32 || src.len != dst.data.len() {
            return Err(Error::backend("emu", format!("download: {} {} values into {} f32 values", src.len, src.dtype.name(), dst.data.len())));
        }
        self.not_capturing("a download")?;
        self.ordered(Some(Queue::Download), "a download", &[src.span(false), dst.span(true)])?;
        dst.data.copy_from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(&src.to_bytes()));
        Ok(())
    }
    fn record(&self, q: Queue) -> Result<EmuEvent> {
        self.not_capturing("an event record")?;
        Ok(EmuEvent(self.order.borrow_mut().record(q)))
    }
    fn wait(&self, q: Queue, e: &EmuEvent) -> Result<()> {
        self.not_capturing("an event wait")?;
        self.order.borrow_mut().wait(q, &e.0);
        Ok(())
    }
    fn host_wait(&self, e: &EmuEvent) -> Result<()> {
        self.not_capturing("a host wait")?;
        self.order.borrow_mut().host_wait(&e.0);
        Ok(())
    }
}
