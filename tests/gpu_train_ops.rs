//! Every `TrainBackend` op of `GpuBackend` (the backward kernels) against `CpuBackend` (the
//! reference, src/train/cpu.rs), on odd shapes, batch 2, every conv shape and stride the model
//! uses: on the host emulator under two thread schedules (which must agree bit for bit: a
//! difference is a race or an order-dependent reduction) and, where one exists, on a real GPU.
//! Error = max|a-e| / max(1, max|e|), tolerance per output (printed with each row).
mod common;
use common::{cuda_device_or_skip, same_bits, same_pad_conv, values};
use deepis::backend::{Backend, ConvSpec, DevTensor};
use deepis::cpu::CpuBackend;
use deepis::gpu::emu::{EmuDevice, Schedule};
use deepis::gpu::ops::{ConvVariant, GpuBackend};
use deepis::gpu::Device;
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::train::TrainBackend;

/// Element-wise and gather outputs: float32 rounding of a few terms.
const TOL: f32 = 1e-5;
/// Sums over every voxel of a batch (weight gradients: float32 chunk sums added in double, as the
/// CPU; bias and BN: double sums). Measured here at most 5e-7, so held to 1e-5 as well; a much
/// larger batch of float32 weight-gradient terms may need 1e-4.
const TOL_RED: f32 = 1e-5;

#[derive(Clone, Debug)]
enum Op {
    /// conv3d_backward_input / _weight / _bias of one conv.
    Conv { spec: ConvSpec, bias: bool },
    /// batch_norm_train, then batch_norm_backward with its saved statistics.
    BatchNorm,
    Relu,
    Sigmoid,
    Softmax,
    MaxPool { nan: bool },
    /// Up-sampling from the case's size to `size`; the gradient has `size`.
    Upsample { size: [usize; 3] },
    /// mul, accumulate, accumulate_param, duplicate.
    Helpers,
}

#[derive(Clone, Debug)]
struct Case {
    op: Op,
    /// The forward op's input shape.
    x: Shape,
}

fn conv(cin: usize, cout: usize, k: [usize; 3], stride: usize, bias: bool, x: [usize; 3], n: usize) -> Case {
    Case { op: Op::Conv { spec: same_pad_conv(cin, cout, k, stride), bias }, x: Shape::new(n, x, cin) }
}

/// The op table: every conv shape of the network (small channel counts), odd spatial sizes.
fn cases() -> Vec<Case> {
    let d = [5, 6, 7];
    let mut v = vec![
        conv(1, 8, [3, 3, 3], 1, true, d, 2),     // conv1 first conv (cin 1), batch 2
        conv(6, 20, [3, 3, 3], 1, true, d, 2),    // 3x3x3 s1 p1, batch 2
        conv(5, 3, [3, 3, 3], 1, false, d, 1),    // classifier conv: no bias, small cout
        conv(24, 70, [3, 3, 3], 1, false, d, 1),  // several K steps, a partial second tile
        conv(6, 20, [3, 3, 3], 2, true, d, 2),    // bottleneck conv3 stride 2, odd sizes, batch 2
        conv(5, 7, [3, 3, 3], 2, true, [7, 4, 5], 1), // stride 2, odd and even sizes
        conv(20, 24, [1, 1, 1], 1, true, d, 2),   // reduce / increase / gcn1 / ConBR c1
        conv(20, 24, [1, 1, 1], 2, true, d, 2),   // projection stride 2, odd sizes
        conv(17, 1, [1, 1, 1], 1, true, d, 1),    // distance head: cout 1
        conv(8, 3, [1, 1, 1], 1, true, d, 2),     // classifier 1x1 -> 3 classes
    ];
    for k in [3, 7] {
        v.push(conv(6, 16, [k, 1, 1], 1, true, [9, 5, 6], 2)); // gcn (k,1,1)
        v.push(conv(16, 16, [1, 1, k], 1, true, [5, 6, 9], 1)); // gcn (1,1,k)
        v.push(conv(16, 5, [1, k, 1], 1, true, [6, 9, 5], 1)); // gcn (1,k,1), small cout
    }
    let s = Shape::new(2, [5, 6, 7], 5);
    v.extend([
        Case { op: Op::BatchNorm, x: s },
        Case { op: Op::BatchNorm, x: Shape::new(2, [9, 11, 13], 37) }, // two channel groups, 5 chunks
        Case { op: Op::BatchNorm, x: Shape::new(1, [3, 1, 2], 3) },
        Case { op: Op::Relu, x: s },
        Case { op: Op::Sigmoid, x: s },
        Case { op: Op::Softmax, x: Shape::new(2, [5, 6, 7], 3) },
        Case { op: Op::Softmax, x: Shape::new(1, [3, 2, 5], 2) },
        Case { op: Op::MaxPool { nan: false }, x: s },
        Case { op: Op::MaxPool { nan: true }, x: Shape::new(1, [2, 3, 9], 3) },
        Case { op: Op::Upsample { size: [5, 7, 9] }, x: Shape::new(2, [3, 4, 5], 3) },
        Case { op: Op::Upsample { size: [6, 8, 10] }, x: Shape::new(1, [3, 4, 5], 4) }, // the decoder's 2x
        Case { op: Op::Upsample { size: [3, 4, 2] }, x: Shape::new(1, [1, 4, 1], 4) },
        Case { op: Op::Upsample { size: [1, 5, 4] }, x: Shape::new(1, [3, 2, 4], 2) },
        Case { op: Op::Upsample { size: [5, 6, 7] }, x: Shape::new(1, [5, 6, 7], 2) },
        Case { op: Op::Helpers, x: s },
    ]);
    v
}

