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
    let mut out = vec![0.0f32; os.len()];
    maxpool2_into(x, xs, &mut out, os);
    out
}

/// `maxpool2` into `out` (os.len() values), for the plan's preallocated buffers.
pub fn maxpool2_into(x: &[f32], xs: Shape, out: &mut [f32], os: Shape) {
    let c = xs.c;
    let d2 = xs.d[2];
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(os.d[2] * c).enumerate().for_each(|(r, orow)| {
        let (n, o0, o1) = os.line_coords(r);
        orow.fill(f32::NEG_INFINITY);
        for a in 0..2 {
            for b in 0..2 {
                let start = xs.line_start(n, 2 * o0 + a, 2 * o1 + b);
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
    let up = Upsampler::new(xs, os);
    let mut out = vec![0.0f32; os.len()];
    if os.is_empty() {
        return out;
    }
    out.par_chunks_mut(os.d[2] * os.c).enumerate().for_each(|(r, orow)| up.add_line(x, r, orow));
    out
}

/// Trilinear up-sampling (align_corners=True) from `xs` to `os` (same n and c), one output line
/// at a time: the reference op and the plan's fused up-sample + skip share this, so both sum the
/// same terms in the same order.
pub(crate) struct Upsampler {
    xs: Shape,
    os: Shape,
    w: [Vec<(usize, usize, f32, f32)>; 3],
}

impl Upsampler {
    pub(crate) fn new(xs: Shape, os: Shape) -> Self {
        let w = std::array::from_fn(|i| lin_weights(xs.d[i], os.d[i]));
        Upsampler { xs, os, w }
    }

    /// orow += output line `r` (os.d[2] x c values) of the up-sampling of `x`.
    pub(crate) fn add_line(&self, x: &[f32], r: usize, orow: &mut [f32]) {
        let c = self.xs.c;
        let xline = self.xs.d[2] * c;
        let (n, o0, o1) = self.os.line_coords(r);
        let (a0, a1, la0, la1) = self.w[0][o0];
        let (b0, b1, lb0, lb1) = self.w[1][o1];
        for (i0, l0) in [(a0, la0), (a1, la1)] {
            for (i1, l1) in [(b0, lb0), (b1, lb1)] {
                let wl = l0 * l1;
                let start = self.xs.line_start(n, i0, i1);
                let line = &x[start..start + xline];
                for (o, &(e0, e1, le0, le1)) in orow.chunks_exact_mut(c).zip(&self.w[2]) {
                    let (p, q) = (&line[e0 * c..e0 * c + c], &line[e1 * c..e1 * c + c]);
                    let (wp, wq) = (wl * le0, wl * le1);
                    for ((o, &p), &q) in o.iter_mut().zip(p).zip(q) {
                        *o += wp * p + wq * q;
                    }
                }
            }
        }
    }
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
