//! The tensor-core convolution (kernels/conv3d_tc.cu, src/gpu/tensor_conv.rs) on the emulator,
//! under both thread schedules (which must agree bit for bit), on odd shapes, against a float64
//! reference computed on the SAME rounded inputs and weights: f16 / bf16 (rounded to nearest even),
//! or tf32 (`DType::F32` convs: rounded to nearest, ties away, `round_tf32`). The device always gets
//! the unrounded f32 values: the half types are rounded by the upload, tf32 weights by `TcConv`
//! and tf32 inputs by the kernel itself (cvt.rna after each ldmatrix), so the reference checks
//! that rounding too (and `tf32_inputs_are_rounded_in_the_kernel` checks it bit for bit).
//!
//! The bound, per output element. The kernel adds n = taps x Cin products (exact in f32: a product
//! of two halves, or of two tf32 values, has at most 22 significant bits), the bias and the
//! residual, in some order, in
//! f32; every addition is exact up to a relative error u, so (Higham, Accuracy and Stability of
//! Numerical Algorithms, 4.2) the sum is within
//!     E = gamma_{n+2} * (|bias| + sum |x||w| + |res|),   gamma_m = m u / (1 - m u),
//! with u = 2^-23 rather than 2^-24 because tensor cores may truncate instead of rounding their
//! f32 sums (Fasi et al. 2021, "Numerical behavior of NVIDIA tensor cores"). ReLU does not grow an
//! error. A half output is rounded once more: |error| <= E (1 + u_h) + u_h |y| + eta_h, with u_h =
//! 2^-11 (f16) or 2^-8 (bf16) and eta_h half the spacing of the type's subnormals (2^-25 for f16).
//! (tf32 convs have f32 outputs only: E is the whole bound.)
//! A layout fault (a wrong fragment, tap or channel) is off by O(|x||w|), far above E; the planted
//! faults below show that the check catches one swapped tap and one weight moved by 1/64.
mod common;

use deepis::backend::{ConvSpec, DevTensor};
use deepis::gpu::emu::{EmuDevice, Schedule};
use deepis::gpu::tensor_conv::{choose_chunk, conv3d_tc, conv3d_tc_into, tc_weight_layout, wgmma_supports, Epilogue, TcConv, WarpTile};
use deepis::gpu::{from_half_bits, round_tf32, to_half_bits, DType, Device};
use deepis::tensor::Shape;

const SCHEDULES: [Schedule; 2] = [Schedule::Forward, Schedule::Reverse];
const U_F32: f64 = 1.0 / (1u64 << 23) as f64;

#[derive(Clone, Debug)]
struct Case {
    spec: ConvSpec,
    n: usize,
    d: [usize; 3],
    dtype: DType,
    half_out: bool,
    bias: bool,
    residual: bool,
    relu: bool,
}

fn case(cin: usize, cout: usize, k: [usize; 3], stride: usize, d: [usize; 3], dtype: DType) -> Case {
    let spec = ConvSpec { cin, cout, k, stride: [stride; 3], pad: k.map(|k| k / 2) };
    Case { spec, n: 1, d, dtype, half_out: false, bias: true, residual: false, relu: false }
}

impl Case {
    fn out_dtype(&self) -> DType {
        if self.half_out { self.dtype } else { DType::F32 }
    }
    fn out_shape(&self) -> Shape {
        Shape::new(self.n, self.spec.out_dims(self.d), self.spec.cout)
    }
    fn name(&self) -> String {
        let s = &self.spec;
        let mut ep = vec![format!("->{}", self.out_dtype().name())];
        if !self.bias { ep.push("nobias".into()) }
        if self.residual { ep.push("+res".into()) }
        if self.relu { ep.push("relu".into()) }
        let uniform = s.stride.iter().all(|&v| v == s.stride[0]) && (0..3).all(|a| s.pad[a] == s.k[a] / 2);
        let geom = if uniform { format!("s{}", s.stride[0]) } else { format!("s{:?} p{:?}", s.stride, s.pad) };
        format!("{} {}x{}x{} {geom} {}->{} {}", self.dtype.name(), s.k[0], s.k[1], s.k[2], s.cin, s.cout, ep.join(" "))
    }
}

