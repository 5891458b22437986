//! One table of every graph op on every engine, in the spirit of ggml's `test-backend-ops`: each op
//! of `graph::Op` x {op-by-op CPU (the reference), plan kernels (every ISA this CPU has, with the
//! conv epilogues), emulator (every conv variant, two thread schedules), CUDA when present (every
//! conv variant, run twice)} x {forward, backward where it has one}, on odd shapes and every conv
//! shape the network uses, printing op / case / shape / engine / error / tolerance / bits.
//! Tolerance: float32, max|a-e| / max(1, max|e|) <= 1e-5 (one rounding per accumulated term over
//! at most a few hundred terms; the reductions over a batch, weight and batch-norm gradients,
//! measured at most 5e-7, are held to the same bound). Where an engine is claimed to compute
//! exactly what the CPU does (`claimed` below) the table asserts bit equality instead; a second
//! run (the emulator under the reverse thread schedule, CUDA again) must give the first run's
//! bits: a difference is a race or an order-dependent reduction.
//! What stays elsewhere checks something else: the CPU against float64 loops and its error
//! paths (cpu_ops.rs), adjoint and finite-difference gradients (train_ops.rs), the GPU launch
//! layer's shape errors and conv throughput (gpu_ops.rs), the plan's fusions (plan.rs, graph.rs).
mod common;
use common::{cuda_device_or_skip, same_bits, same_pad_conv, values};
use deepis::backend::{Backend, ConvSpec};
use deepis::cpu::CpuBackend;
use deepis::gpu::cuda::CudaDevice;
use deepis::gpu::emu::{EmuDevice, Schedule};
use deepis::gpu::ops::{ConvVariant, GpuBackend};
use deepis::gpu::Device;
use deepis::plan::kernel::{self, Act, Isa, PackedConv};
use deepis::plan::ops as pops;
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::train::TrainBackend;

const TOL: f32 = 1e-5;

#[derive(Clone, Copy, Debug)]
enum Op {
    Conv(ConvSpec, bool),
    /// Forward: x * scale + shift (eval batch norm, input scaling); backward: training-mode batch norm.
    Affine { relu: bool },
    Relu,
    /// Forward: a + b; backward: the tape's gradient fan-out and fan-in (duplicate, accumulate).
    Add { relu: bool },
    MaxPool,
    Upsample([usize; 3]),
    Sigmoid,
    Softmax,
    /// x * mask; its backward is the same op on the gradient.
    Dropout,
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Conv(..) => "conv",
            Op::Affine { .. } => "affine",
            Op::Relu => "relu",
            Op::Add { .. } => "add",
            Op::MaxPool => "maxpool",
            Op::Upsample(_) => "upsample",
            Op::Sigmoid => "sigmoid",
            Op::Softmax => "softmax",
            Op::Dropout => "dropout",
        }
    }

    fn detail(&self) -> String {
        match self {
            Op::Conv(s, bias) => {
                format!("{}x{}x{} s{} {}->{}{}", s.k[0], s.k[1], s.k[2], s.stride[0], s.cin, s.cout, if *bias { "" } else { " nobias" })
            }
            Op::Affine { relu } | Op::Add { relu } if *relu => "relu".into(),
            Op::Upsample(size) => format!("-> {size:?}"),
            _ => String::new(),
        }
    }
}

/// How a case's input is drawn from values in [-1, 1).
#[derive(Clone, Copy, Debug)]
enum Input {
    Scaled(f32),
    /// 3 v + 1.5: an offset mean, as a conv output before batch norm has.
    Offset,
    /// Three levels, so that 2x2x2 windows hold ties (the first maximum takes the gradient);
    /// `nan` puts a NaN and a -inf in.
    Ties { nan: bool },
}

#[derive(Clone, Copy, Debug)]
struct Case {
    op: Op,
    x: Shape,
    input: Input,
}

fn case(op: Op, x: Shape, input: Input) -> Case {
    Case { op, x, input }
}

fn conv(cin: usize, cout: usize, k: [usize; 3], stride: usize, bias: bool, d: [usize; 3], n: usize) -> Case {
    case(Op::Conv(same_pad_conv(cin, cout, k, stride), bias), Shape::new(n, d, cin), Input::Scaled(1.0))
}

