//! One table of every graph op on every engine, in the spirit of ggml's `test-backend-ops`: each op
//! of `graph::Op` x {op-by-op CPU (the reference), plan kernels, emulator, CUDA when present} x
//! {forward, backward where it has one}, on odd shapes, printing op / shape / engine / error /
//! tolerance / whether the bits equal the reference's.
//! Tolerance: float32, max|a-e| / max(1, max|e|) <= 1e-5 (one rounding per accumulated term over
//! at most a few hundred terms). Where an engine is claimed to compute exactly what the CPU does,
//! (`BITS` below) the table asserts bit equality instead.
//! This table supersedes the per-engine op lists where they overlapped; what stays elsewhere is
//! engine-specific: conv variants and thread schedules (gpu_ops.rs, gpu_train_ops.rs), float64
//! references and error paths (cpu_ops.rs), adjoint and finite-difference checks (train_ops.rs),
//! the plan's fusions (plan.rs, graph.rs).
mod common;
use common::{cuda_device_or_skip, same_bits, same_pad_conv, values};
use deepis::backend::{Backend, ConvSpec};
use deepis::cpu::CpuBackend;
use deepis::gpu::emu::EmuDevice;
use deepis::gpu::ops::GpuBackend;
use deepis::plan::kernel::{self, Act, Isa, PackedConv};
use deepis::plan::ops as pops;
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::train::TrainBackend;

const TOL: f32 = 1e-5;

/// (op, engine) pairs asserted bit-identical to the CPU reference: the emulator's conv (the same
/// FMA sequence per output as the CPU's line kernel), and the ops that only select or add once.
const BITS: &[(&str, &str)] = &[
    ("conv", "emu"),
    ("relu", "plan"),
    ("relu", "emu"),
    ("add", "plan"),
    ("add", "emu"),
    ("maxpool", "emu"),
    ("relu.backward", "emu"),
    ("maxpool.backward", "emu"),
];

#[derive(Clone, Copy, Debug)]
enum Op {
    Conv(ConvSpec, bool),
    Affine,
    Relu,
    Add,
    MaxPool,
    Upsample([usize; 3]),
    Sigmoid,
    Softmax,
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Conv(..) => "conv",
            Op::Affine => "affine",
            Op::Relu => "relu",
            Op::Add => "add",
            Op::MaxPool => "maxpool",
            Op::Upsample(_) => "upsample",
            Op::Sigmoid => "sigmoid",
            Op::Softmax => "softmax",
        }
    }
}

fn cases() -> Vec<(Op, Shape)> {
    let s = Shape::new(2, [5, 7, 3], 3);
    vec![
        (Op::Conv(same_pad_conv(3, 5, [3, 3, 3], 1), true), s),
        (Op::Conv(same_pad_conv(3, 4, [3, 3, 3], 2), true), Shape::new(1, [7, 6, 5], 3)),
        (Op::Conv(same_pad_conv(3, 6, [1, 5, 1], 1), true), s),
        (Op::Conv(same_pad_conv(3, 2, [1, 1, 1], 1), false), s),
        (Op::Affine, s),
        (Op::Relu, s),
        (Op::Add, s),
        (Op::MaxPool, Shape::new(1, [5, 6, 7], 3)),
        (Op::Upsample([9, 13, 6]), s),
        (Op::Sigmoid, s),
        (Op::Softmax, s),
    ]
}

fn input(s: Shape, seed: u64, scale: f32) -> Tensor {
    Tensor::new(s, values(s.len(), seed).iter().map(|v| v * scale).collect()).unwrap()
}

