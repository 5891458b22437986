//! The GPU inference plan: the passed inference graph (`graph::passes::Weighted`, the same one the
//! CPU plan lowers: folded batch norm, bias + residual add + ReLU / sigmoid in the conv epilogue,
//! the moved and merged 1x1 convs) lowered to a list of kernel launches over ONE device arena,
//! allocated once per (batch, size), on any [`Device`] (CUDA or the emulator).
//!
//! Precision ([`Precision`]): `Fp32` runs the fp32 kernels of `ops` (conv3d with bias, then the
//! residual add / ReLU / sigmoid in place on its output). `Fp16` / `Bf16` keep activations
//! channels-last in the half type and run every convolution on the tensor cores (`tensor_conv`:
//! weights rounded to the half type and laid out once, here; f32 accumulation; bias, residual and
//! ReLU in the epilogue; output rounded once to the half type, or kept in f32 for the head and
//! a sigmoid). Up-sampling and the add that reads it are one kernel in every type (skip + up(low)
//! in f32, rounded once), max-pool too (exact). The other ops (input scaling; the adds, ReLUs and
//! up-samplings the passes leave unfused) run in f32 on a converted copy (`convert`); their
//! result is rounded to the half type when a convolution reads it. The rounding points are
//! therefore: the input of every conv and its residual, every conv weight, every conv output but
//! the head's and a sigmoid's, and every up-sample + add.
//!
//! `Tf32` is `Fp32` (f32 activations, every other op in f32, the same steps) with every
//! convolution on the tensor cores in tf32 (`tensor_conv` with f32 data: weights rounded to tf32
//! once, here, the conv's input rounded to tf32 inside the kernel, cvt.rna, ties away; f32
//! accumulation; bias, residual and ReLU in the f32 epilogue). Its only rounding points are the
//! input and the weights of every conv: outputs, residuals and up-sample + adds stay f32.
//!
//! The graph's `Pair` (two in-plane GCN convs, which the CPU runs plane by plane for its caches)
//! is two convs here. Values whose lifetimes do not overlap share memory (`plan::memory`).
use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;

use crate::backend::{ConvSpec, DevTensor};
use crate::error::{Error, Result};
use crate::gpu::ops::GpuBackend;
use crate::gpu::tensor_conv::{self, conv3d_tc_into, Epilogue, TcConv, WarpTile};
use crate::gpu::{convert, DType, Device, Queue};
use crate::graph::passes::{Act, Lin, Passes, WOp, Weighted};
use crate::graph::{Graph, Mode};
use crate::plan::memory;
use crate::tensor::{Shape, Tensor};
use crate::weights::Weights;

/// The arithmetic of the GPU plan. The default is `Fp32`: until tf32 / fp16 / bf16 are measured
/// on a GPU (speed) and on real tomograms (accuracy; the golden cases are small random networks),
/// the precision that matches the float64 oracle to 1e-4 stays the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Precision {
    /// float32 everywhere (CUDA cores)
    #[default]
    Fp32,
    /// float32 activations, convolutions in tf32 (inputs and weights rounded to 10 mantissa bits),
    /// f32 accumulation (tensor cores, sm_80+)
    Tf32,
    /// float16 activations and weights, f32 accumulation (tensor cores, sm_80+)
    Fp16,
    /// bfloat16 activations and weights, f32 accumulation (tensor cores, sm_80+)
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Precision::Fp32, Precision::Tf32, Precision::Fp16, Precision::Bf16];

    /// The type activations are stored in between convolutions.
    pub fn storage(self) -> DType {
        match self {
            Precision::Fp32 | Precision::Tf32 => DType::F32,
            Precision::Fp16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The warp tile of the convolutions on mma.sync (`--warp-tile`): the same sums in the same order
/// whichever, so the same output bit for bit; which is faster is for a GPU to say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum MmaTile {
    /// 8 warps of 32 voxels x 64 channels (conv3d_tc_*)
    #[default]
    M32,
    /// 4 warps of 64 voxels x 64 channels (conv3d_tc_wide_*): a third fewer shared-memory bytes
    /// per multiply-add, more registers
    M64,
}

impl MmaTile {
    fn warp_tile(self) -> WarpTile {
        match self {
            MmaTile::M32 => WarpTile::M32,
            MmaTile::M64 => WarpTile::M64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MmaTile::M32 => "m32",
            MmaTile::M64 => "m64",
        }
    }
}

/// How the GPU plan computes (`--backend emu` or `cuda` of predict, segment and bench).
#[derive(clap::Args, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// Arithmetic of the GPU plan (--backend emu or cuda): fp32; tf32 (f32 activations, convs on
    /// tensor cores with inputs and weights rounded to tf32); or fp16 / bf16 activations and weights;
    /// all with f32 accumulation, tensor cores on sm_80 and newer. Default fp32: the others are
    /// checked against the float64 oracle on the emulator but not yet measured on a GPU or on real
    /// tomograms; the CPU backends compute in fp32 only
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Queue the GPU plan's kernel launches one by one instead of replaying them as one graph
    /// recorded at the first run (a CUDA graph): to compare the two, or for a profiler
    #[arg(long)]
    pub no_graph: bool,
    /// Run the stride-1 convolutions of 64, 128, ... output channels on wgmma (sm_90a warpgroup
    /// MMA, --precision tf32 / fp16 / bf16, sm_90 GPUs) instead of mma.sync. Off by default:
    /// checked on the emulator against float64, not yet measured on a GPU
    #[arg(long)]
    pub wgmma: bool,
    /// The warp tile of the tensor-core convolutions on mma.sync (--precision tf32, fp16 or
    /// bf16; those not on --wgmma): m32 or m64, the same output bit for bit; for comparing the two
    #[arg(long, value_enum, default_value_t = MmaTile::M32)]
    pub warp_tile: MmaTile,
}

