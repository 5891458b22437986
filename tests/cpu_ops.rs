//! The CPU backend op by op against naive float64 loops written here straight from the PyTorch
//! definitions (NCDHW tensors, PyTorch weight layout [cout][cin][k0][k1][k2]), on odd shapes.
//! Every case prints the op, the shape and the measured error max|a-e| / max(1, max|e|).
use deepis::backend::{conv_weight_layout, Backend, ConvSpec, DevTensor};
use deepis::cpu::{ConvPath, CpuBackend};
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::Error;

const TOL: f32 = 1e-5;

/// xorshift64*: deterministic uniform values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
        v as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// An NCDHW tensor as PyTorch holds it, in float64.
struct Nc {
    dims: [usize; 5],
    data: Vec<f64>,
}
impl Nc {
    fn at(&self, n: usize, c: usize, i: [usize; 3]) -> f64 {
        let [_, cc, a, b, e] = self.dims;
        self.data[(((n * cc + c) * a + i[0]) * b + i[1]) * e + i[2]]
    }
}

/// A random channels-last input tensor and its NCDHW float64 twin.
fn input(rng: &mut Rng, shape: Shape, scale: f32) -> (DevTensor<Vec<f32>>, Nc) {
    let dims = shape.ncdhw();
    let src: Vec<f32> = rng.vec(shape.len()).into_iter().map(|v| v * scale).collect();
    let t = Tensor::from_ncdhw(dims, &src).unwrap();
    (DevTensor { shape: t.shape, data: t.data }, Nc { dims, data: src.iter().map(|&v| v as f64).collect() })
}

/// Compares a backend result (channels-last) with an NCDHW float64 expectation; prints and asserts.
fn check(op: &str, case: &str, got: &DevTensor<Vec<f32>>, want: &Nc) {
    assert_eq!(got.shape.ncdhw(), want.dims, "{op} {case}: output shape");
    let got = Tensor { shape: got.shape, data: got.data.clone() }.to_ncdhw();
    let want: Vec<f32> = want.data.iter().map(|&v| v as f32).collect();
    let err = rel_err(&got, &want, 1.0);
    println!("{op:<15} {case:<58} err {err:.2e}");
    assert!(err <= TOL, "{op} {case}: error {err:e} > {TOL:e}");
}

fn d3(i: usize, d: [usize; 3]) -> [usize; 3] {
    [i / (d[1] * d[2]), (i / d[2]) % d[1], i % d[2]]
}

// ---- conv3d -------------------------------------------------------------------------------------

/// PyTorch's Conv3d: out[n][co][o] = b[co] + sum_{ci,k} x[n][ci][o*s - p + k] * W[co][ci][k], zero padding.
fn ref_conv(x: &Nc, w: &[f32], b: Option<&[f32]>, spec: &ConvSpec) -> Nc {
    let [n, _, a, bb, e] = x.dims;
    let od = spec.out_dims([a, bb, e]);
    let (ci_n, co_n, k) = (spec.cin, spec.cout, spec.k);
    let mut out = Vec::with_capacity(n * co_n * od.iter().product::<usize>());
    for nn in 0..n {
        for co in 0..co_n {
            for p in 0..od.iter().product() {
                let o = d3(p, od);
                let mut acc = b.map_or(0.0, |b| b[co] as f64);
                for ci in 0..ci_n {
                    for t in 0..k.iter().product() {
                        let kk = d3(t, k);
                        let i: [isize; 3] = std::array::from_fn(|j| {
                            (o[j] * spec.stride[j] + kk[j]) as isize - spec.pad[j] as isize
                        });
                        if (0..3).any(|j| i[j] < 0 || i[j] >= [a, bb, e][j] as isize) {
                            continue;
                        }
                        let wv = w[(co * ci_n + ci) * k.iter().product::<usize>() + t] as f64;
                        acc += wv * x.at(nn, ci, i.map(|v| v as usize));
                    }
                }
                out.push(acc);
            }
        }
    }
    Nc { dims: [n, co_n, od[0], od[1], od[2]], data: out }
}

fn spec(cin: usize, cout: usize, k: [usize; 3], stride: [usize; 3], pad: [usize; 3]) -> ConvSpec {
    ConvSpec { cin, cout, k, stride, pad }
}