/// The op on any `Backend`.
fn run<B: Backend>(b: &B, op: Op, s: Shape) -> Tensor {
    let x = b.upload(&input(s, 1, 4.0)).unwrap();
    let p = |len: usize, seed: u64| b.upload_param(&values(len, seed)).unwrap();
    let y = match op {
        Op::Conv(spec, bias) => {
            let (w, bv) = (p(spec.weight_len(), 2), p(spec.cout, 3));
            b.conv3d(&x, &w, if bias { Some(&bv) } else { None }, &spec)
        }
        Op::Affine => b.channel_affine(&x, &p(s.c, 2), &p(s.c, 3), false),
        Op::Relu => b.relu(&x),
        Op::Add => b.add(&x, &b.upload(&input(s, 2, 1.0)).unwrap(), false),
        Op::MaxPool => b.maxpool2(&x),
        Op::Upsample(size) => b.upsample(&x, size),
        Op::Sigmoid => b.sigmoid(&x),
        Op::Softmax => b.softmax(&x),
    };
    b.download(&y.unwrap()).unwrap()
}

/// The op on the plan's kernels (None where the plan has no kernel of its own for it).
fn run_plan(op: Op, s: Shape) -> Option<Tensor> {
    let x = input(s, 1, 4.0);
    let mut y = x.clone();
    match op {
        Op::Conv(spec, bias) => {
            let b = values(spec.cout, 3);
            let pc = PackedConv::new(spec, &values(spec.weight_len(), 2), if bias { Some(&b) } else { None }, Isa::detect());
            let mut out = Tensor::zeros(Shape::new(s.n, spec.out_dims(s.d), spec.cout));
            kernel::conv3d(&pc, &x.data, s, &mut out.data, None, Act::None);
            return Some(out);
        }
        Op::Affine => pops::affine(&mut y.data, &values(s.c, 2), &values(s.c, 3), false),
        Op::Relu => pops::relu_inplace(&mut y.data),
        Op::Add => pops::add(&mut y.data, &input(s, 2, 1.0).data, false),
        Op::Sigmoid => pops::sigmoid_inplace(&mut y.data),
        Op::Upsample(size) => {
            // the plan up-samples into an add: onto zeros, it is the up-sampling
            let os = s.with_d(size);
            let mut out = Tensor::zeros(os);
            for n in 0..s.n {
                let (i, o) = (s.voxels() * s.c, os.voxels() * os.c);
                pops::upsample_add(&mut out.data[n * o..(n + 1) * o], Shape::new(1, size, s.c), &x.data[n * i..(n + 1) * i], Shape::new(1, s.d, s.c));
            }
            return Some(out);
        }
        Op::MaxPool | Op::Softmax => return None,
    }
    Some(y)
}

struct Table {
    failures: Vec<String>,
}

impl Table {
    fn row(&mut self, op: &str, s: Shape, engine: &str, got: &[f32], want: &[f32]) {
        let err = if got.len() == want.len() { rel_err(got, want, 1.0) } else { f32::INFINITY };
        let bits = same_bits(got, want);
        let claimed = BITS.contains(&(op, engine));
        let tol = if claimed { "bits".to_string() } else { format!("{TOL:.0e}") };
        println!("{op:<16} {:<22} {engine:<10} {err:>10.2e} {tol:>6} {:>6}", format!("{:?}", s.ncdhw()), if bits { "same" } else { "differ" });
        if (claimed && !bits) || !(err <= TOL) {
            self.failures.push(format!("{op} {:?} {engine}: err {err:e}, bits {}", s.ncdhw(), if bits { "same" } else { "differ" }));
        }
    }
}

fn header() {
    println!("{:<16} {:<22} {:<10} {:>10} {:>6} {:>6}", "op", "input (NCDHW)", "engine", "rel err", "tol", "bits");
}