/// A value of the plan (an index into its shapes and types).
type V = usize;

/// A convolution's weights on the device, in the form its kernel reads.
enum Conv<B> {
    /// fp32: the CUDA-core conv.
    F32 { spec: ConvSpec, w: B, b: Option<B> },
    /// On the tensor cores: fp16 / bf16, or tf32 (a `TcConv` of f32 data).
    Tc(TcConv<B>),
}

/// One step. Outputs are values of their own, except the fp32 conv's epilogue, which runs in place
/// on the conv's output (one thread per element).
#[derive(Clone, Copy, Debug)]
enum Step {
    Conv { x: V, conv: usize, out: V, res: Option<V>, act: Act },
    Affine { x: V, aff: usize, out: V },
    Add { a: V, b: V, out: V },
    Relu { x: V, out: V },
    Sigmoid { x: V, out: V },
    Upsample { x: V, out: V },
    /// out = skip + up-sampling of `low` to skip's size.
    UpAdd { skip: V, low: V, out: V },
    MaxPool { x: V, out: V },
    /// f32 <-> half, to the type of `out`.
    Convert { x: V, out: V },
}

impl Step {
    fn values(&self) -> Vec<V> {
        match *self {
            Step::Conv { x, out, res, .. } => [Some(x), Some(out), res].into_iter().flatten().collect(),
            Step::Add { a: x, b: y, out } | Step::UpAdd { skip: x, low: y, out } => vec![x, y, out],
            Step::Affine { x, out, .. } | Step::Relu { x, out } | Step::Sigmoid { x, out } | Step::Upsample { x, out } | Step::MaxPool { x, out } | Step::Convert { x, out } => vec![x, out],
        }
    }
}

/// The network compiled for `batch` volumes of one size on one device. Its launches are recorded
/// into a graph at the first run ([`Device::capture`]: a CUDA graph on a GPU) and replayed for
/// every batch, unless [`GpuPlan::set_graph`] turns that off (then they are queued one by one).
/// Two batches are in flight at a time ([`GpuPlan::run`]): each has its own input, output and
/// pinned host buffers (a [`Slot`]) and its own graph.
pub struct GpuPlan<D: Device> {
    /// The recorded launches of each slot (declared first: dropped before the buffers they name).
    graphs: [OnceCell<D::Graph>; 2],
    use_graph: bool,
    /// Each slot's pinned host memory, made at the first run.
    staging: RefCell<Option<[Staging<D>; 2]>>,
    gpu: GpuBackend<D>,
    precision: Precision,
    /// The kernels of the tensor-core convs ([`GpuPlan::set_wgmma`], [`GpuPlan::set_mma_tile`]):
    /// wgmma on the convs it takes, else mma.sync in this warp tile.
    wgmma: bool,
    mma_tile: MmaTile,
    batch: usize,
    steps: Vec<Step>,
    convs: Vec<Conv<D::Buf>>,
    affines: Vec<(D::Buf, D::Buf)>,
    /// The two slots' input and output values.
    slots: [Slot<D::Buf>; 2],
    /// Every value as a region of `arena` (declared first: dropped before it); the input and the
    /// output are the slots'.
    vals: Vec<DevTensor<D::Buf>>,
    arena_bytes: usize,
    /// The two slots' bytes.
    slot_bytes: usize,
    weight_bytes: usize,
    input: V,
    output: V,
    /// Which plan a [`Ticket`] came from (unique in the process).
    id: usize,
    _arena: D::Buf,
}

/// A batch queued by [`GpuPlan::submit`], to give back to [`GpuPlan::collect`]: which plan and
/// slot hold it, and how many volumes it has. A ticket dropped, or given to another plan (which
/// refuses it), keeps its slot held for the plan's life.
#[must_use = "a queued batch holds one of the plan's two slots until it is collected"]
#[derive(Debug)]
pub struct Ticket {
    plan: usize,
    slot: usize,
    n: usize,
}