fn describe(c: &Case) -> String {
    match &c.op {
        Op::Conv { spec, .. } => format!(
            "conv {}x{}x{} s{} {}->{}",
            spec.k[0], spec.k[1], spec.k[2], spec.stride[0], spec.cin, spec.cout
        ),
        Op::BatchNorm => "batch_norm".into(),
        Op::Relu => "relu".into(),
        Op::Sigmoid => "sigmoid".into(),
        Op::Softmax => "softmax".into(),
        Op::MaxPool { nan } => format!("maxpool2{}", if *nan { " (ties, NaN)" } else { "" }),
        Op::Upsample { size } => format!("upsample -> {size:?}"),
        Op::Helpers => "helpers".into(),
    }
}

/// One named output of a case and its tolerance.
struct Out {
    name: String,
    data: Vec<f32>,
    tol: f32,
}

fn out(name: &str, data: Vec<f32>, tol: f32) -> Out {
    Out { name: name.into(), data, tol }
}

/// The conv variants the stride-1 input gradient (a forward conv) is run with.
fn variant_runs(c: &Case, gpu: bool) -> Vec<Option<ConvVariant>> {
    match &c.op {
        Op::Conv { spec, .. } if gpu && spec.stride == [1; 3] => std::iter::once(None).chain(ConvVariant::ALL.into_iter().map(Some)).collect(),
        _ => vec![None],
    }
}

fn up<B: Backend>(b: &B, s: Shape, v: Vec<f32>) -> deepis::Result<DevTensor<B::S>> {
    b.upload(&Tensor::new(s, v)?)
}

fn dl<B: Backend>(b: &B, x: &DevTensor<B::S>) -> deepis::Result<Vec<f32>> {
    b.download(x).map(|t| t.data)
}

/// Forces a conv variant on a backend (a no-op on the CPU).
trait Variant {
    const GPU: bool;
    fn set(&mut self, v: Option<ConvVariant>);
}

impl Variant for CpuBackend {
    const GPU: bool = false;
    fn set(&mut self, _: Option<ConvVariant>) {}
}

impl<D: Device> Variant for GpuBackend<D> {
    const GPU: bool = true;
    fn set(&mut self, v: Option<ConvVariant>) {
        self.set_conv_variant(v)
    }
}