/// Every conv shape of the network (small channel counts), the plan microkernels' register-block
/// edges, odd sizes.
fn conv_cases() -> Vec<Case> {
    let d = [5, 6, 7];
    let k1 = [1, 1, 1];
    let k3 = [3, 3, 3];
    let mut v = vec![
        conv(1, 8, k3, 1, true, d, 2),        // conv1's first conv (cin 1)
        conv(6, 20, k3, 1, true, d, 2),       // 3x3x3 s1 p1
        conv(5, 3, k3, 1, false, d, 1),       // classifier conv: no bias, small cout
        conv(24, 70, k3, 1, false, d, 1),     // several K steps, a partial second cout tile
        conv(6, 20, k3, 2, true, d, 2),       // bottleneck conv3 stride 2, odd sizes
        conv(5, 7, k3, 2, true, [7, 4, 5], 1), // stride 2, odd and even sizes
        conv(3, 4, k3, 2, true, [7, 6, 5], 1),
        conv(3, 5, k3, 1, true, [5, 7, 3], 2),
        conv(20, 24, k1, 1, true, d, 2),      // reduce / increase / gcn1 / ConBR c1
        conv(20, 24, k1, 2, true, d, 2),      // projection stride 2
        conv(17, 1, k1, 1, true, d, 1),       // distance head: cout 1
        conv(8, 3, k1, 1, true, d, 2),        // classifier 1x1 -> 3 classes
        conv(3, 2, k1, 1, false, [5, 7, 3], 2),
        conv(3, 6, [1, 5, 1], 1, true, [5, 7, 3], 2),
    ];
    for k in [3, 7] {
        v.push(conv(6, 16, [k, 1, 1], 1, true, [9, 5, 6], 2)); // gcn (k,1,1)
        v.push(conv(16, 16, [1, 1, k], 1, true, [5, 6, 9], 1)); // gcn (1,1,k)
        v.push(conv(16, 5, [1, k, 1], 1, true, [6, 9, 5], 1)); // gcn (1,k,1), small cout
    }
    // the plan's microkernels: channels not a multiple of the vector width, lines longer than a
    // tile, a kernel longer than the line
    let plan: [(usize, usize, [usize; 3], usize, [usize; 3]); 14] = [
        (1, 19, k3, 1, [5, 4, 7]),
        (7, 64, k3, 1, [3, 5, 13]),
        (13, 37, k3, 2, [5, 7, 9]),
        (16, 80, k3, 2, [4, 3, 11]),
        (9, 70, k1, 1, [3, 4, 29]),
        (33, 1, k1, 1, [2, 3, 7]),
        (10, 48, k1, 2, [5, 5, 5]),
        (12, 20, [7, 1, 1], 1, [9, 3, 5]),
        (12, 20, [1, 1, 7], 1, [3, 2, 11]),
        (12, 20, [1, 7, 1], 1, [2, 9, 5]),
        (5, 17, [3, 1, 1], 1, [4, 3, 3]),
        (5, 17, [1, 1, 3], 1, [2, 2, 3]),
        (5, 130, [1, 3, 1], 1, [2, 5, 14]),
        (3, 8, [1, 1, 7], 1, [1, 1, 2]),
    ];
    v.extend(plan.iter().map(|&(cin, cout, k, s, d)| conv(cin, cout, k, s, true, d, 2)));
    v
}