/// The input and output values of one batch in flight, allocated apart from the arena: values
/// there share memory with the input after its last reader and with the output before its
/// writer, so the next batch could not be uploaded, nor this one downloaded, during a forward pass.
struct Slot<B> {
    input: DevTensor<B>,
    output: DevTensor<B>,
}

/// The host side of a slot: its batch in and out in pinned memory, and the event after the
/// download of the batch it holds.
struct Staging<D: Device> {
    input: D::Pinned,
    output: D::Pinned,
    downloaded: Option<D::Event>,
}

/// The lowering: values (shape with the batch, type) and steps, node by node in the graph's order.
struct Lower<'a, D: Device> {
    g: &'a Weighted,
    dev: &'a D,
    precision: Precision,
    batch: usize,
    shapes: Vec<(Shape, DType)>,
    steps: Vec<Step>,
    convs: Vec<Conv<D::Buf>>,
    affines: Vec<(D::Buf, D::Buf)>,
    readers: Vec<usize>,
    /// The value of each node (none for an up-sampling its add runs).
    val: Vec<Option<V>>,
    /// (value, type) -> its converted copy, made once.
    converted: HashMap<(V, DType), V>,
}

impl<D: Device> Lower<'_, D> {
    fn value(&mut self, s: Shape, t: DType) -> V {
        self.shapes.push((Shape { n: self.batch, ..s }, t));
        self.shapes.len() - 1
    }

    /// Input k of node i in type `t`.
    fn input(&mut self, i: usize, k: usize, t: DType) -> Result<V> {
        self.value_of(i, self.g.nodes[i].inputs[k], t)
    }

    /// The value of node j, which node i reads, in type `t`: converted (once) when stored in another.
    fn value_of(&mut self, i: usize, j: usize, t: DType) -> Result<V> {
        let v = self.val[j].ok_or_else(|| Error::Other(format!("gpu plan: {} reads {}, which has no value", self.g.nodes[i].name, self.g.nodes[j].name)))?;
        if self.shapes[v].1 == t {
            return Ok(v);
        }
        if let Some(&c) = self.converted.get(&(v, t)) {
            return Ok(c);
        }
        let out = self.value(self.shapes[v].0, t);
        self.steps.push(Step::Convert { x: v, out });
        self.converted.insert((v, t), out);
        Ok(out)
    }

    /// The type a conv writes: the storage type, but f32 for the graph's output and before a sigmoid.
    fn conv_out_type(&self, i: usize, act: Act) -> DType {
        if i == self.g.output || act == Act::Sigmoid { DType::F32 } else { self.precision.storage() }
    }

    fn upload_conv(&mut self, l: &Lin) -> Result<usize> {
        let (w, b) = (&l.w, l.b.as_ref());
        let conv = match self.precision {
            Precision::Fp32 => Conv::F32 {
                spec: l.spec,
                w: self.dev.htod(w)?,
                b: b.as_ref().map(|b| self.dev.htod(b)).transpose()?,
            },
            p => Conv::Tc(TcConv::new(self.dev, &l.spec, w, b.map(|b| b.as_slice()), p.storage())?),
        };
        self.convs.push(conv);
        Ok(self.convs.len() - 1)
    }

    fn conv(&mut self, x: V, l: &Lin, res: Option<V>, act: Act, out: V) -> Result<()> {
        let conv = self.upload_conv(l)?;
        self.steps.push(Step::Conv { x, conv, out, res, act });
        Ok(())
    }

    /// A step of an f32-only op reading node i's inputs (converted to f32) into a new f32 value.
    fn f32_op(&mut self, i: usize, make: impl Fn(&[V], V) -> Step) -> Result<V> {
        let g = self.g;
        let n = &g.nodes[i];
        let ins = (0..n.inputs.len()).map(|k| self.input(i, k, DType::F32)).collect::<Result<Vec<V>>>()?;
        let out = self.value(n.shape, DType::F32);
        self.steps.push(make(&ins, out));
        Ok(out)
    }

    /// The up-sampled input of an add (its index among the add's inputs) that the add runs.
    fn fused_up(&self, i: usize) -> Option<usize> {
        let n = &self.g.nodes[i];
        (0..n.inputs.len()).find(|&k| self.up_by_its_add(n.inputs[k]))
    }

    /// Node j is an up-sampling read only by an add (which then runs it, in one kernel).
    fn up_by_its_add(&self, j: usize) -> bool {
        matches!(self.g.nodes[j].op, WOp::Upsample)
            && self.readers[j] == 1
            && self.g.nodes.iter().any(|m| matches!(m.op, WOp::Add) && m.inputs.contains(&j) && m.inputs[0] != m.inputs[1])
    }

    fn node(&mut self, i: usize) -> Result<Option<V>> {
        let g = self.g;
        let n = &g.nodes[i];
        let (s, storage) = (n.shape, self.precision.storage());
        if matches!(n.op, WOp::Upsample) && self.up_by_its_add(i) {
            return Ok(None);
        }
        if let (WOp::Add, Some(k)) = (&n.op, self.fused_up(i)) {
            let skip = self.input(i, 1 - k, storage)?;
            let low = self.value_of(i, g.nodes[n.inputs[k]].inputs[0], storage)?;
            let out = self.value(s, storage);
            self.steps.push(Step::UpAdd { skip, low, out });
            return Ok(Some(out));
        }
        Ok(Some(match &n.op {
            WOp::Input => self.value(s, DType::F32),
            WOp::Conv { lin, act } => {
                let t = self.conv_out_type(i, *act);
                let x = self.input(i, 0, storage)?;
                let res = if n.inputs.len() > 1 { Some(self.input(i, 1, t)?) } else { None };
                let out = self.value(s, t);
                self.conv(x, lin, res, *act, out)?;
                out
            }
            WOp::Pair { a, b } => {
                let x = self.input(i, 0, storage)?;
                let mid = self.value(s.with_c(a.spec.cout).with_d(a.spec.out_dims(self.shapes[x].0.d)), storage);
                let out = self.value(s, self.conv_out_type(i, Act::None));
                self.conv(x, a, None, Act::None, mid)?;
                self.conv(mid, b, None, Act::None, out)?;
                out
            }
            WOp::Affine { scale, shift } | WOp::Bn { scale, shift } => {
                let c = s.c;
                let per_c = |v: &[f64]| (0..c).map(|k| v[k % v.len()] as f32).collect::<Vec<f32>>();
                self.affines.push((self.dev.htod(&per_c(scale))?, self.dev.htod(&per_c(shift))?));
                let aff = self.affines.len() - 1;
                self.f32_op(i, |v, out| Step::Affine { x: v[0], aff, out })?
            }
            WOp::MaxPool => {
                let x = self.input(i, 0, storage)?;
                let out = self.value(s, storage);
                self.steps.push(Step::MaxPool { x, out });
                out
            }
            WOp::Relu => self.f32_op(i, |v, out| Step::Relu { x: v[0], out })?,
            WOp::Sigmoid => self.f32_op(i, |v, out| Step::Sigmoid { x: v[0], out })?,
            WOp::Add => self.f32_op(i, |v, out| Step::Add { a: v[0], b: v[1], out })?,
            WOp::Upsample => self.f32_op(i, |v, out| Step::Upsample { x: v[0], out })?,
        }))
    }
}