/// The shape table: Cin 1 / 3 / 17 (element-wise brick loads), 8 / 16 / 24 / 32 / 64 / 80
/// (cp.async; 24 and 80 in two chunks), Cout 1, 5, 8, 17, 24, 64, 70 (two channel blocks); 3x3x3,
/// 1x1x1, 7x1x1, 1x3x1, 3x1x3; stride 1 and 2, one per axis; zero and asymmetric padding; odd
/// volumes, one smaller than the kernel along two axes; batch 2. tf32 (f32 convs): Cin 3 / 6 / 17
/// (element-wise loads, chunks of 8 / 8 / 24), 24 / 64 (cp.async; 64 in two chunks of 32), 80 at
/// stride 2 (ten chunks of 8: the brick fits only so), Cout 5 ... 70, both epilogues.
fn cases() -> Vec<Case> {
    let (f16, bf16, tf32) = (DType::F16, DType::BF16, DType::F32);
    let d = [5, 7, 9];
    vec![
        case(3, 5, [3, 3, 3], 1, d, f16),
        Case { half_out: true, relu: true, ..case(17, 1, [3, 3, 3], 2, d, bf16) },
        Case { half_out: true, residual: true, relu: true, ..case(64, 64, [3, 3, 3], 1, d, f16) },
        Case { residual: true, ..case(64, 64, [3, 3, 3], 1, d, bf16) },
        Case { n: 2, ..case(64, 5, [1, 1, 1], 1, d, bf16) },
        Case { residual: true, ..case(16, 17, [7, 1, 1], 1, [9, 5, 6], f16) },
        Case { half_out: true, ..case(24, 70, [1, 1, 1], 2, d, bf16) },
        Case { bias: false, ..case(80, 16, [1, 3, 1], 1, d, f16) },
        Case { n: 2, relu: true, ..case(8, 64, [3, 3, 3], 2, [6, 5, 7], bf16) },
        Case { half_out: true, ..case(1, 8, [3, 3, 3], 1, [5, 6, 7], bf16) },
        case(16, 16, [3, 3, 3], 1, [1, 2, 3], f16),
        Case { spec: ConvSpec { cin: 32, cout: 24, k: [3, 1, 3], stride: [2, 1, 1], pad: [0, 0, 1] }, ..case(32, 24, [1; 3], 1, [7, 3, 6], f16) },
        case(3, 5, [3, 3, 3], 1, d, tf32),
        Case { residual: true, relu: true, ..case(64, 64, [3, 3, 3], 1, d, tf32) },
        Case { n: 2, ..case(24, 70, [1, 1, 1], 2, d, tf32) },
        Case { residual: true, ..case(17, 17, [7, 1, 1], 1, [9, 5, 6], tf32) },
        Case { bias: false, ..case(6, 16, [1, 3, 1], 1, d, tf32) },
        Case { relu: true, ..case(80, 8, [3, 3, 3], 2, [6, 5, 7], tf32) },
    ]
}

/// `v` rounded to `dtype` as the kernel computes with it (F32: tf32), as f32.
fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => v.iter().map(|&x| round_tf32(x)).collect(),
        t => from_half_bits(&to_half_bits(v, t), t),
    }
}

/// The case's data: what the device gets (`x_in`, `w_in`: unrounded f32) and what the kernel
/// computes with (`x`, `w`: rounded to the conv's type); bias and residual as stored.
struct Data {
    x_in: Vec<f32>,
    w_in: Vec<f32>,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    res: Option<Vec<f32>>,
}

impl Data {
    fn new(c: &Case, seed: u64) -> Data {
        let xs = Shape::new(c.n, c.d, c.spec.cin);
        let res = c.residual.then(|| {
            let r = common::values(c.out_shape().len(), seed + 3);
            if c.half_out { rounded(&r, c.dtype) } else { r }
        });
        let (x_in, w_in) = (common::values(xs.len(), seed), common::values(c.spec.weight_len(), seed + 1));
        Data {
            x: rounded(&x_in, c.dtype),
            w: rounded(&w_in, c.dtype),
            x_in,
            w_in,
            bias: c.bias.then(|| common::values(c.spec.cout, seed + 2)),
            res,
        }
    }
}

/// float64 reference on the rounded data: (y, bound) per output element.
fn reference(c: &Case, data: &Data) -> (Vec<f64>, Vec<f64>) {
    let s = &c.spec;
    let out = c.out_shape();
    let taps: usize = s.k.iter().product();
    let m = (taps * s.cin + 2) as f64;
    let gamma = m * U_F32 / (1.0 - m * U_F32);
    let (uh, eta) = match (c.half_out, c.dtype) {
        (false, _) => (0.0, 0.0),
        (true, DType::F16) => (2f64.powi(-11), 2f64.powi(-25)),
        (true, _) => (2f64.powi(-8), 2f64.powi(-134)),
    };
    let (mut y, mut bound) = (vec![0.0; out.len()], vec![0.0; out.len()]);
    for b in 0..out.n {
        for j0 in 0..out.d[0] {
            for j1 in 0..out.d[1] {
                for j2 in 0..out.d[2] {
                    let o = ((b * out.d[0] + j0) * out.d[1] + j1) * out.d[2] + j2;
                    for co in 0..s.cout {
                        let (mut acc, mut mag) = (0.0f64, 0.0f64);
                        if let Some(bv) = &data.bias {
                            acc += bv[co] as f64;
                            mag += (bv[co] as f64).abs();
                        }
                        for tap in 0..taps {
                            let t = [tap / (s.k[1] * s.k[2]), (tap / s.k[2]) % s.k[1], tap % s.k[2]];
                            let j = [j0, j1, j2];
                            let i: Vec<isize> = (0..3).map(|a| (j[a] * s.stride[a] + t[a]) as isize - s.pad[a] as isize).collect();
                            if (0..3).any(|a| i[a] < 0 || i[a] >= c.d[a] as isize) {
                                continue;
                            }
                            let xb = (((b * c.d[0] + i[0] as usize) * c.d[1] + i[1] as usize) * c.d[2] + i[2] as usize) * s.cin;
                            for ci in 0..s.cin {
                                let p = data.x[xb + ci] as f64 * data.w[(tap * s.cin + ci) * s.cout + co] as f64;
                                acc += p;
                                mag += p.abs();
                            }
                        }
                        if let Some(r) = &data.res {
                            acc += r[o * s.cout + co] as f64;
                            mag += (r[o * s.cout + co] as f64).abs();
                        }
                        if c.relu {
                            acc = acc.max(0.0);
                        }
                        let e = gamma * mag;
                        y[o * s.cout + co] = acc;
                        bound[o * s.cout + co] = e * (1.0 + uh) + uh * acc.abs() + eta;
                    }
                }
            }
        }
    }
    (y, bound)
}

