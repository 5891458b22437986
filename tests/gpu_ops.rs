//! Every op of `GpuBackend` against `CpuBackend` (the reference), on odd shapes and every conv shape
//! the model uses, for every conv variant: on the host emulator under two thread schedules (which
//! must agree bit for bit: a difference is a race) and, where one exists, on a real GPU.
//! Error = max|a-e| / max(1, max|e|) <= 1e-5, printed as a table.
mod common;
use common::{cuda_device_or_skip, same_bits, same_pad_conv, values};
use deepis::backend::{Backend, ConvSpec};
use deepis::cpu::CpuBackend;
use deepis::gpu::cuda::{cuda_available, CudaDevice};
use deepis::gpu::emu::{EmuDevice, Schedule};
use deepis::gpu::ops::{ConvVariant, GpuBackend};
use deepis::gpu::Device;
use deepis::tensor::{rel_err, Shape, Tensor};

const TOL: f32 = 1e-5;

#[derive(Clone, Debug)]
enum Op {
    Conv { spec: ConvSpec, bias: bool },
    Affine { relu: bool },
    Relu,
    Add { relu: bool },
    Sigmoid,
    MaxPool,
    Upsample { size: [usize; 3] },
    Softmax,
}

#[derive(Clone, Debug)]
struct Case {
    op: Op,
    x: Shape,
}

fn conv(cin: usize, cout: usize, k: [usize; 3], stride: usize, bias: bool, x: [usize; 3], n: usize) -> Case {
    Case { op: Op::Conv { spec: same_pad_conv(cin, cout, k, stride), bias }, x: Shape::new(n, x, cin) }
}

/// The op table: every conv shape of the network (small channel counts), odd spatial sizes.
fn cases() -> Vec<Case> {
    let d = [5, 6, 7];
    let mut v = vec![
        conv(1, 8, [3, 3, 3], 1, true, d, 1),     // conv1 first conv (cin 1)
        conv(6, 20, [3, 3, 3], 1, true, d, 2),    // 3x3x3 s1 p1, batch 2
        conv(5, 3, [3, 3, 3], 1, false, d, 1),    // classifier conv: no bias, small cout
        conv(24, 70, [3, 3, 3], 1, false, d, 1),  // several K steps, a partial second cout tile
        conv(6, 20, [3, 3, 3], 2, true, d, 1),    // bottleneck conv3 stride 2
        conv(20, 24, [1, 1, 1], 1, true, d, 2),   // reduce / increase / gcn1 / ConBR c1
        conv(20, 24, [1, 1, 1], 2, true, d, 1),   // projection stride 2
        conv(17, 1, [1, 1, 1], 1, true, d, 1),    // distance head: cout 1
        conv(8, 3, [1, 1, 1], 1, true, d, 1),     // classifier 1x1 -> 3 classes
    ];
    for k in [3, 7] {
        v.push(conv(6, 16, [k, 1, 1], 1, true, [9, 5, 6], 1)); // gcn (k,1,1)
        v.push(conv(16, 16, [1, 1, k], 1, true, [5, 6, 9], 1)); // gcn (1,1,k)
        v.push(conv(16, 5, [1, k, 1], 1, true, [6, 9, 5], 1)); // gcn (1,k,1), small cout
    }
    let s = Shape::new(2, [5, 6, 7], 5);
    v.extend([
        Case { op: Op::Affine { relu: false }, x: s },
        Case { op: Op::Affine { relu: true }, x: s },
        Case { op: Op::Relu, x: s },
        Case { op: Op::Add { relu: false }, x: s },
        Case { op: Op::Add { relu: true }, x: s },
        Case { op: Op::Sigmoid, x: s },
        Case { op: Op::MaxPool, x: s },
        Case { op: Op::MaxPool, x: Shape::new(1, [2, 3, 9], 3) },
        Case { op: Op::Upsample { size: [5, 7, 9] }, x: Shape::new(2, [3, 4, 5], 3) },
        Case { op: Op::Upsample { size: [3, 4, 2] }, x: Shape::new(1, [1, 4, 1], 4) },
        Case { op: Op::Upsample { size: [1, 5, 4] }, x: Shape::new(1, [3, 2, 4], 2) },
        Case { op: Op::Upsample { size: [5, 6, 7] }, x: Shape::new(1, [5, 6, 7], 2) },
        Case { op: Op::Softmax, x: Shape::new(2, [5, 6, 7], 3) },
        Case { op: Op::Softmax, x: Shape::new(1, [3, 2, 5], 1) },
    ]);
    v
}