impl<D: Device> GpuPlan<D> {
    /// Compiles `weights` for `batch` volumes of size `d` with every pass of the CPU plan.
    pub fn new(dev: D, weights: &Weights, d: [usize; 3], batch: usize, precision: Precision) -> Result<Self> {
        weights.config.check_input_size(d)?;
        let mut wg = Weighted::new(&Graph::new(&weights.config, Mode::Eval, d), &|name| weights.get(name))?;
        wg.optimise(Passes::default());
        GpuPlan::from_weighted(dev, &wg, batch, precision)
    }

    /// [`GpuPlan::new`] in the user's options (`--precision`, `--no-graph`, `--wgmma`).
    pub fn with_options(dev: D, weights: &Weights, d: [usize; 3], batch: usize, o: GpuOptions) -> Result<Self> {
        let mut plan = GpuPlan::new(dev, weights, d, batch, o.precision)?;
        plan.set_graph(!o.no_graph);
        if o.warp_tile != MmaTile::M32 {
            plan.set_mma_tile(o.warp_tile)?;
        }
        if o.wgmma {
            plan.set_wgmma(true)?;
        }
        Ok(plan)
    }

    /// Compiles a passed inference graph (any passes, any `Arch`).
    pub fn from_weighted(dev: D, g: &Weighted, batch: usize, precision: Precision) -> Result<Self> {
        let Built { steps, convs, affines, slots, vals, arena_bytes, slot_bytes, weight_bytes, input, output, arena } = Built::lower(&dev, g, batch, precision)?;
        let gpu = GpuBackend::new(dev);
        let (graphs, staging) = ([OnceCell::new(), OnceCell::new()], RefCell::new(None));
        Ok(GpuPlan { graphs, use_graph: true, staging, gpu, precision, wgmma: false, mma_tile: MmaTile::M32, batch, steps, convs, affines, slots, vals, arena_bytes, slot_bytes, weight_bytes, input, output, id: next_plan_id(), _arena: arena })
    }
}

/// What the lowering makes on the device: everything of a [`GpuPlan`] but the device itself.
struct Built<B> {
    steps: Vec<Step>,
    convs: Vec<Conv<B>>,
    affines: Vec<(B, B)>,
    slots: [Slot<B>; 2],
    vals: Vec<DevTensor<B>>,
    arena_bytes: usize,
    slot_bytes: usize,
    weight_bytes: usize,
    input: V,
    output: V,
    arena: B,
}