/// Runs the case on `dev` with the given conv (weights already on the device).
fn run<D: Device>(dev: &D, c: &Case, conv: &TcConv<D::Buf>, data: &Data) -> deepis::Result<Vec<f32>> {
    let xs = Shape::new(c.n, c.d, c.spec.cin);
    let x = DevTensor { shape: xs, data: dev.htod_as(&data.x_in, c.dtype)? };
    let res = match &data.res {
        Some(r) => Some(DevTensor { shape: c.out_shape(), data: dev.htod_as(r, c.out_dtype())? }),
        None => None,
    };
    let ep = Epilogue { residual: res.as_ref(), relu: c.relu, out: c.out_dtype() };
    let y = conv3d_tc(dev, conv, &x, &ep)?;
    assert_eq!(dev.buf_dtype(&y.data), c.out_dtype());
    dev.dtoh(&y.data)
}

fn tc_conv<D: Device>(dev: &D, c: &Case, w: &[f32], data: &Data) -> TcConv<D::Buf> {
    TcConv::new(dev, &c.spec, w, data.bias.as_deref(), c.dtype).unwrap_or_else(|e| panic!("{}: {e}", c.name()))
}

/// The kernels that compute case `c`: both mma.sync warp tiles, and wgmma where it takes the shape.
fn tiles_for(c: &Case) -> Vec<WarpTile> {
    let mut t = WarpTile::ALL.to_vec();
    if wgmma_supports(&c.spec).is_none() {
        t.push(WarpTile::Wgmma);
    }
    t
}

/// The case on the emulator under both schedules (which must agree bit for bit, else a race) with
/// every kernel that takes it ([`tiles_for`]): both warp tiles add the same products in the same
/// order, and so does wgmma (per chunk, tap and 16 channels, each step rounded once to f32 on the
/// emulator), so all must agree bit for bit too.
fn run_on_both_schedules(c: &Case, data: &Data) -> Vec<f32> {
    let mut outs: Vec<(Schedule, WarpTile, Vec<f32>)> = Vec::new();
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        for tile in tiles_for(c) {
            let mut conv = tc_conv(&dev, c, &data.w_in, data);
            conv.tile = tile;
            let y = run(&dev, c, &conv, data).unwrap_or_else(|e| panic!("{} {s:?} {tile:?} {c:?}: {e}", c.name()));
            outs.push((s, tile, y));
        }
    }
    for (s, tile, y) in &outs[1..] {
        assert!(common::same_bits(&outs[0].2, y), "{}: {s:?} {tile:?} differs from Forward M32 (a race, or a tile fault)", c.name());
    }
    outs.swap_remove(0).2
}

/// max over elements of |got - want| and of |got - want| / bound; Err names the first element
/// above its bound.
fn check(got: &[f32], want: &[f64], bound: &[f64]) -> (f64, f64, Option<String>) {
    let (mut max_err, mut max_ratio, mut first) = (0.0f64, 0.0f64, None);
    for i in 0..want.len() {
        let err = (got[i] as f64 - want[i]).abs();
        let ratio = if err.is_nan() { f64::INFINITY } else { err / bound[i] };
        max_err = max_err.max(err);
        max_ratio = max_ratio.max(ratio);
        if ratio > 1.0 && first.is_none() {
            first = Some(format!("element {i}: got {}, want {}, |err| {err:.3e} > bound {:.3e}", got[i], want[i], bound[i]));
        }
    }
    (max_err, max_ratio, first)
}