/// Runs one case on any backend, with inputs derived from `seed`.
fn run_case<B: TrainBackend + Variant>(b: &mut B, c: &Case, seed: u64) -> deepis::Result<Vec<Out>> {
    let x = up(b, c.x, values(c.x.len(), seed))?;
    let mut outs = Vec::new();
    match &c.op {
        Op::Conv { spec, bias } => {
            let od = spec.out_dims(c.x.d);
            let ys = Shape::new(c.x.n, od, spec.cout);
            let dy = up(b, ys, values(ys.len(), seed + 1))?;
            let w = b.upload_param(&values(spec.weight_len(), seed + 2))?;
            for v in variant_runs(c, B::GPU) {
                b.set(v);
                let dx = b.conv3d_backward_input(&dy, &w, spec, c.x.d)?;
                assert_eq!(dx.shape, c.x);
                let vn = v.map(|v| format!("{v:?}")).unwrap_or_else(|| "auto".into());
                outs.push(out(&format!("dx {vn}"), dl(b, &dx)?, TOL));
            }
            b.set(None);
            outs.push(out("dw", b.download_param(&b.conv3d_backward_weight(&x, &dy, spec)?)?, TOL_RED));
            if *bias {
                outs.push(out("db", b.download_param(&b.conv3d_backward_bias(&dy)?)?, TOL_RED));
            }
        }
        Op::BatchNorm => {
            // An offset mean, as a conv output before BN has.
            let xv: Vec<f32> = values(c.x.len(), seed).iter().map(|v| 3.0 * v + 1.5).collect();
            let x = up(b, c.x, xv)?;
            let gamma = b.upload_param(&values(c.x.c, seed + 1))?;
            let beta = b.upload_param(&values(c.x.c, seed + 2))?;
            let (y, saved) = b.batch_norm_train(&x, &gamma, &beta, 1e-5)?;
            outs.push(out("y", dl(b, &y)?, TOL));
            outs.push(out("mean", b.download_param(&saved.mean)?, TOL_RED));
            outs.push(out("invstd", b.download_param(&saved.invstd)?, TOL_RED));
            outs.push(out("var", b.download_param(&saved.var)?, TOL_RED));
            let dy = up(b, c.x, values(c.x.len(), seed + 3))?;
            let (dx, dg, db) = b.batch_norm_backward(&dy, &x, &gamma, &saved)?;
            outs.push(out("dx", dl(b, &dx)?, TOL_RED));
            outs.push(out("dgamma", b.download_param(&dg)?, TOL_RED));
            outs.push(out("dbeta", b.download_param(&db)?, TOL_RED));
        }
        Op::Relu => {
            let y = b.relu(&x)?;
            let dy = up(b, c.x, values(c.x.len(), seed + 1))?;
            outs.push(out("dx", dl(b, &b.relu_backward(&dy, &y)?)?, TOL));
        }
        Op::Sigmoid => {
            let y = b.sigmoid(&up(b, c.x, values(c.x.len(), seed).iter().map(|v| v * 6.0).collect())?)?;
            let dy = up(b, c.x, values(c.x.len(), seed + 1))?;
            outs.push(out("dx", dl(b, &b.sigmoid_backward(&dy, &y)?)?, TOL));
        }
        Op::Softmax => {
            let y = b.softmax(&up(b, c.x, values(c.x.len(), seed).iter().map(|v| v * 8.0).collect())?)?;
            let dy = up(b, c.x, values(c.x.len(), seed + 1))?;
            outs.push(out("dx", dl(b, &b.softmax_backward(&dy, &y)?)?, TOL));
        }
        Op::MaxPool { nan } => {
            // Three levels only, so windows hold ties: the first maximum takes the gradient.
            let mut xv: Vec<f32> = values(c.x.len(), seed).iter().map(|v| (v * 1.5).round()).collect();
            if *nan {
                xv[c.x.c + 1] = f32::NAN;
                xv[7 * c.x.c] = f32::NEG_INFINITY;
            }
            let x = up(b, c.x, xv)?;
            let ys = c.x.with_d(c.x.d.map(|d| d / 2));
            let dy = up(b, ys, values(ys.len(), seed + 1))?;
            outs.push(out("dx", dl(b, &b.maxpool2_backward(&dy, &x)?)?, TOL));
        }
        Op::Upsample { size } => {
            let ys = c.x.with_d(*size);
            let dy = up(b, ys, values(ys.len(), seed + 1))?;
            let dx = b.upsample_backward(&dy, c.x.d)?;
            assert_eq!(dx.shape, c.x);
            outs.push(out("dx", dl(b, &dx)?, TOL));
        }
        Op::Helpers => {
            let y = up(b, c.x, values(c.x.len(), seed + 1))?;
            outs.push(out("mul", dl(b, &b.mul(&x, &y)?)?, TOL));
            let mut acc = b.duplicate(&x)?;
            b.accumulate(&mut acc, &y)?;
            outs.push(out("duplicate+accumulate", dl(b, &acc)?, TOL));
            outs.push(out("duplicate (source kept)", dl(b, &x)?, TOL));
            let mut p = b.upload_param(&values(37, seed + 2))?;
            let g = b.upload_param(&values(37, seed + 3))?;
            b.accumulate_param(&mut p, &g)?;
            outs.push(out("accumulate_param", b.download_param(&p)?, TOL));
        }
    }
    Ok(outs)
}