impl<B> Built<B> {
    /// Lowers `g` onto `dev`: weights uploaded, values placed in one arena, allocated.
    fn lower<D: Device<Buf = B>>(dev: &D, g: &Weighted, batch: usize, precision: Precision) -> Result<Self> {
        if batch == 0 {
            return Err(Error::Input("the GPU plan needs a batch of at least one volume".into()));
        }
        if precision != Precision::Fp32 && !dev.has_tensor_cores() {
            return Err(Error::backend(dev.name(), format!("--precision {}: needs tensor cores (sm_80 or newer)", precision.name())));
        }
        let mut l = Lower {
            g,
            dev,
            precision,
            batch,
            shapes: Vec::new(),
            steps: Vec::new(),
            convs: Vec::new(),
            affines: Vec::new(),
            readers: g.consumers(),
            val: vec![None; g.nodes.len()],
            converted: HashMap::new(),
        };
        for i in g.order() {
            l.val[i] = l.node(i)?;
        }
        let (input, output) = (l.val[g.input], l.val[g.output]);
        let (Some(input), Some(output)) = (input, output) else {
            return Err(Error::Other("gpu plan: the graph's input or output has no value".into()));
        };
        let Lower { shapes, steps, convs, affines, .. } = l;
        // in 4-byte units; the input and the output live in the slots, not in the arena
        let lens = shapes.iter().enumerate().map(|(v, (s, t))| if v == input || v == output { 0 } else { (s.len() * t.bytes()).div_ceil(4) });
        let lives = memory::lifetimes(lens, steps.iter().map(Step::values), input, output);
        let (off, arena_len) = memory::place(&lives, true);
        debug_assert!(memory::disjoint(&lives, &off));
        let arena_bytes = 4 * arena_len;
        let (ins, outs) = (shapes[input], shapes[output]);
        if ins.1 != DType::F32 || outs.1 != DType::F32 {
            return Err(Error::Other("gpu plan: the network's input and output must be f32".into()));
        }
        let slot_bytes = 2 * 4 * (ins.0.len() + outs.0.len());
        check_device_memory(dev, arena_bytes + slot_bytes, batch)?;
        let arena = dev.alloc_arena(arena_bytes)?;
        let slot = || -> Result<Slot<B>> {
            let input = DevTensor { shape: ins.0, data: dev.alloc_zeros(ins.0.len())? };
            Ok(Slot { input, output: DevTensor { shape: outs.0, data: dev.alloc_zeros(outs.0.len())? } })
        };
        let slots = [slot()?, slot()?];
        // The copies of a run go on other queues than the allocations' zeroing.
        dev.synchronize()?;
        let vals = shapes
            .iter()
            .zip(&off)
            .zip(&lives)
            .map(|(((s, t), &o), life)| {
                let len = if life.len == 0 { 0 } else { s.len() };
                Ok(DevTensor { shape: *s, data: dev.region(&arena, 4 * o, len, *t)? })
            })
            .collect::<Result<Vec<_>>>()?;
        let weight_bytes = convs.iter().map(|c| conv_bytes(dev, c)).sum();
        Ok(Built { steps, convs, affines, slots, vals, arena_bytes, slot_bytes, weight_bytes, input, output, arena })
    }
}

impl<D: Device> GpuPlan<D> {
    /// Replays the forward pass as one graph recorded at the next run (`true`, the default), or
    /// queues its launches one by one (`false`: for comparing the two, and for profilers that
    /// follow single launches).
    pub fn set_graph(&mut self, on: bool) {
        self.graphs.iter_mut().for_each(|g| drop(g.take()));
        self.use_graph = on;
    }

    pub fn uses_graph(&self) -> bool {
        self.use_graph
    }

    /// Runs every convolution the wgmma kernel takes ([`tensor_conv::wgmma_supports`]: stride 1,
    /// Cout a multiple of 64) on it (`true`), or all on mma.sync (`false`, the default), in tf32,
    /// fp16 or bf16. Returns how many convolutions use wgmma; an error on a device without it, or
    /// in fp32 (CUDA cores, no tensor cores). The same weights serve both kernels.
    pub fn set_wgmma(&mut self, on: bool) -> Result<usize> {
        if on && !self.device().has_wgmma() {
            return Err(Error::backend(self.device().name(), "--wgmma: needs an sm_90 GPU (H100 / H200)"));
        }
        if on && self.precision == Precision::Fp32 {
            return Err(Error::Input("--wgmma: a tensor-core option (--precision tf32, fp16 or bf16), not fp32".into()));
        }
        self.wgmma = on;
        self.retile();
        Ok(self.wgmma_convs())
    }