fn cases() -> Vec<Case> {
    let s = Shape::new(2, [5, 6, 7], 5);
    let odd = Shape::new(2, [5, 7, 3], 3);
    let x4 = Input::Scaled(4.0);
    let up = |from: Shape, size| case(Op::Upsample(size), from, x4);
    let mut v = conv_cases();
    v.extend([
        case(Op::Affine { relu: false }, s, Input::Offset),
        case(Op::Affine { relu: false }, Shape::new(2, [9, 11, 13], 37), Input::Offset), // two channel groups, 5 chunks
        case(Op::Affine { relu: false }, Shape::new(1, [3, 1, 2], 3), Input::Offset),
        case(Op::Affine { relu: false }, odd, x4),
        case(Op::Affine { relu: true }, s, x4),
        case(Op::Relu, s, x4),
        case(Op::Relu, odd, x4),
        case(Op::Add { relu: false }, s, x4),
        case(Op::Add { relu: false }, odd, x4),
        case(Op::Add { relu: true }, s, x4),
        case(Op::MaxPool, s, Input::Ties { nan: false }),
        case(Op::MaxPool, Shape::new(1, [2, 3, 9], 3), x4),
        case(Op::MaxPool, Shape::new(1, [2, 3, 9], 3), Input::Ties { nan: true }),
        case(Op::MaxPool, Shape::new(1, [5, 6, 7], 3), x4),
        up(Shape::new(2, [3, 4, 5], 3), [5, 7, 9]),
        up(Shape::new(1, [3, 4, 5], 4), [6, 8, 10]), // the decoder's 2x
        up(Shape::new(1, [1, 4, 1], 4), [3, 4, 2]),
        up(Shape::new(1, [3, 2, 4], 2), [1, 5, 4]),  // down-sampling, target size 1
        up(Shape::new(1, [5, 6, 7], 2), [5, 6, 7]),  // identity
        up(odd, [9, 13, 6]),
        case(Op::Sigmoid, s, Input::Scaled(12.0)), // saturated
        case(Op::Sigmoid, s, Input::Scaled(6.0)),
        case(Op::Sigmoid, odd, x4),
        case(Op::Softmax, odd, x4),
        case(Op::Softmax, Shape::new(2, [5, 6, 7], 3), Input::Scaled(8.0)),
        case(Op::Softmax, Shape::new(1, [3, 2, 5], 2), Input::Scaled(8.0)),
        case(Op::Softmax, Shape::new(1, [3, 2, 5], 1), Input::Scaled(8.0)),
        case(Op::Dropout, s, x4),
    ]);
    v
}

fn input(c: &Case, seed: u64) -> Tensor {
    let v = values(c.x.len(), seed);
    let mut data: Vec<f32> = match c.input {
        Input::Scaled(k) => v.iter().map(|x| x * k).collect(),
        Input::Offset => v.iter().map(|x| 3.0 * x + 1.5).collect(),
        Input::Ties { .. } => v.iter().map(|x| (x * 1.5).round()).collect(),
    };
    if let Input::Ties { nan: true } = c.input {
        data[c.x.c + 1] = f32::NAN;
        data[7 * c.x.c] = f32::NEG_INFINITY;
    }
    Tensor::new(c.x, data).unwrap()
}

/// Named outputs of one run (a forward has one, named "").
type Parts = Vec<(&'static str, Vec<f32>)>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Forward,
    Backward,
}