/// Runs the whole table on `gpu`, prints it, returns every output in order, fails above tolerance.
fn check_against_cpu<D: Device>(gpu: &mut GpuBackend<D>, label: &str) -> Vec<Vec<f32>> {
    let mut cpu = CpuBackend::new();
    let mut outputs = Vec::new();
    let mut failures = Vec::new();
    println!("{:<26} {:<24} {:<22} {:<12} {:>9} {:>10} {:>7}", "op", "output", "input (NCDHW)", "backend", "max|e|", "rel_err", "tol");
    for (i, c) in cases().iter().enumerate() {
        let seed = 1000 * i as u64 + 11;
        let expected = run_case(&mut cpu, c, seed).unwrap_or_else(|e| panic!("cpu {c:?}: {e}"));
        let got = run_case(gpu, c, seed).unwrap_or_else(|e| panic!("{label} {c:?}: {e}"));
        for g in got {
            // every dx variant is checked against the CPU's one dx
            let key = if g.name.starts_with("dx ") { "dx auto" } else { g.name.as_str() };
            let e = &expected.iter().find(|o| o.name == key).unwrap_or_else(|| panic!("no CPU output {key}")).data;
            let emax = e.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(emax > 0.0, "{c:?} {}: an all-zero reference checks nothing", g.name);
            let err = rel_err(&g.data, e, 1.0);
            let (op, shape) = (describe(c), format!("{}", c.x));
            println!("{op:<26} {:<24} {shape:<22} {label:<12} {emax:>9.3} {err:>10.2e} {:>7.0e}", g.name, g.tol);
            if !(err <= g.tol) {
                failures.push(format!("{op} {} {shape}: {err:e}", g.name));
            }
            outputs.push(g.data);
        }
    }
    assert!(failures.is_empty(), "{label}: above tolerance:\n{}", failures.join("\n"));
    outputs
}

#[test]
fn emu_train_ops_match_cpu_under_both_schedules() {
    let t0 = std::time::Instant::now();
    let fwd = check_against_cpu(&mut GpuBackend::new(EmuDevice::with_schedule(Schedule::Forward)), "emu forward");
    let rev = check_against_cpu(&mut GpuBackend::new(EmuDevice::with_schedule(Schedule::Reverse)), "emu reverse");
    assert_eq!(fwd.len(), rev.len());
    // Deterministic kernels must not depend on the order threads run in: compare bit for bit.
    for (i, (a, b)) in fwd.iter().zip(&rev).enumerate() {
        assert!(same_bits(a, b), "output {i}: Forward and Reverse schedules differ (a race)");
    }
    println!("Forward and Reverse schedules agree bit for bit on {} outputs ({:.1} s)", fwd.len(), t0.elapsed().as_secs_f64());
}

#[test]
fn cuda_train_ops_match_cpu() {
    let Some(dev) = cuda_device_or_skip() else { return };
    let mut gpu = GpuBackend::new(dev);
    let a = check_against_cpu(&mut gpu, "cuda");
    // Run-to-run determinism on the GPU: no atomics, fixed reduction orders.
    let b = check_against_cpu(&mut gpu, "cuda again");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(same_bits(x, y), "output {i}: two CUDA runs differ");
    }
}