    /// Runs the tensor-core convolutions not on wgmma with warp tile `t`; returns how many. An
    /// error in fp32 (no tensor cores).
    pub fn set_mma_tile(&mut self, t: MmaTile) -> Result<usize> {
        if self.precision == Precision::Fp32 {
            return Err(Error::Input("--warp-tile: a tensor-core option (--precision tf32, fp16 or bf16), not fp32".into()));
        }
        self.mma_tile = t;
        self.retile();
        Ok(self.convs.iter().filter(|c| matches!(c, Conv::Tc(tc) if tc.tile != WarpTile::Wgmma)).count())
    }

    /// Gives every tensor-core convolution its kernel from the plan's choices: wgmma where it is on
    /// and takes the conv, else mma.sync in the plan's warp tile. The graphs recorded with the old
    /// kernels are dropped (the next run records new ones).
    fn retile(&mut self) {
        self.graphs.iter_mut().for_each(|g| drop(g.take()));
        for c in &mut self.convs {
            if let Conv::Tc(tc) = c {
                let wg = self.wgmma && tensor_conv::wgmma_supports(&tc.spec).is_none();
                tc.tile = if wg { WarpTile::Wgmma } else { self.mma_tile.warp_tile() };
            }
        }
    }

    /// How many convolutions run on wgmma ([`GpuPlan::set_wgmma`]).
    pub fn wgmma_convs(&self) -> usize {
        self.convs.iter().filter(|c| matches!(c, Conv::Tc(tc) if tc.tile == WarpTile::Wgmma)).count()
    }

    /// The volume size this plan runs.
    pub fn size(&self) -> [usize; 3] {
        self.vals[self.input].shape.d
    }