#[test]
fn tensor_core_conv_is_within_the_derived_bound_on_both_schedules() {
    println!("{:<44} {:<24} {:>5} {:>10} {:>10} {:>9}", "op", "input (N,D,C)", "chunk", "max|err|", "max bound", "err/bound");
    let mut failures = Vec::new();
    for (idx, c) in cases().iter().enumerate() {
        let data = Data::new(c, 100 * idx as u64 + 1);
        let (want, bound) = reference(c, &data);
        assert!(want.iter().any(|&v| v != 0.0), "{}: an all-zero reference checks nothing", c.name());
        let (max_err, ratio, first) = check(&run_on_both_schedules(c, &data), &want, &bound);
        let bmax = bound.iter().cloned().fold(0.0, f64::max);
        let chunk = choose_chunk(&c.spec, c.dtype).unwrap();
        println!("{:<44} {:<24} {chunk:>5} {max_err:>10.3e} {bmax:>10.3e} {ratio:>9.2e}", c.name(), format!("{}", Shape::new(c.n, c.d, c.spec.cin)));
        if let Some(f) = first {
            failures.push(format!("{}: {f}", c.name()));
        }
    }
    assert!(failures.is_empty(), "above the derived bound:\n{}", failures.join("\n"));
    println!("{} cases within the bound; both schedules and every kernel (mma.sync warp tiles, wgmma where it applies) agree bit for bit", cases().len());
}

/// The wgmma kernel's shapes (stride 1, Cout a multiple of 64; f16 / bf16, and tf32): Cin 16 / 32 / 64 (one
/// chunk), 80 and 128 (two chunks), 24 (cp.async, zero-filled past Cin in a chunk of 32) and 17
/// (element-wise brick loads); Cout 64 and 128 (two channel blocks); 3x3x3, 1x1x1, 7x1x1, 3x1x3
/// with asymmetric padding; odd volumes, one smaller than the tile on every axis; batch 2; every
/// epilogue; tf32 on four of them. Each within the bound, and bit for bit the mma.sync kernels'
/// result (tf32: their rounding of the brick in shared memory is the mma.sync kernels' rounding
/// after ldmatrix, cvt.rna both).
fn wgmma_cases() -> Vec<Case> {
    let (f16, bf16, tf32) = (DType::F16, DType::BF16, DType::F32);
    let d = [5, 7, 9];
    let asym = ConvSpec { cin: 32, cout: 64, k: [3, 1, 3], stride: [1; 3], pad: [0, 0, 2] };
    vec![
        Case { half_out: true, residual: true, relu: true, ..case(64, 64, [3, 3, 3], 1, d, f16) },
        Case { residual: true, ..case(64, 64, [3, 3, 3], 1, [9, 10, 11], bf16) },
        case(16, 64, [3, 3, 3], 1, d, bf16),
        Case { n: 2, relu: true, ..case(32, 128, [3, 3, 3], 1, [6, 5, 7], f16) },
        Case { half_out: true, ..case(80, 64, [1, 1, 1], 1, d, bf16) },
        Case { bias: false, ..case(128, 64, [3, 3, 3], 1, [3, 4, 5], f16) },
        Case { residual: true, ..case(24, 64, [7, 1, 1], 1, [9, 5, 6], f16) },
        Case { half_out: true, relu: true, ..case(17, 64, [3, 3, 3], 1, d, bf16) },
        case(64, 64, [3, 3, 3], 1, [1, 2, 3], f16),
        Case { spec: asym, ..case(32, 64, [1; 3], 1, [7, 3, 6], bf16) },
        // tf32: cp.async bricks (Cin 64 in chunks of 32, 24), element-wise (17), two channel blocks
        Case { residual: true, relu: true, ..case(64, 64, [3, 3, 3], 1, d, tf32) },
        Case { n: 2, ..case(24, 128, [1, 1, 1], 1, d, tf32) },
        Case { residual: true, ..case(17, 64, [7, 1, 1], 1, [9, 5, 6], tf32) },
        Case { spec: asym, ..case(32, 64, [1; 3], 1, [7, 3, 6], tf32) },
    ]
}

#[test]
fn wgmma_conv_is_within_the_bound_and_equals_mma_sync_on_both_schedules() {
    for (idx, c) in wgmma_cases().iter().enumerate() {
        assert!(tiles_for(c).contains(&WarpTile::Wgmma), "{}: not a wgmma shape", c.name());
        let data = Data::new(c, 900 + idx as u64);
        let (want, bound) = reference(c, &data);
        let (max_err, ratio, first) = check(&run_on_both_schedules(c, &data), &want, &bound);
        println!("{:<44} {:<24} max|err| {max_err:.3e} err/bound {ratio:.2e}", c.name(), format!("{}", Shape::new(c.n, c.d, c.spec.cin)));
        assert!(first.is_none(), "{}: {}", c.name(), first.unwrap());
    }
    println!("{} wgmma shapes within the bound, bit for bit the mma.sync kernels' result, both schedules", wgmma_cases().len());
}

#[test]
fn wgmma_refuses_what_it_does_not_compute() {
    let dev = EmuDevice::new();
    for (c, why) in [
        (case(64, 64, [3, 3, 3], 2, [6, 6, 6], DType::F16), "stride"),
        (case(64, 32, [3, 3, 3], 1, [6, 6, 6], DType::BF16), "output channels"),
    ] {
        let data = Data::new(&c, 3);
        let mut conv = tc_conv(&dev, &c, &data.w_in, &data);
        conv.tile = WarpTile::Wgmma;
        let err = run(&dev, &c, &conv, &data).expect_err("wgmma must refuse this shape").to_string();
        assert!(err.contains("conv3d_wgmma") && err.contains(why), "{}: {err}", c.name());
    }
}