fn describe(c: &Case) -> (String, String) {
    let op = match &c.op {
        Op::Conv { spec, bias } => format!(
            "conv {}x{}x{} s{} p{:?} {}->{}{}",
            spec.k[0], spec.k[1], spec.k[2], spec.stride[0], spec.pad, spec.cin, spec.cout,
            if *bias { "" } else { " nobias" }
        ),
        Op::Affine { relu } => format!("channel_affine relu={relu}"),
        Op::Relu => "relu".into(),
        Op::Add { relu } => format!("add relu={relu}"),
        Op::Sigmoid => "sigmoid".into(),
        Op::MaxPool => "maxpool2".into(),
        Op::Upsample { size } => format!("upsample -> {size:?}"),
        Op::Softmax => "softmax".into(),
    };
    (op, format!("{}", c.x))
}

/// Runs one case on any backend, with inputs derived from the case index.
fn run_case<B: Backend>(b: &B, c: &Case, seed: u64) -> deepis::Result<Tensor> {
    let x = b.upload(&Tensor::new(c.x, values(c.x.len(), seed))?)?;
    let y = match &c.op {
        Op::Conv { spec, bias } => {
            let w = b.upload_param(&values(spec.weight_len(), seed + 1))?;
            let bv = b.upload_param(&values(spec.cout, seed + 2))?;
            b.conv3d(&x, &w, if *bias { Some(&bv) } else { None }, spec)?
        }
        Op::Affine { relu } => {
            let sc = b.upload_param(&values(c.x.c, seed + 1))?;
            let sh = b.upload_param(&values(c.x.c, seed + 2))?;
            b.channel_affine(&x, &sc, &sh, *relu)?
        }
        Op::Relu => b.relu(&x)?,
        Op::Add { relu } => {
            let y = b.upload(&Tensor::new(c.x, values(c.x.len(), seed + 1))?)?;
            b.add(&x, &y, *relu)?
        }
        Op::Sigmoid => {
            let big = Tensor::new(c.x, values(c.x.len(), seed).iter().map(|v| v * 12.0).collect())?;
            b.sigmoid(&b.upload(&big)?)?
        }
        Op::MaxPool => b.maxpool2(&x)?,
        Op::Upsample { size } => b.upsample(&x, *size)?,
        Op::Softmax => {
            let big = Tensor::new(c.x, values(c.x.len(), seed).iter().map(|v| v * 8.0).collect())?;
            b.softmax(&b.upload(&big)?)?
        }
    };
    b.download(&y)
}

fn variants(c: &Case) -> Vec<Option<ConvVariant>> {
    match c.op {
        Op::Conv { .. } => std::iter::once(None).chain(ConvVariant::ALL.into_iter().map(Some)).collect(),
        _ => vec![None],
    }
}

fn variant_name(v: Option<ConvVariant>) -> String {
    v.map(|v| format!("{v:?}")).unwrap_or_else(|| "auto".into())
}

/// Runs the whole table on `gpu`, returns (rows, every output in order) and fails on any error
/// above tolerance.
fn check_against_cpu<D: Device>(gpu: &mut GpuBackend<D>, label: &str) -> Vec<Vec<f32>> {
    let cpu = CpuBackend::new();
    let mut outputs = Vec::new();
    let mut failures = Vec::new();
    println!("{:<34} {:<8} {:<22} {:<12} {:>9} {:>10}", "op", "variant", "input (NCDHW)", "backend", "max|e|", "rel_err");
    for (i, c) in cases().iter().enumerate() {
        let seed = 1000 * i as u64 + 7;
        let expected = run_case(&cpu, c, seed).unwrap_or_else(|e| panic!("cpu {c:?}: {e}"));
        let emax = expected.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(emax > 0.0, "{c:?}: an all-zero reference checks nothing");
        for v in variants(c) {
            gpu.set_conv_variant(v);
            let got = run_case(gpu, c, seed).unwrap_or_else(|e| panic!("{label} {c:?} {v:?}: {e}"));
            assert_eq!(got.shape, expected.shape, "{c:?}: output shape");
            let err = rel_err(&got.data, &expected.data, 1.0);
            let (op, shape) = describe(c);
            let vn = variant_name(v);
            println!("{op:<34} {vn:<8} {shape:<22} {label:<12} {emax:>9.3} {err:>10.2e}");
            if !(err <= TOL) {
                failures.push(format!("{op} {vn} {shape}: {err:e}"));
            }
            outputs.push(got.data);
        }
    }
    gpu.set_conv_variant(None);
    assert!(failures.is_empty(), "{label}: above tolerance {TOL}:\n{}", failures.join("\n"));
    outputs
}