    pub fn device(&self) -> &D {
        self.gpu.device()
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Kernel launches of one forward pass of a batch (at most: empty values launch nothing).
    pub fn launches(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match *s {
                Step::Conv { conv, res, act, .. } => match self.convs[conv] {
                    Conv::F32 { .. } => 1 + (res.is_some() || act == Act::Relu) as usize + (act == Act::Sigmoid) as usize,
                    Conv::Tc(_) => 1 + (act == Act::Sigmoid) as usize,
                },
                _ => 1,
            })
            .sum()
    }

    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes
    }

    /// The device memory of the values: the arena and the two slots' inputs and outputs (what
    /// grows with the batch; the weights do not).
    pub fn device_bytes(&self) -> usize {
        self.arena_bytes + self.slot_bytes
    }

    /// One line: precision, batch, steps, launches and memory.
    pub fn summary(&self) -> String {
        format!(
            "gpu plan: {}, batch {}, {} steps ({} convs{}, {} launches per batch, {}), arena {:.1} MiB + in/out slots {:.1} MiB + weights {:.1} MiB",
            self.precision.name(),
            self.batch,
            self.steps.len(),
            self.convs.len(),
            match (self.wgmma_convs(), self.mma_tile) {
                (0, MmaTile::M32) => String::new(),
                (0, t) => format!(", warp tile {}", t.name()),
                (n, MmaTile::M32) => format!(", {n} on wgmma"),
                (n, t) => format!(", {n} on wgmma, the others warp tile {}", t.name()),
            },
            self.launches(),
            if self.uses_graph() { "replayed as one graph" } else { "queued one by one" },
            self.arena_bytes as f64 / 1048576.0,
            self.slot_bytes as f64 / 1048576.0,
            self.weight_bytes as f64 / 1048576.0
        )
    }

    /// N raw 1-channel volumes (channels-last) in, the head output out, `batch` volumes at a time
    /// (a last, partial batch is padded with zeros), two batches in flight ([`GpuPlan::submit`]):
    /// batch k+1 is queued before batch k is collected.
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let os = self.vals[self.output].shape;
        let (per_in, per_out) = (x.shape.voxels(), os.len() / self.batch);
        let mut out = Tensor::zeros(Shape::new(x.shape.n, os.d, os.c));
        let mut pending: Option<(Ticket, usize)> = None;
        for first in (0..x.shape.n).step_by(self.batch) {
            let m = self.batch.min(x.shape.n - first);
            let queued = self.submit_values(m, |host| host.copy_from_slice(&x.data[first * per_in..(first + m) * per_in]));
            if let Some((t, f)) = pending.take() {
                // collected even when the queueing failed: the slot is free again for a later run
                let y = &mut out.data[f * per_out..(f + t.n) * per_out];
                self.collect_values_into(t, y)?;
            }
            pending = Some((queued?, first));
        }
        if let Some((t, f)) = pending {
            let y = &mut out.data[f * per_out..(f + t.n) * per_out];
            self.collect_values_into(t, y)?;
        }
        crate::finite::plain(out)
    }

    /// Queues up to `batch` volumes (zero-padded to the batch) and returns at once: the host fills
    /// a slot's pinned memory and uploads it on the upload queue, the forward pass waits for the
    /// upload on the compute queue, the download waits for the forward pass on the download
    /// queue. Two batches may be in flight (two slots); a third is refused until one is
    /// [collected](GpuPlan::collect).
    ///
    /// Why the two slots never race: a slot is refilled only after the host has collected the
    /// batch it held, and that collection waited for its download, which waited for its forward
    /// pass, which waited for its upload. So the next upload into the slot, the next forward pass
    /// and the next download are all ordered after its last use (the emulator checks each order).
    pub fn submit(&self, x: &Tensor) -> Result<Ticket> {
        self.check_input(x)?;
        self.submit_with(x.shape.n, |host| host.copy_from_slice(&x.data))
    }

    /// [`GpuPlan::submit`] of `n` volumes that `fill` writes straight into the pinned host memory
    /// they are uploaded from (`n` volumes' values, channels-last; the rest of the batch is zeroed).
    pub fn submit_with(&self, n: usize, fill: impl FnOnce(&mut [f32])) -> Result<Ticket> {
        if n == 0 || n > self.batch {
            return Err(Error::Shape(format!("this GPU plan takes batches of 1 to {} volumes, got {n}", self.batch)));
        }
        self.submit_values(n, fill)
    }

    /// Waits for a batch queued by [`GpuPlan::submit`] and returns its outputs (its `n` volumes).
    pub fn collect(&self, t: Ticket) -> Result<Tensor> {
        let mut y = Tensor::default();
        self.collect_into(t, &mut y)?;
        Ok(y)
    }

    /// [`GpuPlan::collect`] into `y`, reusing its memory.
    pub fn collect_into(&self, t: Ticket, y: &mut Tensor) -> Result<()> {
        self.collect_with(t, |shape, v| {
            y.shape = shape;
            y.data.clear();
            y.data.extend_from_slice(v);
            Ok(())
        })
    }

    /// [`GpuPlan::collect`] handing the batch's outputs (its `n` volumes, checked finite) to `take`
    /// straight from the pinned host memory they were downloaded into.
    pub fn collect_with<R>(&self, t: Ticket, take: impl FnOnce(Shape, &[f32]) -> Result<R>) -> Result<R> {
        let os = self.vals[self.output].shape;
        let shape = Shape::new(t.n, os.d, os.c);
        self.collect_values(t, |v| {
            let v = &v[..shape.len()];
            crate::finite::check_values(shape, v)?;
            take(shape, v)
        })
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let ins = self.vals[self.input].shape;
        if x.shape.c != 1 || x.shape.d != ins.d {
            return Err(Error::Shape(format!("this GPU plan runs 1-channel {:?} volumes, got {}", ins.d, x.shape)));
        }
        if x.data.len() != x.shape.len() {
            return Err(Error::Shape(format!("{} needs {} values, got {}", x.shape, x.shape.len(), x.data.len())));
        }
        Ok(())
    }

    /// Queues `n` volumes, written by `fill` into a free slot's pinned memory, through that slot:
    /// upload, forward, download.
    fn submit_values(&self, n: usize, fill: impl FnOnce(&mut [f32])) -> Result<Ticket> {
        let mut staging = self.staging.borrow_mut();
        let staging = match &mut *staging {
            Some(s) => s,
            None => staging.insert([self.staging_slot()?, self.staging_slot()?]),
        };
        let Some(s) = (0..2).find(|&s| staging[s].downloaded.is_none()) else {
            return Err(Error::Other("gpu plan: two batches are in flight already: collect one before queueing another".into()));
        };
        let (dev, slot, st) = (self.device(), &self.slots[s], &mut staging[s]);
        let host = dev.pinned_mut(&mut st.input)?;
        let len = n * self.vals[self.input].shape.len() / self.batch;
        fill(&mut host[..len]);
        host[len..].fill(0.0);
        dev.upload(&mut st.input, &slot.input.data)?;
        dev.wait(Queue::Compute, &dev.record(Queue::Upload)?)?;
        self.exec(s)?;
        dev.wait(Queue::Download, &dev.record(Queue::Compute)?)?;
        dev.download(&slot.output.data, &mut st.output)?;
        st.downloaded = Some(dev.record(Queue::Download)?);
        Ok(Ticket { plan: self.id, slot: s, n })
    }

    /// Waits for the download of ticket `t`'s slot, frees the slot and hands its pinned output
    /// memory (the whole batch's) to `take`.
    fn collect_values<R>(&self, t: Ticket, take: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        if t.plan != self.id {
            return Err(Error::Other("gpu plan: a batch collected from another plan than the one that queued it".into()));
        }
        let dev = self.device();
        let mut staging = self.staging.borrow_mut();
        let Some(st) = staging.as_mut().map(|s| &mut s[t.slot]) else {
            return Err(Error::Other("gpu plan: a batch collected before any was queued".into()));
        };
        let e = st.downloaded.take().ok_or_else(|| Error::Other("gpu plan: a batch collected twice".into()))?;
        dev.host_wait(&e)?;
        take(dev.pinned_ref(&st.output)?)
    }

    /// [`GpuPlan::collect_values`] copying the batch's first `y.len()` values into `y`.
    fn collect_values_into(&self, t: Ticket, y: &mut [f32]) -> Result<()> {
        self.collect_values(t, |v| {
            y.copy_from_slice(&v[..y.len()]);
            Ok(())
        })
    }

    fn staging_slot(&self) -> Result<Staging<D>> {
        let dev = self.device();
        let (i, o) = (self.slots[0].input.shape.len(), self.slots[0].output.shape.len());
        Ok(Staging { input: dev.alloc_pinned(i)?, output: dev.alloc_pinned(o)?, downloaded: None })
    }

    /// Queues one forward pass of slot `s` on the compute queue: its graph replayed (recorded at
    /// its first use), or the launches queued.
    fn exec(&self, s: usize) -> Result<()> {
        if !self.use_graph {
            return self.launch_steps(s);
        }
        if self.graphs[s].get().is_none() {
            let graph = self.device().capture(&mut || self.launch_steps(s))?;
            let _ = self.graphs[s].set(graph);
        }
        let graph = self.graphs[s].get().ok_or_else(|| Error::Other("gpu plan: no graph after its capture".into()))?;
        self.device().replay(graph)
    }

    /// Queues every step's launches (no allocation, copy or synchronisation: a graph records this).
    fn launch_steps(&self, s: usize) -> Result<()> {
        let (g, dev, slot) = (&self.gpu, self.gpu.device(), &self.slots[s]);
        let v = |i: V| match i {
            _ if i == self.input => &slot.input,
            _ if i == self.output => &slot.output,
            _ => &self.vals[i],
        };
        for st in &self.steps {
            match *st {
                Step::Conv { x, conv, out, res, act } => match &self.convs[conv] {
                    Conv::F32 { spec, w, b } => {
                        g.conv3d_into(v(x), w, b.as_ref(), spec, v(out))?;
                        match res {
                            Some(r) => g.add_into(v(out), v(r), act == Act::Relu, v(out))?,
                            None if act == Act::Relu => g.relu_into(v(out), v(out))?,
                            None => {}
                        }
                        if act == Act::Sigmoid {
                            g.sigmoid_into(v(out), v(out))?;
                        }
                    }
                    Conv::Tc(tc) => {
                        let ep = Epilogue { residual: res.map(v), relu: act == Act::Relu, out: dev.buf_dtype(&v(out).data) };
                        conv3d_tc_into(dev, tc, v(x), &ep, v(out))?;
                        if act == Act::Sigmoid {
                            g.sigmoid_into(v(out), v(out))?;
                        }
                    }
                },
                Step::Affine { x, aff, out } => g.channel_affine_into(v(x), &self.affines[aff].0, &self.affines[aff].1, false, v(out))?,
                Step::Add { a, b, out } => g.add_into(v(a), v(b), false, v(out))?,
                Step::Relu { x, out } => g.relu_into(v(x), v(out))?,
                Step::Sigmoid { x, out } => g.sigmoid_into(v(x), v(out))?,
                Step::Upsample { x, out } => g.upsample_into(v(x), v(out))?,
                Step::UpAdd { skip, low, out } => g.upsample_add_into(v(skip), v(low), v(out))?,
                Step::MaxPool { x, out } => g.maxpool2_into(v(x), v(out))?,
                Step::Convert { x, out } => convert::convert_to(dev, v(x), v(out))?,
            }
        }
        Ok(())
    }
}