/// The op of `c` in direction `dir` on any backend (None where it has no such direction).
/// Inputs and parameters are drawn from `seed`, the same on every engine.
fn run<B: TrainBackend>(b: &B, c: &Case, seed: u64, dir: Dir) -> Option<Parts> {
    let s = c.x;
    let x = b.upload(&input(c, seed)).unwrap();
    let p = |len: usize, k: u64| b.upload_param(&values(len, seed + k)).unwrap();
    let t = |shape: Shape, k: u64| b.upload(&Tensor::new(shape, values(shape.len(), seed + k)).unwrap()).unwrap();
    let y = |v: deepis::Result<deepis::backend::DevTensor<B::S>>| b.download(&v.unwrap()).unwrap().data;
    let pv = |v: deepis::Result<B::S>| b.download_param(&v.unwrap()).unwrap();
    if dir == Dir::Forward {
        let out = match c.op {
            Op::Conv(spec, bias) => {
                let bv = p(spec.cout, 2);
                b.conv3d(&x, &p(spec.weight_len(), 1), if bias { Some(&bv) } else { None }, &spec)
            }
            Op::Affine { relu } => b.channel_affine(&x, &p(s.c, 1), &p(s.c, 2), relu),
            Op::Relu => b.relu(&x),
            Op::Add { relu } => b.add(&x, &t(s, 1), relu),
            Op::MaxPool => b.maxpool2(&x),
            Op::Upsample(size) => b.upsample(&x, size),
            Op::Sigmoid => b.sigmoid(&x),
            Op::Softmax => b.softmax(&x),
            Op::Dropout => b.mul(&x, &t(s, 1)),
        };
        return Some(vec![("", y(out))]);
    }
    let dy = |shape: Shape| t(shape, 3);
    Some(match c.op {
        Op::Conv(spec, bias) => {
            let w = p(spec.weight_len(), 1);
            let g = dy(Shape::new(s.n, spec.out_dims(s.d), spec.cout));
            let mut v = vec![("dx", y(b.conv3d_backward_input(&g, &w, &spec, s.d))), ("dw", pv(b.conv3d_backward_weight(&x, &g, &spec)))];
            if bias {
                v.push(("db", pv(b.conv3d_backward_bias(&g))));
            }
            v
        }
        Op::Affine { relu: false } => {
            let gamma = p(s.c, 1);
            let (out, saved) = b.batch_norm_train(&x, &gamma, &p(s.c, 2), 1e-5).unwrap();
            let (dx, dg, db) = b.batch_norm_backward(&dy(s), &x, &gamma, &saved).unwrap();
            let (mean, invstd, var) = (pv(Ok(saved.mean)), pv(Ok(saved.invstd)), pv(Ok(saved.var)));
            vec![("y", y(Ok(out))), ("mean", mean), ("invstd", invstd), ("var", var), ("dx", y(Ok(dx))), ("dgamma", pv(Ok(dg))), ("dbeta", pv(Ok(db)))]
        }
        Op::Relu => vec![("dx", y(b.relu_backward(&dy(s), &b.relu(&x).unwrap())))],
        Op::Sigmoid => vec![("dx", y(b.sigmoid_backward(&dy(s), &b.sigmoid(&x).unwrap())))],
        Op::Softmax if s.c > 1 => vec![("dx", y(b.softmax_backward(&dy(s), &b.softmax(&x).unwrap())))],
        Op::MaxPool => vec![("dx", y(b.maxpool2_backward(&dy(s.with_d(s.d.map(|v| v / 2))), &x)))],
        Op::Upsample(size) => vec![("dx", y(b.upsample_backward(&dy(s.with_d(size)), s.d)))],
        Op::Add { relu: false } => {
            let mut acc = b.duplicate(&x).unwrap();
            b.accumulate(&mut acc, &t(s, 1)).unwrap();
            let mut pa = p(37, 2);
            b.accumulate_param(&mut pa, &p(37, 3)).unwrap();
            vec![("duplicate+accumulate", y(Ok(acc))), ("duplicate (source kept)", y(Ok(x))), ("accumulate_param", pv(Ok(pa)))]
        }
        // the gradient of a softmax over one channel is 0
        Op::Affine { relu: true } | Op::Add { relu: true } | Op::Softmax | Op::Dropout => return None,
    })
}

/// What the plan applies after a conv: nothing, a residual add then ReLU, or a sigmoid.
const EPILOGUES: [(&str, bool, Act); 3] = [("conv", false, Act::None), ("conv+res+relu", true, Act::Relu), ("conv+sigmoid", false, Act::Sigmoid)];

/// The forward op on the plan's kernels built for `isa`, with epilogue `epi` for a conv (None where
/// the plan has no kernel of its own: max-pool is the CPU's function, softmax and dropout are not
/// inference steps).
fn run_plan(c: &Case, seed: u64, isa: Isa, epi: (bool, Act)) -> Option<Vec<f32>> {
    let s = c.x;
    let x = input(c, seed);
    let mut y = x.data.clone();
    match c.op {
        Op::Conv(spec, bias) => {
            let b = values(spec.cout, seed + 2);
            let pc = PackedConv::new(spec, &values(spec.weight_len(), seed + 1), if bias { Some(&b) } else { None }, isa);
            let os = Shape::new(s.n, spec.out_dims(s.d), spec.cout);
            let mut out = vec![f32::NAN; os.len()];
            let res = epi.0.then(|| values(os.len(), seed + 4));
            kernel::conv3d(&pc, &x.data, s, &mut out, res.as_deref(), epi.1);
            return Some(out);
        }
        Op::Affine { relu } => pops::affine(&mut y, &values(s.c, seed + 1), &values(s.c, seed + 2), relu),
        Op::Relu => pops::relu_inplace(&mut y),
        Op::Add { relu } => pops::add(&mut y, &values(s.len(), seed + 1), relu),
        Op::Sigmoid => pops::sigmoid_inplace(&mut y),
        Op::Upsample(size) => {
            // the plan up-samples into an add: onto zeros, it is the up-sampling
            let os = s.with_d(size);
            let mut out = vec![0.0; os.len()];
            let (i, o) = (s.voxels() * s.c, os.voxels() * os.c);
            for n in 0..s.n {
                pops::upsample_add(&mut out[n * o..(n + 1) * o], Shape::new(1, size, s.c), &x.data[n * i..(n + 1) * i], Shape::new(1, s.d, s.c));
            }
            return Some(out);
        }
        Op::MaxPool | Op::Softmax | Op::Dropout => return None,
    }
    Some(y)
}