/// Every conv geometry the model uses, plus odd ones, on odd shapes (N, D0xD1xD2).
fn conv_cases() -> Vec<(ConvSpec, Shape, bool)> {
    let mut v = Vec::new();
    let odd = |c| Shape::new(2, [5, 7, 3], c);
    // 3x3x3 pad 1, stride 1 and 2 (conv1, bottleneck conv3, ConBR, classifier without bias)
    v.push((spec(3, 5, [3; 3], [1; 3], [1; 3]), odd(3), true));
    v.push((spec(4, 3, [3; 3], [2; 3], [1; 3]), odd(4), true));
    v.push((spec(1, 4, [3; 3], [1; 3], [1; 3]), odd(1), true));
    v.push((spec(5, 2, [3; 3], [1; 3], [1; 3]), odd(5), false));
    v.push((spec(4, 4, [3; 3], [2; 3], [1; 3]), Shape::new(1, [1, 2, 6], 4), true));
    v.push((spec(3, 4, [3; 3], [1; 3], [1; 3]), Shape::new(2, [1, 1, 1], 3), true));
    // register-block paths: 16+ output channels, lines longer than the position block
    v.push((spec(8, 35, [3; 3], [1; 3], [1; 3]), Shape::new(1, [3, 4, 9], 8), true));
    v.push((spec(17, 32, [3; 3], [2; 3], [1; 3]), Shape::new(2, [4, 5, 11], 17), true));
    v.push((spec(32, 16, [3; 3], [1; 3], [1; 3]), Shape::new(1, [2, 3, 6], 32), false));
    v.push((spec(64, 64, [3; 3], [1; 3], [1; 3]), Shape::new(1, [3, 4, 10], 64), true));
    v.push((spec(64, 48, [3; 3], [2; 3], [1; 3]), Shape::new(1, [5, 4, 9], 64), true));
    // 1x1x1 stride 1 and 2 (reduce, increase, proj, gcn1, ConBR c1, final, classifier out)
    v.push((spec(3, 5, [1; 3], [1; 3], [0; 3]), odd(3), true));
    v.push((spec(4, 3, [1; 3], [2; 3], [0; 3]), odd(4), true));
    v.push((spec(5, 1, [1; 3], [1; 3], [0; 3]), odd(5), true));
    v.push((spec(24, 40, [1; 3], [2; 3], [0; 3]), Shape::new(2, [3, 5, 9], 24), true));
    v.push((spec(20, 16, [1; 3], [1; 3], [0; 3]), Shape::new(1, [2, 2, 7], 20), false));
    // GCN separable convs, k in {3, 7}, pad (k-1)/2, on sizes smaller than k as well
    for k in [3usize, 7] {
        let p = (k - 1) / 2;
        for (kk, pp) in [([k, 1, 1], [p, 0, 0]), ([1, 1, k], [0, 0, p]), ([1, k, 1], [0, p, 0])] {
            v.push((spec(3, 4, kk, [1; 3], pp), odd(3), true));
            v.push((spec(4, 17, kk, [1; 3], pp), Shape::new(1, [2, 3, 9], 4), true));
        }
    }
    // odd geometry: anisotropic kernel, stride and padding
    v.push((spec(3, 4, [2, 3, 1], [1, 2, 3], [0, 1, 0]), odd(3), true));
    v
}

fn run_conv_cases(be: &CpuBackend, label: &str) {
    let mut rng = Rng::new(7);
    for (sp, shape, with_bias) in conv_cases() {
        let (x, xr) = input(&mut rng, shape, 1.0);
        let wt = rng.vec(sp.weight_len());
        let b = rng.vec(sp.cout);
        let w = be.upload_param(&conv_weight_layout(&sp, &wt)).unwrap();
        let bd = be.upload_param(&b).unwrap();
        let got = be.conv3d(&x, &w, with_bias.then_some(&bd), &sp).unwrap();
        let want = ref_conv(&xr, &wt, with_bias.then_some(&b[..]), &sp);
        let case = format!(
            "{label} {}->{} k{:?} s{:?} p{:?}{} on {}",
            sp.cin, sp.cout, sp.k, sp.stride, sp.pad, if with_bias { "" } else { " nobias" }, shape
        );
        check("conv3d", &case, &got, &want);
    }
}

#[test]
fn conv3d_matches_reference() {
    let be = CpuBackend::new();
    println!("conv path {:?}, {} threads", be.conv_path(), be.threads());
    run_conv_cases(&be, "fast");
}

