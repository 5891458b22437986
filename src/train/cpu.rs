//! `TrainBackend` for the CPU backend: the reference the GPU backward kernels are checked against.
//!
//! Reductions over voxels are split into a fixed number of chunks that depends on the shapes only
//! (never on the thread count), each chunk summed in order, and the partial sums added in order in
//! float64: the results are the same bits on every run and every machine with the same build.
//! Input gradients of convolutions reuse the forward kernel: for stride 1 with weights flipped in
//! space and transposed in channels; for stride 2 on a zero-dilated, explicitly padded gradient.
use super::backend::{BnBackward, BnForward, BnSaved, TrainBackend};
use crate::backend::{Backend, ConvSpec, DevTensor};
#[cfg(target_arch = "x86_64")]
use crate::cpu::conv::Fused;
use crate::cpu::conv::{for_each_tap_row, Line, MulAdd, PaddedLine, Plain};
use crate::cpu::ops::lin_weights;
use crate::cpu::{check_len, check_param, check_same, CpuBackend};
use crate::error::{Error, Result};
use crate::tensor::Shape;
use rayon::prelude::*;

type T = DevTensor<Vec<f32>>;

/// Number of chunks a reduction over `rows` rows is split into: at most 64, and few enough that
/// `chunks * acc_len` partial sums stay under 16 M values.
fn n_chunks(rows: usize, acc_len: usize) -> usize {
    rows.clamp(1, 64).min(((1usize << 24) / acc_len.max(1)).max(1))
}