/// 24 shapes drawn at random (fixed seed): Cin 1..48, Cout 1..80, kernel 1..3 and stride 1..2 per
/// axis, padding 0..k-1, volumes 1..9 per axis, batch 1..2, both half types, every epilogue.
fn random_cases() -> Vec<Case> {
    let mut s = 0x2545f4914f6cdd1du64;
    let mut draw = |n: usize| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as usize % n
    };
    (0..24)
        .map(|_| {
            let k: [usize; 3] = std::array::from_fn(|_| 1 + draw(3));
            let stride: [usize; 3] = std::array::from_fn(|_| 1 + draw(2));
            let pad: [usize; 3] = std::array::from_fn(|a| draw(k[a]));
            let d: [usize; 3] = std::array::from_fn(|a| (k[a] - 2 * pad[a].min(k[a] / 2)).max(1) + draw(7));
            let spec = ConvSpec { cin: 1 + draw(48), cout: 1 + draw(80), k, stride, pad };
            let dtype = if draw(2) == 0 { DType::F16 } else { DType::BF16 };
            let (half_out, bias, residual, relu) = (draw(2) == 0, draw(4) != 0, draw(2) == 0, draw(2) == 0);
            Case { spec, n: 1 + draw(2), d, dtype, half_out, bias, residual, relu }
        })
        .collect()
}

/// The same 24 shapes again as tf32 convs (f32 in and out).
fn random_tf32_cases() -> Vec<Case> {
    random_cases().into_iter().map(|c| Case { dtype: DType::F32, half_out: false, ..c }).collect()
}

#[test]
fn random_shapes_are_within_the_bound_on_both_schedules() {
    let mut worst = (0.0f64, String::new());
    for (idx, c) in random_cases().iter().chain(&random_tf32_cases()).enumerate() {
        assert!((0..3).all(|a| c.d[a] + 2 * c.spec.pad[a] >= c.spec.k[a]), "{c:?}: the generator made an invalid shape");
        let data = Data::new(c, 5000 + idx as u64);
        let (want, bound) = reference(c, &data);
        let (max_err, ratio, first) = check(&run_on_both_schedules(c, &data), &want, &bound);
        println!("{:<52} {:<24} max|err| {max_err:.3e} err/bound {ratio:.2e}", c.name(), format!("{}", Shape::new(c.n, c.d, c.spec.cin)));
        assert!(first.is_none(), "{} on {:?}: {}", c.name(), c.d, first.unwrap());
        if ratio > worst.0 {
            worst = (ratio, c.name());
        }
    }
    println!("24 random shapes, in f16 / bf16 and in tf32, within the bound, both schedules and warp tiles identical; worst err/bound {:.2e} ({})", worst.0, worst.1);
}

/// The engine-layout weights with taps `a` and `b` exchanged (what a kernel reading the wrong tap does).
fn swap_taps(spec: &ConvSpec, w: &[f32], a: usize, b: usize) -> Vec<f32> {
    let per_tap = spec.cin * spec.cout;
    let mut v = w.to_vec();
    for i in 0..per_tap {
        v.swap(a * per_tap + i, b * per_tap + i);
    }
    v
}

/// A swapped tap in a tf32 conv is caught far above the bound, as in f16 below.
#[test]
fn planted_tf32_fault_exceeds_the_bound() {
    let dev = EmuDevice::new();
    let c = Case { residual: true, ..case(20, 5, [3, 3, 3], 1, [5, 6, 7], DType::F32) };
    let data = Data::new(&c, 78);
    let (want, bound) = reference(&c, &data);
    let good = run(&dev, &c, &tc_conv(&dev, &c, &data.w_in, &data), &data).unwrap();
    assert!(check(&good, &want, &bound).2.is_none(), "{}: the unplanted run fails", c.name());
    let swapped = run(&dev, &c, &tc_conv(&dev, &c, &swap_taps(&c.spec, &data.w_in, 0, 1), &data), &data).unwrap();
    let (err, ratio, first) = check(&swapped, &want, &bound);
    println!("tf32, taps 0 and 1 swapped: max |err| {err:.3e}, max err/bound {ratio:.2e}: {first:?}");
    assert!(first.is_some() && ratio > 100.0, "a swapped tap must be caught far above the bound (ratio {ratio})");
}

#[test]
fn planted_faults_exceed_the_bound() {
    planted_faults_exceed_the_bound_with(Case { residual: true, ..case(17, 5, [3, 3, 3], 1, [5, 6, 7], DType::F16) }, WarpTile::M32);
    planted_faults_exceed_the_bound_with(Case { residual: true, ..case(32, 64, [3, 3, 3], 1, [5, 6, 7], DType::F16) }, WarpTile::Wgmma);
}