fn next_plan_id() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// An error when the device reports less free memory than the arena needs (with room for the
/// driver's own), said before allocating, with what would fit.
fn check_device_memory<D: Device>(dev: &D, arena_bytes: usize, batch: usize) -> Result<()> {
    const HEADROOM: usize = 256 << 20;
    let Some((free, total)) = dev.memory_info() else { return Ok(()) };
    if arena_bytes + HEADROOM <= free {
        return Ok(());
    }
    let per_volume = arena_bytes / batch;
    let fits = free.saturating_sub(HEADROOM) / per_volume.max(1);
    Err(Error::Input(format!(
        "the GPU plan for a batch of {batch} needs {:.0} MiB of device memory and {} MiB to spare, but {} has {:.0} MiB free of {:.0} MiB: use --batch {} or fewer",
        arena_bytes as f64 / 1048576.0,
        HEADROOM >> 20,
        dev.name(),
        free as f64 / 1048576.0,
        total as f64 / 1048576.0,
        fits.max(1)
    )))
}

fn conv_bytes<D: Device>(dev: &D, c: &Conv<D::Buf>) -> usize {
    let b = |buf: &D::Buf| dev.buf_len(buf) * dev.buf_dtype(buf).bytes();
    match c {
        Conv::F32 { w, b: bias, .. } => b(w) + bias.as_ref().map_or(0, b),
        Conv::Tc(tc) => b(tc.weights()) + 4 * tc.spec.cout,
    }
}