/// Sums per-chunk partials (in chunk order) in float64.
fn sum_partials(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut acc = vec![0.0f64; len];
    for p in parts {
        for (a, &v) in acc.iter_mut().zip(p) {
            *a += v as f64;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// Per-channel float64 sums of f(row values) over `rows` rows of `c` channels, deterministically.
fn channel_sums(n: usize, c: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let chunks = n_chunks(n, 2 * c);
    let per = n.div_ceil(chunks.max(1)).max(1);
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(per))
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![0.0f64; c];
            for r in k * per..((k + 1) * per).min(n) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f64; c];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// Per-channel float64 sums of `data`, rows of `c` values, deterministically.
fn channel_sum(data: &[f32], c: usize) -> Vec<f64> {
    channel_sums(data.len() / c.max(1), c, |r, acc| {
        for (a, &v) in acc.iter_mut().zip(&data[r * c..(r + 1) * c]) {
            *a += v as f64;
        }
    })
}

/// Weights for the input gradient of a convolution: flipped in space, cin and cout swapped.
pub fn flip_weights(w: &[f32], spec: &ConvSpec) -> Vec<f32> {
    let [k0, k1, k2] = spec.k;
    let (ci, co) = (spec.cin, spec.cout);
    let mut out = vec![0.0f32; w.len()];
    for a in 0..k0 {
        for b in 0..k1 {
            for c in 0..k2 {
                let t = (a * k1 + b) * k2 + c;
                let tf = ((k0 - 1 - a) * k1 + (k1 - 1 - b)) * k2 + (k2 - 1 - c);
                for i in 0..ci {
                    for o in 0..co {
                        out[(tf * co + o) * ci + i] = w[(t * ci + i) * co + o];
                    }
                }
            }
        }
    }
    out
}

/// Output channels per register block of the weight-gradient kernel.
const WCB: usize = 16;
/// Input channels per register block.
const WCI: usize = 4;

/// The weight gradient of one output line: w[t][ci][co] += x[o * s + t][ci] * dy[o][co] over o.
/// Register blocks of WCI input x WCB output channels accumulate over the whole line, so each
/// weight is loaded and stored once per line and tap, not once per output voxel.
#[inline(always)]
fn wgrad_line<M: MulAdd>(x: &[f32], dy: &[f32], w: &mut [f32], g: Line) {
    let Line { n_out, s, k, cin, cout } = g;
    assert!(n_out > 0 && x.len() >= ((n_out - 1) * s + k) * cin && dy.len() >= n_out * cout && w.len() >= k * cin * cout);
    let cb_full = cout / WCB * WCB;
    let ci_full = cin / WCI * WCI;
    for t in 0..k {
        let wt = &mut w[t * cin * cout..(t + 1) * cin * cout];
        for cb in (0..cb_full).step_by(WCB) {
            let mut ci = 0;
            while ci < ci_full {
                let mut acc = [[0.0f32; WCB]; WCI];
                for (q, a) in acc.iter_mut().enumerate() {
                    a.copy_from_slice(&wt[(ci + q) * cout + cb..][..WCB]);
                }
                for o in 0..n_out {
                    let d: &[f32; WCB] = dy[o * cout + cb..][..WCB].try_into().unwrap();
                    let xo: &[f32; WCI] = x[(o * s + t) * cin + ci..][..WCI].try_into().unwrap();
                    for q in 0..WCI {
                        for j in 0..WCB {
                            acc[q][j] = M::mul_add(xo[q], d[j], acc[q][j]);
                        }
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    wt[(ci + q) * cout + cb..][..WCB].copy_from_slice(a);
                }
                ci += WCI;
            }
            for ci in ci_full..cin {
                let mut acc = [0.0f32; WCB];
                acc.copy_from_slice(&wt[ci * cout + cb..][..WCB]);
                for o in 0..n_out {
                    let xv = x[(o * s + t) * cin + ci];
                    let d = &dy[o * cout + cb..][..WCB];
                    for j in 0..WCB {
                        acc[j] = M::mul_add(xv, d[j], acc[j]);
                    }
                }
                wt[ci * cout + cb..][..WCB].copy_from_slice(&acc);
            }
        }
        if cb_full < cout {
            for o in 0..n_out {
                let d = &dy[o * cout + cb_full..(o + 1) * cout];
                let xo = &x[(o * s + t) * cin..(o * s + t + 1) * cin];
                for (ci, &xv) in xo.iter().enumerate() {
                    let wr = &mut wt[ci * cout + cb_full..(ci + 1) * cout];
                    for (wv, &dv) in wr.iter_mut().zip(d) {
                        *wv = M::mul_add(xv, dv, *wv);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wgrad_line_avx2(x: &[f32], dy: &[f32], w: &mut [f32], g: Line) {
    wgrad_line::<Fused>(x, dy, w, g)
}


/// Deterministic weight gradient of a convolution, engine layout.
pub fn conv3d_wgrad(x: &[f32], xs: Shape, dy: &[f32], spec: &ConvSpec) -> Vec<f32> {
    let os = spec.out_shape(xs);
    let od = os.d;
    let k2n = spec.k[2];
    let (cin, cout) = (spec.cin, spec.cout);
    let wlen = spec.weight_len();
    let lines = xs.n * od[0] * od[1];
    let chunks = n_chunks(lines, wlen);
    let per = lines.div_ceil(chunks).max(1);
    let wrow = k2n * cin * cout;
    let avx = crate::cpu::simd::avx2_fma();
    let line = Line { n_out: od[2], s: spec.stride[2], k: k2n, cin, cout };
    let parts: Vec<Vec<f32>> = (0..lines.div_ceil(per))
        .into_par_iter()
        .map(|ch| {
            let mut acc = vec![0.0f32; wlen];
            let mut pad = PaddedLine::new(xs, spec);
            for r in ch * per..((ch + 1) * per).min(lines) {
                let dyl = &dy[r * od[2] * cout..(r + 1) * od[2] * cout];
                for_each_tap_row(xs, spec, os.line_coords(r), |t, start| {
                    let xl = pad.get(x, start);
                    let wt = &mut acc[t * wrow..][..wrow];
                    if avx {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `avx` is true only when the CPU reports AVX2 and FMA.
                        unsafe {
                            wgrad_line_avx2(xl, dyl, wt, line)
                        };
                    } else {
                        wgrad_line::<Plain>(xl, dyl, wt, line);
                    }
                });
            }
            acc
        })
        .collect();
    sum_partials(&parts, wlen)
}

/// Input gradient of a stride-s convolution: dy zero-dilated by the stride and padded by k-1-p in
/// front, k-1-p+r behind (r makes the result exactly `in_d`), then a pad-0 forward convolution.
fn dilate_pad(dy: &T, spec: &ConvSpec, in_d: [usize; 3]) -> T {
    let s = dy.shape;
    let c = s.c;
    let front: [usize; 3] = std::array::from_fn(|i| spec.k[i] - 1 - spec.pad[i]);
    // size after dilation and padding: in_d + k - 1
    let nd: [usize; 3] = std::array::from_fn(|i| in_d[i] + spec.k[i] - 1);
    let ns = Shape::new(s.n, nd, c);
    let mut out = vec![0.0f32; ns.len()];
    for n in 0..s.n {
        for a in 0..s.d[0] {
            for b in 0..s.d[1] {
                for e in 0..s.d[2] {
                    let src = (((n * s.d[0] + a) * s.d[1] + b) * s.d[2] + e) * c;
                    let (i0, i1, i2) = (front[0] + a * spec.stride[0], front[1] + b * spec.stride[1], front[2] + e * spec.stride[2]);
                    let dst = (((n * nd[0] + i0) * nd[1] + i1) * nd[2] + i2) * c;
                    out[dst..dst + c].copy_from_slice(&dy.data[src..src + c]);
                }
            }
        }
    }
    DevTensor { shape: ns, data: out }
}

impl TrainBackend for CpuBackend {
    fn download_param(&self, s: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(s.clone())
    }

    fn duplicate(&self, t: &T) -> Result<T> {
        check_len("duplicate", t)?;
        Ok(DevTensor { shape: t.shape, data: t.data.clone() })
    }

    fn accumulate(&self, acc: &mut T, g: &T) -> Result<()> {
        check_same("accumulate", acc, g)?;
        acc.data.par_chunks_mut(1 << 14).zip(g.data.par_chunks(1 << 14)).for_each(|(a, g)| {
            a.iter_mut().zip(g).for_each(|(a, &g)| *a += g);
        });
        Ok(())
    }

    fn accumulate_param(&self, acc: &mut Vec<f32>, g: &Vec<f32>) -> Result<()> {
        check_param("accumulate_param", "gradient", g, acc.len())?;
        acc.iter_mut().zip(g).for_each(|(a, &g)| *a += g);
        Ok(())
    }

    fn mul(&self, a: &T, b: &T) -> Result<T> {
        check_same("mul", a, b)?;
        Ok(DevTensor { shape: a.shape, data: crate::cpu::ops::zip(&a.data, &b.data, |p, q| p * q) })
    }

    fn conv3d_backward_input(&self, dy: &T, w: &Vec<f32>, spec: &ConvSpec, in_d: [usize; 3]) -> Result<T> {
        check_len("conv3d_backward_input", dy)?;
        check_param("conv3d_backward_input", "weight", w, spec.weight_len())?;
        if dy.shape.c != spec.cout || spec.out_dims(in_d) != dy.shape.d {
            return Err(Error::Shape(format!(
                "conv3d_backward_input: gradient {} does not match {spec:?} on input size {in_d:?}",
                dy.shape
            )));
        }
        let wf = flip_weights(w, spec);
        let fk = ConvSpec { cin: spec.cout, cout: spec.cin, k: spec.k, stride: [1; 3], pad: [0; 3] };
        if spec.stride == [1; 3] {
            let fk = ConvSpec { pad: std::array::from_fn(|i| spec.k[i] - 1 - spec.pad[i]), ..fk };
            return self.conv3d(dy, &wf, None, &fk);
        }
        let g = dilate_pad(dy, spec, in_d);
        self.conv3d(&g, &wf, None, &fk)
    }

    fn conv3d_backward_weight(&self, x: &T, dy: &T, spec: &ConvSpec) -> Result<Vec<f32>> {
        check_len("conv3d_backward_weight", x)?;
        check_len("conv3d_backward_weight", dy)?;
        let want = spec.out_shape(x.shape);
        if x.shape.c != spec.cin || dy.shape != want {
            return Err(Error::Shape(format!("conv3d_backward_weight: input {} and gradient {} do not match {spec:?}", x.shape, dy.shape)));
        }
        Ok(conv3d_wgrad(&x.data, x.shape, &dy.data, spec))
    }

    fn conv3d_backward_bias(&self, dy: &T) -> Result<Vec<f32>> {
        check_len("conv3d_backward_bias", dy)?;
        Ok(channel_sum(&dy.data, dy.shape.c).into_iter().map(|v| v as f32).collect())
    }

    fn batch_norm_train(&self, x: &T, gamma: &Vec<f32>, beta: &Vec<f32>, eps: f64) -> Result<BnForward<Vec<f32>>> {
        check_len("batch_norm_train", x)?;
        let c = x.shape.c;
        check_param("batch_norm_train", "gamma", gamma, c)?;
        check_param("batch_norm_train", "beta", beta, c)?;
        let rows = x.shape.n * x.shape.voxels();
        if rows == 0 || c == 0 {
            return Err(Error::Shape(format!("batch_norm_train: empty input {}", x.shape)));
        }
        let mean: Vec<f64> = channel_sum(&x.data, c).iter().map(|s| s / rows as f64).collect();
        let sq = channel_sums(rows, c, |r, acc| {
            for ((a, &v), m) in acc.iter_mut().zip(&x.data[r * c..(r + 1) * c]).zip(&mean) {
                let d = v as f64 - m;
                *a += d * d;
            }
        });
        let var: Vec<f64> = sq.iter().map(|s| s / rows as f64).collect();
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let scale: Vec<f32> = invstd.iter().zip(gamma).map(|(i, &g)| (i * g as f64) as f32).collect();
        let shift: Vec<f32> = mean.iter().zip(&scale).zip(beta).map(|((m, &s), &b)| (b as f64 - m * s as f64) as f32).collect();
        let y = self.channel_affine(x, &scale, &shift, false)?;
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        Ok((y, BnSaved { mean: f(&mean), invstd: f(&invstd), var: f(&var) }))
    }

    fn batch_norm_backward(&self, dy: &T, x: &T, gamma: &Vec<f32>, saved: &BnSaved<Vec<f32>>) -> Result<BnBackward<Vec<f32>>> {
        check_same("batch_norm_backward", dy, x)?;
        let c = x.shape.c;
        check_param("batch_norm_backward", "gamma", gamma, c)?;
        let rows = x.shape.n * x.shape.voxels();
        // The mean again in float64: with the float32 one, sum(xhat) and so sum(dx) (the gradient
        // of a conv bias feeding BN, exactly 0 in exact arithmetic) would carry a systematic
        // rounding error of M * |mean| * 6e-8.
        let mean: Vec<f64> = channel_sum(&x.data, c).iter().map(|s| s / rows as f64).collect();
        let invstd: Vec<f64> = saved.invstd.iter().map(|&v| v as f64).collect();
        // [sum dy | sum dy * xhat]
        let s = channel_sums(rows, 2 * c, |r, acc| {
            let (xs, ds) = (&x.data[r * c..(r + 1) * c], &dy.data[r * c..(r + 1) * c]);
            for ch in 0..c {
                let xhat = (xs[ch] as f64 - mean[ch]) * invstd[ch];
                acc[ch] += ds[ch] as f64;
                acc[c + ch] += ds[ch] as f64 * xhat;
            }
        });
        let dbeta: Vec<f32> = s[..c].iter().map(|&v| v as f32).collect();
        let dgamma: Vec<f32> = s[c..].iter().map(|&v| v as f32).collect();
        let m = rows as f64;
        let k: Vec<f64> = (0..c).map(|ch| gamma[ch] as f64 * invstd[ch]).collect();
        let mdy: Vec<f64> = (0..c).map(|ch| s[ch] / m).collect();
        let mdx: Vec<f64> = (0..c).map(|ch| s[c + ch] / m).collect();
        let mut dx = vec![0.0f32; x.data.len()];
        let chunk = c * ((1 << 14) / c).max(1);
        dx.par_chunks_mut(chunk).zip(x.data.par_chunks(chunk).zip(dy.data.par_chunks(chunk))).for_each(|(o, (xs, ds))| {
            for ((o, xs), ds) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)).zip(ds.chunks_exact(c)) {
                for ch in 0..c {
                    let xhat = (xs[ch] as f64 - mean[ch]) * invstd[ch];
                    o[ch] = (k[ch] * (ds[ch] as f64 - mdy[ch] - xhat * mdx[ch])) as f32;
                }
            }
        });
        Ok((DevTensor { shape: x.shape, data: dx }, dgamma, dbeta))
    }

    fn relu_backward(&self, dy: &T, y: &T) -> Result<T> {
        check_same("relu_backward", dy, y)?;
        Ok(DevTensor { shape: dy.shape, data: crate::cpu::ops::zip(&dy.data, &y.data, |g, y| if y > 0.0 { g } else { 0.0 }) })
    }

    fn maxpool2_backward(&self, dy: &T, x: &T) -> Result<T> {
        check_len("maxpool2_backward", dy)?;
        check_len("maxpool2_backward", x)?;
        let xs = x.shape;
        let os = xs.with_d(xs.d.map(|d| d / 2));
        if dy.shape != os {
            return Err(Error::Shape(format!("maxpool2_backward: gradient {} for input {}", dy.shape, xs)));
        }
        let c = xs.c;
        let [_, d1, d2] = xs.d;
        let [o0n, o1n, o2n] = os.d;
        let mut dx = vec![0.0f32; xs.len()];
        // one task per pair of input rows (n, 2*o0 + a): windows never overlap
        let plane = d1 * d2 * c;
        let per_n = xs.d[0] * plane;
        dx.par_chunks_mut(per_n).enumerate().for_each(|(n, dxn)| {
            let xn = &x.data[n * per_n..(n + 1) * per_n];
            for o0 in 0..o0n {
                for o1 in 0..o1n {
                    for o2 in 0..o2n {
                        for ch in 0..c {
                            // PyTorch's scan: start at the window's first voxel, take a larger value or a NaN
                            let mut best = f32::NEG_INFINITY;
                            let mut at = ((2 * o0 * d1 + 2 * o1) * d2 + 2 * o2) * c + ch;
                            for a in 0..2 {
                                for b in 0..2 {
                                    for e in 0..2 {
                                        let i = (((2 * o0 + a) * d1 + 2 * o1 + b) * d2 + 2 * o2 + e) * c + ch;
                                        let v = xn[i];
                                        if v > best || v.is_nan() {
                                            best = v;
                                            at = i;
                                        }
                                    }
                                }
                            }
                            dxn[at] += dy.data[(((n * o0n + o0) * o1n + o1) * o2n + o2) * c + ch];
                        }
                    }
                }
            }
        });
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn upsample_backward(&self, dy: &T, in_d: [usize; 3]) -> Result<T> {
        check_len("upsample_backward", dy)?;
        let os = dy.shape;
        let xs = os.with_d(in_d);
        if in_d.contains(&0) {
            return Err(Error::Shape(format!("upsample_backward: empty input size {in_d:?}")));
        }
        let c = xs.c;
        let [d0, d1, d2] = in_d;
        let [o0n, o1n, o2n] = os.d;
        let (w0, w1, w2) = (lin_weights(d0, o0n), lin_weights(d1, o1n), lin_weights(d2, o2n));
        let mut dx = vec![0.0f32; xs.len()];
        let per_n = xs.voxels() * c;
        if per_n == 0 {
            return Ok(DevTensor { shape: xs, data: dx });
        }
        // Separable adjoint, per volume: along d2, then d1, then d0 (each a small dense scatter).
        dx.par_chunks_mut(per_n).enumerate().for_each(|(n, dxn)| {
            let g = &dy.data[n * os.voxels() * c..(n + 1) * os.voxels() * c];
            // along d2: [o0][o1][o2][c] -> [o0][o1][d2][c]
            let mut a = vec![0.0f32; o0n * o1n * d2 * c];
            for r in 0..o0n * o1n {
                for (o2, &(e0, e1, l0, l1)) in w2.iter().enumerate() {
                    for ch in 0..c {
                        let v = g[(r * o2n + o2) * c + ch];
                        a[(r * d2 + e0) * c + ch] += l0 * v;
                        a[(r * d2 + e1) * c + ch] += l1 * v;
                    }
                }
            }
            // along d1: [o0][o1][d2 c] -> [o0][d1][d2 c]
            let row = d2 * c;
            let mut b = vec![0.0f32; o0n * d1 * row];
            for o0 in 0..o0n {
                for (o1, &(e0, e1, l0, l1)) in w1.iter().enumerate() {
                    let src = &a[(o0 * o1n + o1) * row..][..row];
                    for (k, &v) in src.iter().enumerate() {
                        b[(o0 * d1 + e0) * row + k] += l0 * v;
                        b[(o0 * d1 + e1) * row + k] += l1 * v;
                    }
                }
            }
            // along d0
            let plane = d1 * row;
            for (o0, &(e0, e1, l0, l1)) in w0.iter().enumerate() {
                let src = &b[o0 * plane..][..plane];
                for (k, &v) in src.iter().enumerate() {
                    dxn[e0 * plane + k] += l0 * v;
                    dxn[e1 * plane + k] += l1 * v;
                }
            }
        });
        Ok(DevTensor { shape: xs, data: dx })
    }

    fn sigmoid_backward(&self, dy: &T, y: &T) -> Result<T> {
        check_same("sigmoid_backward", dy, y)?;
        Ok(DevTensor { shape: dy.shape, data: crate::cpu::ops::zip(&dy.data, &y.data, |g, y| g * y * (1.0 - y)) })
    }

    fn softmax_backward(&self, dy: &T, y: &T) -> Result<T> {
        check_same("softmax_backward", dy, y)?;
        let c = y.shape.c;
        let mut dx = vec![0.0f32; y.data.len()];
        if c > 0 {
            dx.par_chunks_mut(c * 1024).zip(dy.data.par_chunks(c * 1024).zip(y.data.par_chunks(c * 1024))).for_each(|(o, (g, y))| {
                for ((o, g), y) in o.chunks_exact_mut(c).zip(g.chunks_exact(c)).zip(y.chunks_exact(c)) {
                    let s: f32 = g.iter().zip(y).map(|(g, y)| g * y).sum();
                    for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                        *o = y * (g - s);
                    }
                }
            });
        }
        Ok(DevTensor { shape: dy.shape, data: dx })
    }
}
