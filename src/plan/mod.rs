//! The fused CPU inference plan: the network compiled once, for one volume size, into a list of
//! steps over one pre-planned arena (peak memory known before the run).
//!
//! The plan lowers the inference graph (`graph::Graph`) after the passes of `graph::passes`
//! (each switchable in `PlanOptions::passes`, all on by default; the tests check that every switch
//! leaves the output unchanged):
//! - `fold_bn`: eval-mode batch norm folded into the conv's weights and bias;
//! - `fuse_epilogue`: bias, residual add and ReLU (sigmoid for the head) in the conv's epilogue;
//! - `move_conv1_low`: ConBR.conv1 (1x1x1) of `conv1(up(a) + b)` computed as
//!   `up(conv1_nobias(a)) + conv1(b)`, the first on the low-resolution side (8x fewer voxels);
//! - `merge_1x1`: a 1x1x1 conv that directly follows another conv merged into it (gcn1 and the
//!   moved ConBR.conv1; the GCN's last convs and the moved ConBR.conv1);
//! - `fuse_gcn_planes`: the GCN's two in-plane convs ((1,1,k) then (1,k,1), and (1,k,1) then
//!   (1,1,k)) run plane by plane through a cache-resident buffer instead of a whole tensor;
//! - `reuse_buffers`: values whose lifetimes do not overlap share memory.
//!
//! Convolutions run on the microkernels of `kernel` (AVX-512, AVX2+FMA or portable, chosen at run time).
pub mod graph;
pub mod kernel;
pub mod memory;
pub mod ops;

use crate::error::{Error, Result};
use crate::graph::passes::{Passes, Weighted};
use crate::graph::{Graph, Mode};
use crate::tensor::{Shape, Tensor};
use crate::weights::Weights;
use kernel::{Act, Isa, PackedConv};
use std::sync::Mutex;

/// A value of the plan (an index into its shapes).
pub type V = usize;

/// Which fusions the plan applies: the graph passes, and buffer reuse. `Default` is all on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    pub passes: Passes,
    pub reuse_buffers: bool,
    /// Microkernel build; None = the fastest this CPU has.
    pub isa: Option<Isa>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { passes: Passes::default(), reuse_buffers: true, isa: None }
    }
}

impl PlanOptions {
    /// Every fusion off: the reference graph, step by step (still on the plan's kernels).
    pub fn unfused() -> Self {
        PlanOptions { passes: Passes::none(), reuse_buffers: false, isa: None }
    }
}

/// One step of the plan. In-place steps (`Affine`, `Add`, `Relu`, `Sigmoid`, `UpAdd`) overwrite
/// their first value, which the graph builder only does when no later step needs the old content.
#[derive(Debug)]
pub enum Step {
    Conv { x: V, conv: usize, out: V, res: Option<V>, act: Act },
    /// Two in-plane convs fused plane by plane.
    Pair { x: V, a: usize, b: usize, out: V },
    Affine { x: V, scale: Vec<f32>, shift: Vec<f32>, relu: bool },
    Add { acc: V, other: V, relu: bool },
    Relu { x: V },
    Sigmoid { x: V },
    /// acc += trilinear up-sampling of `low` to acc's size.
    UpAdd { acc: V, low: V },
    MaxPool { x: V, out: V },
}

impl Step {
    fn values(&self) -> Vec<V> {
        match *self {
            Step::Conv { x, out, res, .. } => [Some(x), Some(out), res].into_iter().flatten().collect(),
            Step::Pair { x, out, .. } => vec![x, out],
            Step::Affine { x, .. } | Step::Relu { x } | Step::Sigmoid { x } => vec![x],
            Step::Add { acc, other, .. } => vec![acc, other],
            Step::UpAdd { acc, low } => vec![acc, low],
            Step::MaxPool { x, out } => vec![x, out],
        }
    }
}

/// The network compiled for one volume size.
pub struct Plan {
    size: [usize; 3],
    isa: Isa,
    shapes: Vec<Shape>,
    steps: Vec<Step>,
    convs: Vec<PackedConv>,
    off: Vec<usize>,
    arena_len: usize,
    input: V,
    output: V,
    scratch_bytes: usize,
    /// Allocated on the first run and kept (a run reuses it; concurrent runs wait).
    arena: Mutex<Vec<f32>>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plan({:?}, {} steps, {} convs, {:?})", self.size, self.steps.len(), self.convs.len(), self.isa)
    }
}

impl Plan {
    /// Compiles `weights` for volumes of size `d` (any batch size runs volume by volume).
    pub fn new(weights: &Weights, d: [usize; 3], opt: PlanOptions) -> Result<Plan> {
        weights.config.check_input_size(d)?;
        Plan::from_graph(&Graph::new(&weights.config, Mode::Eval, d), weights, opt)
    }