#[test]
fn emu_ops_match_cpu_under_both_schedules() {
    let fwd = check_against_cpu(&mut GpuBackend::new(EmuDevice::with_schedule(Schedule::Forward)), "emu forward");
    let rev = check_against_cpu(&mut GpuBackend::new(EmuDevice::with_schedule(Schedule::Reverse)), "emu reverse");
    assert_eq!(fwd.len(), rev.len());
    // Deterministic kernels must not depend on the order threads run in: compare bit for bit.
    let mut i = 0;
    for c in cases() {
        for v in variants(&c) {
            let (op, shape) = describe(&c);
            assert!(same_bits(&fwd[i], &rev[i]), "{op} {} {shape}: Forward and Reverse schedules differ (a race)", variant_name(v));
            i += 1;
        }
    }
    println!("Forward and Reverse schedules agree bit for bit on {i} runs");
}

#[test]
fn cuda_ops_match_cpu() {
    let Some(dev) = cuda_device_or_skip() else { return };
    let mut gpu = GpuBackend::new(dev);
    check_against_cpu(&mut gpu, "cuda");
}

#[test]
fn shape_errors_are_errors() {
    // The GPU launch layer's shape rules, on the emulator here and on the GPU when there is one.
    shape_errors_on(&GpuBackend::new(EmuDevice::new()), "emu");
    if cuda_available() {
        shape_errors_on(&GpuBackend::new(CudaDevice::new(0).unwrap()), "cuda");
    } else {
        common::skip("no GPU: shape errors checked on the emulator only");
    }
}

fn shape_errors_on<D: Device>(gpu: &GpuBackend<D>, what: &str) {
    let x = gpu.upload(&Tensor::zeros(Shape::new(1, [3, 3, 3], 4))).unwrap();
    let spec = ConvSpec { cin: 5, cout: 2, k: [1; 3], stride: [1; 3], pad: [0; 3] };
    let w = gpu.upload_param(&vec![0.0; spec.weight_len()]).unwrap();
    assert!(matches!(gpu.conv3d(&x, &w, None, &spec), Err(deepis::Error::Shape(_))), "{what}: conv with 5 input channels on 4");
    let other = gpu.upload(&Tensor::zeros(Shape::new(1, [3, 3, 2], 4))).unwrap();
    assert!(matches!(gpu.add(&x, &other, false), Err(deepis::Error::Shape(_))), "{what}: add of two shapes");
    println!("{what}: shape errors are Error::Shape");
}

/// Napkin-math throughput of the conv variants on the published model's widest full-resolution
/// shape (3x3x3, 64 -> 64 channels, 128 x 128 x 64). Run on a GPU: `cargo test --release --test
/// gpu_ops -- --ignored --nocapture`.
#[test]
#[ignore]
fn cuda_conv_throughput() {
    let Some(dev) = cuda_device_or_skip() else { return };
    let mut gpu = GpuBackend::new(dev);
    let shapes = [
        (ConvSpec { cin: 64, cout: 64, k: [3; 3], stride: [1; 3], pad: [1; 3] }, [128, 128, 64]),
        (ConvSpec { cin: 64, cout: 64, k: [1; 3], stride: [1; 3], pad: [0; 3] }, [128, 128, 64]),
        (ConvSpec { cin: 256, cout: 256, k: [3; 3], stride: [1; 3], pad: [1; 3] }, [32, 32, 16]),
        (ConvSpec { cin: 64, cout: 1, k: [1; 3], stride: [1; 3], pad: [0; 3] }, [128, 128, 64]),
    ];
    println!("{:<30} {:<8} {:>9} {:>9}", "conv", "variant", "ms", "TFLOP/s");
    for (spec, d) in shapes {
        let xs = Shape::new(1, d, spec.cin);
        let x = gpu.upload(&Tensor::new(xs, values(xs.len(), 1)).unwrap()).unwrap();
        let w = gpu.upload_param(&values(spec.weight_len(), 2)).unwrap();
        let b = gpu.upload_param(&values(spec.cout, 3)).unwrap();
        let out = Shape::new(1, spec.out_dims(d), spec.cout);
        for v in ConvVariant::ALL {
            gpu.set_conv_variant(Some(v));
            gpu.conv3d(&x, &w, Some(&b), &spec).unwrap();
            gpu.device().synchronize().unwrap();
            let reps = 5;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gpu.conv3d(&x, &w, Some(&b), &spec).unwrap();
            }
            gpu.device().synchronize().unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let name = format!("{}x{}x{} {}->{} {:?}", spec.k[0], spec.k[1], spec.k[2], spec.cin, spec.cout, d);
            println!("{name:<30} {:<8} {ms:>9.3} {:>9.2}", format!("{v:?}"), spec.flops(out) / ms / 1e9);
        }
    }
}