#[test]
fn conv3d_portable_matches_reference() {
    let be = CpuBackend::portable();
    assert_eq!(be.conv_path(), ConvPath::Portable);
    run_conv_cases(&be, "portable");
}

#[test]
fn conv3d_shape_errors() {
    let be = CpuBackend::new();
    let x = DevTensor { shape: Shape::new(1, [4, 4, 4], 3), data: vec![0.5; 192] };
    let sp = spec(3, 2, [3; 3], [1; 3], [1; 3]);
    let w = vec![0.1f32; sp.weight_len()];
    let b = vec![0.0f32; 2];
    let expect_err = |r: deepis::Result<DevTensor<Vec<f32>>>, what: &str| match r {
        Err(Error::Shape(m)) => println!("conv3d error   {what:<40} -> {m}"),
        Err(e) => panic!("{what}: wrong error kind {e}"),
        Ok(_) => panic!("{what}: no error"),
    };
    assert!(be.conv3d(&x, &w, Some(&b), &sp).is_ok());
    expect_err(be.conv3d(&x, &w[1..].to_vec(), Some(&b), &sp), "weight one value short");
    expect_err(be.conv3d(&x, &[w.clone(), w.clone()].concat(), None, &sp), "weight twice as long");
    expect_err(be.conv3d(&x, &w, Some(&vec![0.0; 3]), &sp), "bias length 3 for cout 2");
    expect_err(be.conv3d(&x, &w, None, &spec(4, 2, [3; 3], [1; 3], [1; 3])), "cin 4 on a 3-channel input");
    let big = spec(3, 2, [7, 1, 1], [1; 3], [0; 3]);
    expect_err(be.conv3d(&x, &vec![0.0; big.weight_len()], None, &big), "kernel 7 on size 4 without padding");
    let zs = spec(3, 2, [3; 3], [0, 1, 1], [1; 3]);
    expect_err(be.conv3d(&x, &w, None, &zs), "stride 0");
    let bad = DevTensor { shape: x.shape, data: vec![0.0; 191] };
    expect_err(be.conv3d(&bad, &w, None, &sp), "storage shorter than the shape");
}

// ---- element-wise and per-channel ops -------------------------------------------------------------

fn shapes() -> Vec<Shape> {
    vec![
        Shape::new(2, [5, 7, 3], 3),
        Shape::new(2, [5, 7, 3], 5),
        Shape::new(1, [1, 1, 1], 4),
        Shape::new(1, [1, 6, 1], 1),
        Shape::new(2, [3, 1, 5], 4),
        Shape::new(1, [9, 8, 7], 33),
    ]
}

fn map_ref(x: &Nc, f: impl Fn(usize, f64) -> f64) -> Nc {
    let [_, c, a, b, e] = x.dims;
    let v = a * b * e;
    Nc { dims: x.dims, data: x.data.iter().enumerate().map(|(i, &val)| f((i / v) % c, val)).collect() }
}

#[test]
fn channel_affine_matches_reference() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(11);
    for shape in shapes() {
        for relu in [false, true] {
            let (x, xr) = input(&mut rng, shape, 3.0);
            let scale = rng.vec(shape.c);
            let shift = rng.vec(shape.c);
            let got = be.channel_affine(&x, &scale, &shift, relu).unwrap();
            let want = map_ref(&xr, |c, v| {
                let y = v * scale[c] as f64 + shift[c] as f64;
                if relu { y.max(0.0) } else { y }
            });
            check("channel_affine", &format!("relu={relu} {shape}"), &got, &want);
        }
    }
    let (x, _) = input(&mut rng, Shape::new(1, [2, 2, 2], 3), 1.0);
    assert!(matches!(be.channel_affine(&x, &vec![1.0; 2], &vec![0.0; 3], false), Err(Error::Shape(_))));
    assert!(matches!(be.channel_affine(&x, &vec![1.0; 3], &vec![0.0; 4], true), Err(Error::Shape(_))));
}

#[test]
fn relu_sigmoid_match_reference() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(13);
    for shape in shapes() {
        let (x, xr) = input(&mut rng, shape, 4.0);
        check("relu", &shape.to_string(), &be.relu(&x).unwrap(), &map_ref(&xr, |_, v| v.max(0.0)));
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        check("sigmoid", &shape.to_string(), &be.sigmoid(&x).unwrap(), &map_ref(&xr, |_, v| sig(v)));
        // saturated inputs: no NaN or overflow
        let (x, xr) = input(&mut rng, shape, 200.0);
        check("sigmoid", &format!("|x|<=200 {shape}"), &be.sigmoid(&x).unwrap(), &map_ref(&xr, |_, v| sig(v)));
    }
}