#[test]
fn every_op_forward_on_every_engine() {
    let cpu = CpuBackend::new();
    let emu = GpuBackend::new(EmuDevice::new());
    let cuda = cuda_device_or_skip().map(GpuBackend::new);
    let mut t = Table { failures: Vec::new() };
    header();
    for (op, s) in cases() {
        let want = run(&cpu, op, s);
        assert!(want.data.iter().any(|v| *v != 0.0), "{op:?}: an all-zero reference checks nothing");
        if let Some(p) = run_plan(op, s) {
            t.row(op.name(), s, "plan", &p.data, &want.data);
        }
        t.row(op.name(), s, "emu", &run(&emu, op, s).data, &want.data);
        if let Some(c) = &cuda {
            t.row(op.name(), s, "cuda", &run(c, op, s).data, &want.data);
        }
    }
    assert!(t.failures.is_empty(), "{}", t.failures.join("\n"));
}

/// The backward ops of `op` on a `TrainBackend`: every gradient, concatenated.
fn run_backward<B: TrainBackend>(b: &B, op: Op, s: Shape) -> Option<Vec<f32>> {
    let x = b.upload(&input(s, 1, 4.0)).unwrap();
    let p = |len: usize, seed: u64| b.upload_param(&values(len, seed)).unwrap();
    let y = |t| b.download(&t).unwrap().data;
    Some(match op {
        Op::Conv(spec, _) => {
            let dy = b.upload(&input(Shape::new(s.n, spec.out_dims(s.d), spec.cout), 5, 1.0)).unwrap();
            let w = p(spec.weight_len(), 2);
            let mut g = y(b.conv3d_backward_input(&dy, &w, &spec, s.d).unwrap());
            g.extend(b.download_param(&b.conv3d_backward_weight(&x, &dy, &spec).unwrap()).unwrap());
            g.extend(b.download_param(&b.conv3d_backward_bias(&dy).unwrap()).unwrap());
            g
        }
        Op::Affine => {
            // batch norm in training mode: the affine's learnable form
            let (gamma, beta) = (p(s.c, 2), p(s.c, 3));
            let (out, saved) = b.batch_norm_train(&x, &gamma, &beta, 1e-5).unwrap();
            let dy = b.upload(&input(s, 5, 1.0)).unwrap();
            let (dx, dg, db) = b.batch_norm_backward(&dy, &x, &gamma, &saved).unwrap();
            let mut g = y(out);
            g.extend(y(dx));
            g.extend(b.download_param(&dg).unwrap());
            g.extend(b.download_param(&db).unwrap());
            g
        }
        Op::Relu => y(b.relu_backward(&b.upload(&input(s, 5, 1.0)).unwrap(), &b.relu(&x).unwrap()).unwrap()),
        Op::Sigmoid => y(b.sigmoid_backward(&b.upload(&input(s, 5, 1.0)).unwrap(), &b.sigmoid(&x).unwrap()).unwrap()),
        Op::Softmax => y(b.softmax_backward(&b.upload(&input(s, 5, 1.0)).unwrap(), &b.softmax(&x).unwrap()).unwrap()),
        Op::MaxPool => {
            let os = Shape::new(s.n, s.d.map(|v| v / 2), s.c);
            y(b.maxpool2_backward(&b.upload(&input(os, 5, 1.0)).unwrap(), &x).unwrap())
        }
        Op::Upsample(size) => y(b.upsample_backward(&b.upload(&input(s.with_d(size), 5, 1.0)).unwrap(), s.d).unwrap()),
        Op::Add => return None,
    })
}

#[test]
fn every_op_backward_on_every_engine() {
    let cpu = CpuBackend::new();
    let emu = GpuBackend::new(EmuDevice::new());
    let cuda = cuda_device_or_skip().map(GpuBackend::new);
    let mut t = Table { failures: Vec::new() };
    header();
    for (op, s) in cases() {
        let Some(want) = run_backward(&cpu, op, s) else { continue };
        let name = format!("{}.backward", op.name());
        t.row(&name, s, "emu", &run_backward(&emu, op, s).unwrap(), &want);
        if let Some(c) = &cuda {
            t.row(&name, s, "cuda", &run_backward(c, op, s).unwrap(), &want);
        }
    }
    assert!(t.failures.is_empty(), "{}", t.failures.join("\n"));
}