/// The CPU reference of a plan conv with epilogue: conv, then add + ReLU, or sigmoid.
fn cpu_epilogue(cpu: &CpuBackend, c: &Case, seed: u64, conv: &[f32], (res, act): (bool, Act)) -> Vec<f32> {
    let Op::Conv(spec, _) = c.op else { unreachable!() };
    let os = Shape::new(c.x.n, spec.out_dims(c.x.d), spec.cout);
    let y = cpu.upload(&Tensor::new(os, conv.to_vec()).unwrap()).unwrap();
    let out = match (res, act) {
        (true, Act::Relu) => cpu.add(&y, &cpu.upload(&Tensor::new(os, values(os.len(), seed + 4)).unwrap()).unwrap(), true),
        (false, Act::Sigmoid) => cpu.sigmoid(&y),
        _ => Ok(y),
    };
    out.unwrap().data
}

/// `rel_err` over the finite values, where every NaN and infinity must meet the same on the other
/// side (else infinite): the max-pool's NaN case propagates a NaN and a -inf.
fn finite_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let same_class = |a: f32, b: f32| if a.is_finite() || b.is_finite() { a.is_finite() && b.is_finite() } else { a.is_nan() == b.is_nan() && (a.is_nan() || a == b) };
    if !got.iter().zip(want).all(|(&a, &b)| same_class(a, b)) {
        return f32::INFINITY;
    }
    let (g, w): (Vec<f32>, Vec<f32>) = got.iter().zip(want).filter(|(a, _)| a.is_finite()).map(|(&a, &b)| (a, b)).unzip();
    rel_err(&g, &w, 1.0)
}

/// (op, direction, engine) rows asserted bit-identical to the CPU reference: the emulator's direct
/// conv (the same FMA sequence per output as the CPU's line kernel), and the ops that only select
/// or add once.
fn claimed(op: &str, dir: Dir, engine: &str) -> bool {
    let (emu, plan) = (engine.starts_with("emu"), engine.starts_with("plan"));
    match (op, dir) {
        ("conv", Dir::Forward) => engine == "emu:Direct",
        ("relu" | "add", Dir::Forward) => emu || plan,
        ("maxpool", Dir::Forward) | ("relu" | "maxpool", Dir::Backward) => emu,
        _ => false,
    }
}

#[derive(Default)]
struct Table {
    failures: Vec<String>,
    rows: usize,
}

impl Table {
    fn header() {
        println!("{:<34} {:<20} {:<20} {:<18} {:>10} {:>6} {:>6}", "op", "case", "input (NCDHW)", "engine", "rel err", "tol", "bits");
    }

    /// One row per part: `got` against `want`, bit equality where `bits`, else within TOL.
    fn rows(&mut self, c: &Case, op: &str, engine: &str, got: &Parts, want: &Parts, bits: bool) {
        for ((part, g), (_, w)) in got.iter().zip(want) {
            let name = if part.is_empty() { op.to_string() } else { format!("{op} {part}") };
            let err = if g.len() == w.len() { finite_rel_err(g, w) } else { f32::INFINITY };
            let same = same_bits(g, w);
            let tol = if bits { "bits".to_string() } else { format!("{TOL:.0e}") };
            let shape = format!("{:?}", c.x.ncdhw());
            println!("{name:<34} {:<20} {shape:<20} {engine:<18} {err:>10.2e} {tol:>6} {:>6}", c.op.detail(), if same { "same" } else { "differ" });
            if (bits && !same) || (!bits && !(err <= TOL)) {
                self.failures.push(format!("{name} {} {shape} {engine}: err {err:e}, bits {}", c.op.detail(), if same { "same" } else { "differ" }));
            }
            self.rows += 1;
        }
    }