    /// Compiles the inference graph `g` (any `Arch`) with the tensors of `weights`.
    pub fn from_graph(g: &Graph, weights: &Weights, opt: PlanOptions) -> Result<Plan> {
        let d = g.nodes[g.input].shape.d;
        let isa = opt.isa.unwrap_or_else(Isa::detect);
        if !isa.available() {
            return Err(Error::backend("cpu", format!("this CPU cannot run the {isa:?} kernels")));
        }
        let mut wg = Weighted::new(g, &|name| weights.get(name))?;
        wg.optimise(opt.passes);
        let graph::Lowered { shapes, steps, convs, input, output } = graph::lower(&wg, isa, opt.passes.fuse_epilogue)?;
        let lives = memory::lifetimes(shapes.iter().map(|s| s.len()), steps.iter().map(Step::values), input, output);
        let (off, arena_len) = memory::place(&lives, opt.reuse_buffers);
        debug_assert!(memory::disjoint(&lives, &off));
        let threads = rayon::current_num_threads();
        let mut scratch = 0;
        for st in &steps {
            match *st {
                Step::Conv { x, conv, .. } => scratch = scratch.max(convs[conv].scratch_floats(shapes[x].d)),
                Step::Pair { x, a, b, out } => {
                    let plane = |v: V| shapes[v].d[1] * shapes[v].d[2];
                    let s = convs[a].scratch_floats([1, shapes[x].d[1], shapes[x].d[2]])
                        .max(convs[b].scratch_floats([1, shapes[out].d[1], shapes[out].d[2]]));
                    scratch = scratch.max(s + plane(out) * convs[a].spec.cout);
                }
                _ => {}
            }
        }
        Ok(Plan {
            size: d,
            isa,
            shapes,
            steps,
            convs,
            off,
            arena_len,
            input,
            output,
            scratch_bytes: 4 * scratch * threads,
            arena: Mutex::new(Vec::new()),
        })
    }

    /// Bytes the plan holds while running: the arena of activations, the packed weights and the
    /// threads' scratch (the input and output tensors of `run` are the caller's).
    pub fn peak_bytes(&self) -> usize {
        self.arena_bytes() + self.weight_bytes() + self.scratch_bytes
    }

    pub fn arena_bytes(&self) -> usize {
        4 * self.arena_len
    }

    pub fn weight_bytes(&self) -> usize {
        self.convs.iter().map(PackedConv::bytes).sum()
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// One line: steps, convolutions, ISA and memory.
    pub fn summary(&self) -> String {
        format!(
            "plan: {} steps ({} convs), {:?} kernels, arena {:.1} MiB + weights {:.1} MiB + scratch {:.1} MiB = {:.1} MiB",
            self.steps.len(),
            self.convs.len(),
            self.isa,
            self.arena_bytes() as f64 / 1048576.0,
            self.weight_bytes() as f64 / 1048576.0,
            self.scratch_bytes as f64 / 1048576.0,
            self.peak_bytes() as f64 / 1048576.0
        )
    }

    /// Same semantics as `Network::forward`: N raw 1-channel volumes (channels-last) in, the head
    /// output out (input_offset / input_scale and the sigmoid head included).
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        if x.shape.c != 1 {
            return Err(Error::Shape(format!("the network takes 1-channel volumes, got {} channels", x.shape.c)));
        }
        if x.shape.d != self.size {
            return Err(Error::Shape(format!("this plan was built for {:?} volumes, got {:?}", self.size, x.shape.d)));
        }
        if x.data.len() != x.shape.len() {
            return Err(Error::Shape(format!("{} needs {} values, got {}", x.shape, x.shape.len(), x.data.len())));
        }
        let os = self.shapes[self.output];
        let mut out = Tensor::zeros(Shape::new(x.shape.n, os.d, os.c));
        let mut arena = self.arena.lock().unwrap_or_else(|e| e.into_inner());
        if arena.len() < self.arena_len {
            *arena = vec![0.0; self.arena_len];
        }
        let per_in = x.shape.voxels();
        for n in 0..x.shape.n {
            let (o, len) = (self.off[self.input], self.shapes[self.input].len());
            arena[o..o + len].copy_from_slice(&x.data[n * per_in..(n + 1) * per_in]);
            self.exec(&mut arena);
            let (o, len) = (self.off[self.output], os.len());
            out.data[n * len..(n + 1) * len].copy_from_slice(&arena[o..o + len]);
        }
        crate::finite::plain(out)
    }

    fn exec(&self, arena: &mut [f32]) {
        assert!(arena.len() >= self.arena_len);
        let base = arena.as_mut_ptr();
        let off = &self.off;
        let shapes = &self.shapes;
        // SAFETY (both): value v occupies arena[off[v]..off[v] + len] (inside the arena, by
        // `memory::place`), and values alive at the same step never overlap (`memory::disjoint`),
        // so a step's output or in-place value never aliases any other value it reads.
        let r = |v: V| unsafe { std::slice::from_raw_parts(base.add(off[v]) as *const f32, shapes[v].len()) };
        let w = |v: V| unsafe { std::slice::from_raw_parts_mut(base.add(off[v]), shapes[v].len()) };
        for st in &self.steps {
            match st {
                &Step::Conv { x, conv, out, res, act } => {
                    kernel::conv3d(&self.convs[conv], r(x), shapes[x], w(out), res.map(r), act);
                }
                &Step::Pair { x, a, b, out } => kernel::conv_pair(&self.convs[a], &self.convs[b], r(x), shapes[x], w(out)),
                Step::Affine { x, scale, shift, relu } => ops::affine(w(*x), scale, shift, *relu),
                &Step::Add { acc, other, relu } => ops::add(w(acc), r(other), relu),
                &Step::Relu { x } => ops::relu_inplace(w(x)),
                &Step::Sigmoid { x } => ops::sigmoid_inplace(w(x)),
                &Step::UpAdd { acc, low } => ops::upsample_add(w(acc), shapes[acc], r(low), shapes[low]),
                &Step::MaxPool { x, out } => ops::maxpool2(r(x), shapes[x], w(out), shapes[out]),
            }
        }
    }
}