fn planted_faults_exceed_the_bound_with(c: Case, tile: WarpTile) {
    let dev = EmuDevice::new();
    let tc_conv = |dev: &EmuDevice, c: &Case, w: &[f32], data: &Data| {
        let mut conv = tc_conv(dev, c, w, data);
        conv.tile = tile;
        conv
    };
    let data = Data::new(&c, 77);
    let (want, bound) = reference(&c, &data);
    let good = run(&dev, &c, &tc_conv(&dev, &c, &data.w_in, &data), &data).unwrap();
    let (_, ratio, first) = check(&good, &want, &bound);
    assert!(first.is_none(), "{}: the unplanted run fails: {first:?}", c.name());
    println!("{}: unplanted, max err/bound {ratio:.2e}", c.name());

    // A swapped tap (the kernel's view of a wrong tap offset).
    let swapped = run(&dev, &c, &tc_conv(&dev, &c, &swap_taps(&c.spec, &data.w_in, 0, 1), &data), &data).unwrap();
    let (err, ratio, first) = check(&swapped, &want, &bound);
    println!("taps 0 and 1 swapped: max |err| {err:.3e}, max err/bound {ratio:.2e}: {first:?}");
    assert!(first.is_some() && ratio > 100.0, "a swapped tap must be caught far above the bound (ratio {ratio})");

    // One laid-out weight (tap 13 = the centre, channel 0, output channel 0) moved by 1/64.
    let conv = tc_conv(&dev, &c, &data.w_in, &data);
    let ck = conv.chunk;
    let mut bits = dev.dtoh_bits(conv.weights()).unwrap();
    let i = (13 * deepis::gpu::tensor_conv::cout_pad(c.spec.cout)) * ck;
    let moved = from_half_bits(&[bits[i]], DType::F16)[0] + 1.0 / 64.0;
    bits[i] = to_half_bits(&[moved], DType::F16)[0];
    let conv = conv.with_weights(&dev, dev.htod_bits(&bits, DType::F16).unwrap()).unwrap();
    let (err, ratio, first) = check(&run(&dev, &c, &conv, &data).unwrap(), &want, &bound);
    println!("one of {} weights moved by 1/64: max |err| {err:.3e}, max err/bound {ratio:.2e}: {first:?}", c.spec.weight_len());
    assert!(first.is_some(), "a weight moved by 1/64 must exceed the bound somewhere");
}

#[test]
fn the_weight_layout_is_the_documented_one() {
    // wt[((c * taps + tap) * cout_pad + co) * ck + j] = w[tap][c * ck + j][co], zero elsewhere.
    let spec = ConvSpec { cin: 20, cout: 3, k: [1, 2, 1], stride: [1; 3], pad: [0; 3] };
    let w: Vec<f32> = (0..spec.weight_len()).map(|i| i as f32 + 1.0).collect();
    let ck = 16;
    let wt = tc_weight_layout(&spec, &w, ck);
    assert_eq!(wt.len(), 2 * 2 * 16 * ck, "2 chunks x 2 taps x 16 padded output channels x 16");
    let at = |c: usize, tap: usize, co: usize, j: usize| wt[((c * 2 + tap) * 16 + co) * ck + j];
    assert_eq!(at(0, 0, 0, 0), w[0]);
    assert_eq!(at(1, 1, 2, 3), w[(20 + 19) * 3 + 2], "tap 1, channel 16 + 3, output channel 2");
    assert_eq!(at(1, 1, 2, 4), 0.0, "channel 20 is past Cin");
    assert_eq!(at(0, 1, 3, 0), 0.0, "output channel 3 is past Cout");
    assert_eq!(wt.iter().filter(|&&v| v != 0.0).count(), w.len(), "every weight once");
}

/// The tf32 kernel rounds its inputs itself, exactly as the host does: the raw f32 input and the
/// input rounded by `round_tf32` beforehand give the same output bit for bit, under both warp
/// tiles. (Weights the host failed to round would fail the launch: the emulator's mma refuses an
/// operand that is not a tf32 value.)
#[test]
fn tf32_inputs_are_rounded_in_the_kernel() {
    let dev = EmuDevice::new();
    let c = Case { residual: true, ..case(12, 9, [3, 3, 3], 1, [5, 4, 6], DType::F32) };
    let data = Data::new(&c, 41);
    assert!(data.x_in.iter().zip(&data.x).filter(|(a, b)| a != b).count() > data.x.len() / 2, "most inputs are not tf32 values");
    let pre = Data { x_in: data.x.clone(), w_in: data.w.clone(), x: data.x.clone(), w: data.w.clone(), bias: data.bias.clone(), res: data.res.clone() };
    for tile in WarpTile::ALL {
        let mut conv = tc_conv(&dev, &c, &data.w_in, &data);
        conv.tile = tile;
        let (raw, rounded) = (run(&dev, &c, &conv, &data).unwrap(), run(&dev, &c, &conv, &pre).unwrap());
        assert!(common::same_bits(&raw, &rounded), "{tile:?}: raw and host-rounded inputs differ");
    }
}

