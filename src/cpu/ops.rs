//! The non-convolution ops on the host, channels-last, parallel over lines with rayon.
//! The callers (CpuBackend) have checked shapes and parameter lengths.
use crate::tensor::Shape;
use rayon::prelude::*;

/// Elements per rayon task for element-wise ops (a multiple of the channel count is not needed).
const EW_CHUNK: usize = 1 << 14;

/// out[i] = f(x[i]).
pub fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(EW_CHUNK).zip(x.par_chunks(EW_CHUNK)).for_each(|(o, x)| {
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x));
    });
    out
}

/// out[i] = f(a[i], b[i]).
pub fn zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    out.par_chunks_mut(EW_CHUNK).zip(a.par_chunks(EW_CHUNK).zip(b.par_chunks(EW_CHUNK))).for_each(|(o, (a, b))| {
        o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = f(a, b));
    });
    out
}

#[inline(always)]
pub fn relu(v: f32) -> f32 {
    // max(v, 0) that keeps NaN, as torch.relu does
    if v < 0.0 { 0.0 } else { v }
}

/// y = x * scale[c] + shift[c], optional ReLU; `c == scale.len() == shift.len() > 0`.
pub fn channel_affine(x: &[f32], scale: &[f32], shift: &[f32], do_relu: bool) -> Vec<f32> {
    let c = scale.len();
    let mut out = vec![0.0f32; x.len()];
    let chunk = c * (EW_CHUNK / c).max(1);
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, x)| {
        for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for (((o, &x), &a), &b) in o.iter_mut().zip(x).zip(scale).zip(shift) {
                let y = x * a + b;
                *o = if do_relu { relu(y) } else { y };
            }
        }
    });
    out
}

/// 2x2x2 max-pool with stride 2; odd sizes are floored. `os` is the output shape (d / 2).
pub fn maxpool2(x: &[f32], xs: Shape, os: Shape) -> Vec<f32> {
    let c = xs.c;
    let [d0, d1, d2] = xs.d;
    let [o0n, o1n, o2n] = os.d;
    let mut out = vec![0.0f32; os.len()];
    if os.is_empty() {
        return out;
    }
    out.par_chunks_mut(o2n * c).enumerate().for_each(|(r, orow)| {
        let o1 = r % o1n;
        let o0 = (r / o1n) % o0n;
        let n = r / (o1n * o0n);
        orow.fill(f32::NEG_INFINITY);
        for a in 0..2 {
            for b in 0..2 {
                let start = ((n * d0 + 2 * o0 + a) * d1 + 2 * o1 + b) * d2 * c;
                let line = &x[start..start + d2 * c];
                for (o, pair) in orow.chunks_exact_mut(c).zip(line.chunks_exact(2 * c)) {
                    let (p, q) = pair.split_at(c);
                    for ((o, &p), &q) in o.iter_mut().zip(p).zip(q) {
                        *o = max_nan(max_nan(*o, p), q);
                    }
                }
            }
        }
    });
    out
}

/// max that propagates NaN, like torch's max-pool.
#[inline(always)]
fn max_nan(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() { v } else { m }
}

/// Source indices and weights of linear interpolation with align_corners=True along one axis,
/// computed as PyTorch's CPU kernel does: src = (in-1)/(out-1) * dst, i0 = floor(src),
/// i1 = i0 + (i0 < in-1), l1 = src - i0, l0 = 1 - l1. Target size 1 uses index 0.
pub fn lin_weights(inp: usize, out: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = if out > 1 { (inp - 1) as f32 / (out - 1) as f32 } else { 0.0 };
    (0..out)
        .map(|o| {
            let src = scale * o as f32;
            let i0 = (src as usize).min(inp - 1);
            let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Trilinear up-sampling (align_corners=True) of `x` (shape xs) to `os` (same n and c).
pub fn upsample(x: &[f32], xs: Shape, os: Shape) -> Vec<f32> {
    let c = xs.c;
    let [d0, d1, d2] = xs.d;
    let [o0n, o1n, o2n] = os.d;
    let w0 = lin_weights(d0, o0n);
    let w1 = lin_weights(d1, o1n);
    let w2 = lin_weights(d2, o2n);
    let mut out = vec![0.0f32; os.len()];
    if os.is_empty() {
        return out;
    }
    out.par_chunks_mut(o2n * c).enumerate().for_each(|(r, orow)| {
        let o1 = r % o1n;
        let o0 = (r / o1n) % o0n;
        let n = r / (o1n * o0n);
        let (a0, a1, la0, la1) = w0[o0];
        let (b0, b1, lb0, lb1) = w1[o1];
        orow.fill(0.0);
        for (i0, l0) in [(a0, la0), (a1, la1)] {
            for (i1, l1) in [(b0, lb0), (b1, lb1)] {
                let wl = l0 * l1;
                let start = ((n * d0 + i0) * d1 + i1) * d2 * c;
                let line = &x[start..start + d2 * c];
                for (o, &(e0, e1, le0, le1)) in orow.chunks_exact_mut(c).zip(&w2) {
                    let (p, q) = (&line[e0 * c..e0 * c + c], &line[e1 * c..e1 * c + c]);
                    let (wp, wq) = (wl * le0, wl * le1);
                    for ((o, &p), &q) in o.iter_mut().zip(p).zip(q) {
                        *o += wp * p + wq * q;
                    }
                }
            }
        }
    });
    out
}

/// Numerically stable softmax over the last axis (channels), `c > 0`.
pub fn softmax(x: &[f32], c: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let chunk = c * (EW_CHUNK / c).max(1);
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, x)| {
        for (o, x) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (o, &v) in o.iter_mut().zip(x) {
                *o = (v - m).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        }
    });
    out
}

#[inline(always)]
pub fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}