#[test]
fn add_matches_reference() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(17);
    for shape in shapes() {
        for relu in [false, true] {
            let (a, ar) = input(&mut rng, shape, 2.0);
            let (b, br) = input(&mut rng, shape, 2.0);
            let want = Nc {
                dims: ar.dims,
                data: ar.data.iter().zip(&br.data).map(|(p, q)| if relu { (p + q).max(0.0) } else { p + q }).collect(),
            };
            check("add", &format!("relu={relu} {shape}"), &be.add(&a, &b, relu).unwrap(), &want);
        }
    }
    let (a, _) = input(&mut rng, Shape::new(1, [2, 2, 2], 3), 1.0);
    let (b, _) = input(&mut rng, Shape::new(1, [2, 2, 2], 4), 1.0);
    assert!(matches!(be.add(&a, &b, false), Err(Error::Shape(_))));
}

// ---- max-pool, up-sampling, softmax -------------------------------------------------------------

/// F.max_pool3d(x, 2): out[o] = max over a,b,e in {0,1} of x[2o + (a,b,e)]; sizes floor(d / 2).
fn ref_maxpool(x: &Nc) -> Nc {
    let [n, c, a, b, e] = x.dims;
    let od = [a / 2, b / 2, e / 2];
    let mut out = Vec::new();
    for nn in 0..n {
        for cc in 0..c {
            for p in 0..od.iter().product() {
                let o = d3(p, od);
                let mut m = f64::NEG_INFINITY;
                for t in 0..8 {
                    let k = d3(t, [2, 2, 2]);
                    m = m.max(x.at(nn, cc, [2 * o[0] + k[0], 2 * o[1] + k[1], 2 * o[2] + k[2]]));
                }
                out.push(m);
            }
        }
    }
    Nc { dims: [n, c, od[0], od[1], od[2]], data: out }
}

#[test]
fn maxpool2_matches_reference() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(19);
    for shape in [
        Shape::new(2, [5, 7, 3], 3),
        Shape::new(2, [4, 6, 8], 5),
        Shape::new(1, [2, 2, 2], 4),
        Shape::new(1, [3, 3, 3], 1),
        Shape::new(2, [9, 2, 5], 33),
    ] {
        let (x, xr) = input(&mut rng, shape, 1.0);
        check("maxpool2", &shape.to_string(), &be.maxpool2(&x).unwrap(), &ref_maxpool(&xr));
    }
    let (x, _) = input(&mut rng, Shape::new(1, [4, 1, 4], 2), 1.0);
    assert!(matches!(be.maxpool2(&x), Err(Error::Shape(_))));
}

/// F.interpolate(mode="trilinear", align_corners=True): per axis src = o * (in-1)/(out-1)
/// (0 when out == 1), i0 = floor(src), i1 = min(i0 + 1, in - 1), l = src - i0.
fn ref_upsample(x: &Nc, size: [usize; 3]) -> Nc {
    let [n, c, a, b, e] = x.dims;
    let ind = [a, b, e];
    let axis = |j: usize, o: usize| -> [(usize, f64); 2] {
        let (i, out) = (ind[j], size[j]);
        let src = if out > 1 { o as f64 * (i - 1) as f64 / (out - 1) as f64 } else { 0.0 };
        let i0 = (src.floor() as usize).min(i - 1);
        let i1 = (i0 + 1).min(i - 1);
        let l = src - i0 as f64;
        [(i0, 1.0 - l), (i1, l)]
    };
    let mut out = Vec::new();
    for nn in 0..n {
        for cc in 0..c {
            for p in 0..size.iter().product() {
                let o = d3(p, size);
                let mut acc = 0.0;
                for (i0, l0) in axis(0, o[0]) {
                    for (i1, l1) in axis(1, o[1]) {
                        for (i2, l2) in axis(2, o[2]) {
                            acc += l0 * l1 * l2 * x.at(nn, cc, [i0, i1, i2]);
                        }
                    }
                }
                out.push(acc);
            }
        }
    }
    Nc { dims: [n, c, size[0], size[1], size[2]], data: out }
}