    fn check(self, what: &str) {
        println!("{what}: {} rows", self.rows);
        assert!(self.failures.is_empty(), "{what}:\n{}", self.failures.join("\n"));
    }
}

fn variants(c: &Case, dir: Dir) -> Vec<Option<ConvVariant>> {
    match c.op {
        // the backward runs the forward conv kernels only for a stride-1 input gradient
        Op::Conv(spec, _) if dir == Dir::Forward || spec.stride == [1; 3] => ConvVariant::ALL.into_iter().map(Some).collect(),
        _ => vec![None],
    }
}

fn engine(name: &str, v: Option<ConvVariant>) -> String {
    v.map_or(name.to_string(), |v| format!("{name}:{v:?}"))
}

/// A GPU engine's rows for one case: every conv variant against the CPU's `want`, then a second
/// run (`again`, or `gpu` itself when None) that must give the same bits as the first.
#[allow(clippy::too_many_arguments)]
fn gpu_rows<D: Device, E: Device>(
    t: &mut Table,
    c: &Case,
    seed: u64,
    dir: Dir,
    want: &Parts,
    (name, gpu): (&str, &mut GpuBackend<D>),
    (again_name, mut again): (&str, Option<&mut GpuBackend<E>>),
) {
    let op = if dir == Dir::Forward { c.op.name().to_string() } else { format!("{}.backward", c.op.name()) };
    for v in variants(c, dir) {
        gpu.set_conv_variant(v);
        let first = run(gpu, c, seed, dir).expect("the CPU ran it");
        let e = engine(name, v);
        t.rows(c, &op, &e, &first, want, claimed(c.op.name(), dir, &e));
        let second = match again.as_deref_mut() {
            Some(g) => {
                g.set_conv_variant(v);
                run(g, c, seed, dir)
            }
            None => run(gpu, c, seed, dir),
        };
        t.rows(c, &op, &engine(again_name, v), &second.unwrap(), &first, true);
    }
    gpu.set_conv_variant(None);
}

fn table(dir: Dir, what: &str) {
    let cpu = CpuBackend::new();
    let mut emu = GpuBackend::new(EmuDevice::with_schedule(Schedule::Forward));
    let mut rev = GpuBackend::new(EmuDevice::with_schedule(Schedule::Reverse));
    let mut cuda = cuda_device_or_skip().map(GpuBackend::new);
    let mut t = Table::default();
    Table::header();
    let t0 = std::time::Instant::now();
    for (i, c) in cases().iter().enumerate() {
        let seed = 1000 * i as u64 + 7;
        let Some(want) = run(&cpu, c, seed, dir) else { continue };
        for (_, w) in &want {
            assert!(w.iter().any(|v| *v != 0.0), "{c:?}: an all-zero reference checks nothing");
        }
        if dir == Dir::Forward {
            for isa in Isa::all_available() {
                for (op, res, act) in EPILOGUES.into_iter().take(if matches!(c.op, Op::Conv(..)) { 3 } else { 1 }) {
                    let Some(got) = run_plan(c, seed, isa, (res, act)) else { continue };
                    let w = if op == "conv" && !res && act == Act::None { want[0].1.clone() } else { cpu_epilogue(&cpu, c, seed, &want[0].1, (res, act)) };
                    let e = format!("plan:{isa:?}");
                    let op = if matches!(c.op, Op::Conv(..)) { op } else { c.op.name() };
                    t.rows(c, op, &e, &vec![("", got)], &vec![("", w)], claimed(op, dir, &e));
                }
            }
        }
        gpu_rows(&mut t, c, seed, dir, &want, ("emu", &mut emu), ("emu reverse", Some(&mut rev)));
        if let Some(g) = cuda.as_mut() {
            gpu_rows(&mut t, c, seed, dir, &want, ("cuda", g), ("cuda again", None::<&mut GpuBackend<CudaDevice>>));
        }
    }
    println!("({:.1} s)", t0.elapsed().as_secs_f64());
    t.check(what);
}

#[test]
fn every_op_forward_on_every_engine() {
    table(Dir::Forward, "forward");
}

#[test]
fn every_op_backward_on_every_engine() {
    table(Dir::Backward, "backward");
}