#[test]
fn bad_inputs_are_shape_errors() {
    let dev = EmuDevice::new();
    let c = case(8, 4, [3, 3, 3], 1, [4, 4, 4], DType::F16);
    let data = Data::new(&c, 5);
    let conv = tc_conv(&dev, &c, &data.w_in, &data);
    let xs = Shape::new(1, c.d, 8);
    let shape_err = |r: deepis::Result<DevTensor<_>>, what: &str| match r {
        Err(deepis::Error::Shape(m)) => println!("{what}: {m}"),
        Err(e) => panic!("{what}: not a shape error: {e}"),
        Ok(_) => panic!("{what}: accepted"),
    };
    let f32x = DevTensor { shape: xs, data: dev.htod(&data.x).unwrap() };
    shape_err(conv3d_tc(&dev, &conv, &f32x, &Epilogue::plain(DType::F32)), "f32 input");
    let bfx = DevTensor { shape: xs, data: dev.htod_as(&data.x, DType::BF16).unwrap() };
    shape_err(conv3d_tc(&dev, &conv, &bfx, &Epilogue::plain(DType::F32)), "bf16 input to an f16 conv");
    let x = DevTensor { shape: xs, data: dev.htod_as(&data.x, DType::F16).unwrap() };
    shape_err(conv3d_tc(&dev, &conv, &x, &Epilogue::plain(DType::BF16)), "bf16 output of an f16 conv");
    let x7 = DevTensor { shape: Shape::new(1, [4, 4, 4], 7), data: dev.htod_as(&vec![0.0; 448], DType::F16).unwrap() };
    shape_err(conv3d_tc(&dev, &conv, &x7, &Epilogue::plain(DType::F32)), "7 channels into an 8-channel conv");
    let r = DevTensor { shape: Shape::new(1, [4, 4, 3], 4), data: dev.alloc_zeros(192).unwrap() };
    let ep = Epilogue { residual: Some(&r), relu: false, out: DType::F32 };
    shape_err(conv3d_tc(&dev, &conv, &x, &ep), "residual of another shape");
    let y = DevTensor { shape: Shape::new(1, [4, 4, 4], 4), data: dev.alloc_zeros_as(256, DType::F16).unwrap() };
    let into = conv3d_tc_into(&dev, &conv, &x, &Epilogue::plain(DType::F32), &y).map(|_| y);
    shape_err(into, "an f16 output buffer for an f32 output");
    // an f32 TcConv is the tf32 conv: f32 in, f32 out only
    let tf = TcConv::new(&dev, &c.spec, &data.w_in, None, DType::F32).unwrap();
    shape_err(conv3d_tc(&dev, &tf, &x, &Epilogue::plain(DType::F32)), "f16 input to a tf32 conv");
    shape_err(conv3d_tc(&dev, &tf, &f32x, &Epilogue::plain(DType::F16)), "f16 output of a tf32 conv");
}

// ---- the same on a real GPU -------------------------------------------------------------------------

/// A CUDA device with tensor cores the kernel uses (sm_80 and up), or None after saying why.
fn tensor_core_gpu_or_skip() -> Option<deepis::gpu::cuda::CudaDevice> {
    let dev = common::cuda_device_or_skip()?;
    if !dev.has_tensor_cores() {
        common::skip(&format!("{}: conv3d_tc needs sm_80 or newer", dev.name()));
        return None;
    }
    Some(dev)
}

/// Needs a GPU (skips with the reason otherwise): every case of the table within the same bound
/// (the bound allows truncated f32 sums, so the GPU need not equal the emulator bit for bit).
#[test]
fn cuda_tensor_core_conv_is_within_the_derived_bound() {
    let Some(dev) = tensor_core_gpu_or_skip() else { return };
    let mut failures = Vec::new();
    let seeded = cases().into_iter().enumerate().map(|(i, c)| (100 * i as u64 + 1, c));
    let wg = wgmma_cases().into_iter().enumerate().map(|(i, c)| (900 + i as u64, c));
    for (seed, c) in &seeded.chain(wg).collect::<Vec<_>>() {
        let data = Data::new(c, *seed);
        let (want, bound) = reference(c, &data);
        for tile in tiles_for(c).into_iter().filter(|&t| t != WarpTile::Wgmma || dev.has_wgmma()) {
            let mut conv = tc_conv(&dev, c, &data.w_in, &data);
            conv.tile = tile;
            let got = run(&dev, c, &conv, &data).unwrap_or_else(|e| panic!("{} {tile:?}: {e}", c.name()));
            let (max_err, ratio, first) = check(&got, &want, &bound);
            println!("cuda {:<44} {tile:?} max|err| {max_err:.3e} err/bound {ratio:.2e}", c.name());
            if let Some(f) = first {
                failures.push(format!("{} {tile:?}: {f}", c.name()));
            }
        }
    }
    assert!(failures.is_empty(), "cuda: above the derived bound:\n{}", failures.join("\n"));
}