#[test]
fn upsample_matches_reference() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(23);
    for (shape, size) in [
        (Shape::new(2, [3, 1, 5], 3), [7, 4, 9]),
        (Shape::new(1, [1, 1, 1], 4), [3, 3, 3]),
        (Shape::new(2, [4, 4, 2], 5), [8, 8, 4]),   // the decoder's x2 levels
        (Shape::new(1, [3, 3, 2], 4), [5, 5, 3]),   // x2 of an odd level: 2s-1
        (Shape::new(1, [5, 7, 3], 3), [5, 7, 3]),   // identity
        (Shape::new(1, [4, 6, 5], 2), [2, 3, 1]),   // down-sampling, target size 1
        (Shape::new(2, [2, 3, 4], 33), [6, 5, 11]),
    ] {
        let (x, xr) = input(&mut rng, shape, 1.0);
        let got = be.upsample(&x, size).unwrap();
        check("upsample", &format!("{shape} -> {size:?}"), &got, &ref_upsample(&xr, size));
    }
    let (x, _) = input(&mut rng, Shape::new(1, [2, 2, 2], 2), 1.0);
    assert!(matches!(be.upsample(&x, [4, 0, 4]), Err(Error::Shape(_))));
}

#[test]
fn softmax_matches_reference() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(29);
    for shape in shapes() {
        for (scale, offset) in [(3.0f32, 0.0f32), (50.0, 1000.0)] {
            let (mut x, xr) = input(&mut rng, shape, scale);
            x.data.iter_mut().for_each(|v| *v += offset);
            // the reference sees the same float32 inputs (x + 1000 rounds in float32)
            let xr = Nc { data: Tensor { shape, data: x.data.clone() }.to_ncdhw().iter().map(|&v| v as f64).collect(), ..xr };
            let [n, c, a, b, e] = xr.dims;
            let v = a * b * e;
            let mut want = xr.data.clone();
            for nn in 0..n {
                for p in 0..v {
                    let at = |cc: usize| (nn * c + cc) * v + p;
                    let m = (0..c).map(|cc| xr.data[at(cc)]).fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = (0..c).map(|cc| (xr.data[at(cc)] - m).exp()).sum();
                    (0..c).for_each(|cc| want[at(cc)] = (xr.data[at(cc)] - m).exp() / s);
                }
            }
            let got = be.softmax(&x).unwrap();
            assert!(got.data.iter().all(|v| v.is_finite()));
            check("softmax", &format!("x*{scale}+{offset} {shape}"), &got, &Nc { dims: xr.dims, data: want });
        }
    }
}

#[test]
fn upload_download_roundtrip() {
    let be = CpuBackend::new();
    let t = Tensor::new(Shape::new(1, [2, 3, 1], 2), (0..12).map(|v| v as f32).collect()).unwrap();
    let d = be.upload(&t).unwrap();
    assert_eq!(be.download(&d).unwrap(), t);
    assert_eq!(be.name(), "cpu");
    assert!(be.threads() >= 1);
}

// ---- timing ---------------------------------------------------------------------------------------

/// cargo test --release --test cpu_ops -- --ignored --nocapture
#[test]
#[ignore]
fn conv3d_timing() {
    let mut rng = Rng::new(31);
    let cases = [(64, 64, 3, 1, 1), (64, 64, 1, 1, 0), (128, 128, 3, 1, 1), (64, 64, 3, 1, 1)];
    for (i, (cin, cout, k, s, p)) in cases.into_iter().enumerate() {
        // the last case: the portable path (no AVX2/FMA dispatch) for comparison
        let be = if i + 1 == cases.len() { CpuBackend::portable() } else { CpuBackend::new() };
        let sp = spec(cin, cout, [k; 3], [s; 3], [p; 3]);
        let shape = Shape::new(1, [32, 32, 32], cin);
        let x = DevTensor { shape, data: rng.vec(shape.len()) };
        let w = rng.vec(sp.weight_len());
        let b = rng.vec(cout);
        let y = be.conv3d(&x, &w, Some(&b), &sp).unwrap(); // warm-up
        let flops = sp.flops(y.shape);
        let reps = 5;
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = std::time::Instant::now();
            let y = be.conv3d(&x, &w, Some(&b), &sp).unwrap();
            std::hint::black_box(&y);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "conv3d {cin}->{cout} {k}x{k}x{k} on 32^3 ({:?}, {} threads): {:.2} ms, {:.1} GFLOP/s",
            be.conv_path(),
            be.threads(),
            best * 1e3,
            flops / best / 1e9
        );
    }
}