/// Napkin-math throughput of the tensor-core conv on the published model's full-resolution
/// shapes (128 x 128 x 64, batch 1). On a GPU: `cargo test --release --test tensor_conv --
/// --ignored cuda_tensor_conv_throughput --nocapture` (benches/gpu_check.sh runs it).
#[test]
#[ignore]
fn cuda_tensor_conv_throughput() {
    let Some(dev) = tensor_core_gpu_or_skip() else { return };
    let d = [128, 128, 64];
    let shapes = [(64, 64, [3; 3]), (64, 64, [1; 3]), (64, 1, [1; 3]), (32, 64, [3; 3])];
    println!("{:<32} {:>8} {:>5} {:>9} {:>9}", "conv", "out", "tile", "ms", "TFLOP/s");
    for (cin, cout, k) in shapes {
        for (dtype, half_out) in [(DType::F16, true), (DType::BF16, true), (DType::F16, false), (DType::F32, false)] {
            let c = Case { half_out, residual: cout == cin, relu: true, ..case(cin, cout, k, 1, d, dtype) };
            let data = Data::new(&c, 9);
            let mut conv = tc_conv(&dev, &c, &data.w_in, &data);
            let x = DevTensor { shape: Shape::new(1, d, cin), data: dev.htod_as(&data.x_in, dtype).unwrap() };
            let res = data.res.as_ref().map(|r| DevTensor { shape: c.out_shape(), data: dev.htod_as(r, c.out_dtype()).unwrap() });
            let ep = Epilogue { residual: res.as_ref(), relu: true, out: c.out_dtype() };
            for tile in tiles_for(&c).into_iter().filter(|&t| t != WarpTile::Wgmma || dev.has_wgmma()) {
                conv.tile = tile;
                let y = conv3d_tc(&dev, &conv, &x, &ep).unwrap();
                dev.synchronize().unwrap();
                let reps = 20;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    conv3d_tc_into(&dev, &conv, &x, &ep, &y).unwrap();
                }
                dev.synchronize().unwrap();
                let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                let tf = c.spec.flops(c.out_shape()) / ms / 1e9;
                println!("{:<32} {:>8} {:>5} {ms:>9.3} {tf:>9.1}", c.name(), c.out_dtype().name(), format!("{tile:?}"));
            }
        }
    }
}

// ---- f32 <-> half conversions (kernels/half.cu) -------------------------------------------------

/// Rounding every f16 value, every tie and its neighbours, bf16 ties over the exponent range, the
/// overflow and underflow edges, infinities, NaN and random bit patterns, as a channels-last tensor;
/// both schedules equal the `half` crate bit for bit (NaN: any NaN); widening is exact on every
/// 16-bit pattern.
#[test]
fn half_conversions_match_the_half_crate_on_both_schedules() {
    use deepis::gpu::convert::{to_f32, to_half};
    let x = common::conversion_inputs();
    let shape = Shape::new(1, [1, 1, x.len() / 2], 2);
    let all: Vec<u16> = (0..=u16::MAX).collect();
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let xt = DevTensor { shape, data: dev.htod(&x[..shape.len()]).unwrap() };
        for dtype in [DType::F16, DType::BF16] {
            let h = to_half(&dev, &xt, dtype).unwrap();
            assert_eq!((h.shape, dev.buf_dtype(&h.data)), (shape, dtype));
            let (got, want) = (dev.dtoh_bits(&h.data).unwrap(), to_half_bits(&x[..shape.len()], dtype));
            let bad = (0..got.len()).filter(|&i| !common::same_half(got[i], want[i], dtype)).count();
            assert_eq!(bad, 0, "to_half_{} ({s:?}): {bad} of {} values differ from the half crate", dtype.name(), got.len());

            let ht = DevTensor { shape: Shape::new(1, [1, 1, all.len()], 1), data: dev.htod_bits(&all, dtype).unwrap() };
            let f = dev.dtoh(&to_f32(&dev, &ht).unwrap().data).unwrap();
            let wf = from_half_bits(&all, dtype);
            let bad = (0..all.len()).filter(|&i| f[i].to_bits() != wf[i].to_bits() && !(f[i].is_nan() && wf[i].is_nan())).count();
            assert_eq!(bad, 0, "to_f32_{} ({s:?}): {bad} of 65536 patterns not exact", dtype.name());
        }
        // Wrong buffer types are errors, not launches.
        assert!(matches!(to_f32(&dev, &xt), Err(deepis::Error::Shape(_))));
        let h = to_half(&dev, &xt, DType::F16).unwrap();
        assert!(matches!(to_half(&dev, &h, DType::BF16), Err(deepis::Error::Shape(_))));
        assert!(matches!(to_half(&dev, &xt, DType::F32), Err(deepis::Error::Shape(_))));
    }
    println!("{} roundings to f16 and bf16 and 2 x 65536 widenings equal the half crate on both schedules", shape.len());
}
