//! The plan's non-convolution steps, channels-last, in place where the plan allows it, parallel
//! over lines with rayon. Each matches the CPU reference op of the same name (`cpu::ops`).
use crate::cpu::ops::lin_weights;
use crate::tensor::Shape;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

#[inline(always)]
fn relu(v: f32) -> f32 {
    if v < 0.0 { 0.0 } else { v }
}

/// x = x * scale[c] + shift[c], then ReLU if `do_relu` (batch norm, bias, input scaling).
pub fn affine(x: &mut [f32], scale: &[f32], shift: &[f32], do_relu: bool) {
    let c = scale.len();
    let chunk = c * (CHUNK / c).max(1);
    x.par_chunks_mut(chunk).for_each(|x| {
        for v in x.chunks_exact_mut(c) {
            for ((v, &a), &b) in v.iter_mut().zip(scale).zip(shift) {
                let y = *v * a + b;
                *v = if do_relu { relu(y) } else { y };
            }
        }
    });
}

/// acc = acc + other, then ReLU if `do_relu`.
pub fn add(acc: &mut [f32], other: &[f32], do_relu: bool) {
    acc.par_chunks_mut(CHUNK).zip(other.par_chunks(CHUNK)).for_each(|(a, b)| {
        for (a, &b) in a.iter_mut().zip(b) {
            let y = *a + b;
            *a = if do_relu { relu(y) } else { y };
        }
    });
}

pub fn relu_inplace(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(|x| x.iter_mut().for_each(|v| *v = relu(*v)));
}

pub fn sigmoid_inplace(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(|x| x.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())));
}

/// acc (shape `hs`) += trilinear up-sampling (align_corners=True) of `low` (shape `ls`, same n and c).
pub fn upsample_add(acc: &mut [f32], hs: Shape, low: &[f32], ls: Shape) {
    let c = hs.c;
    let [d0, d1, d2] = ls.d;
    let [o0n, o1n, o2n] = hs.d;
    let (w0, w1, w2) = (lin_weights(d0, o0n), lin_weights(d1, o1n), lin_weights(d2, o2n));
    if acc.is_empty() {
        return;
    }
    acc.par_chunks_mut(o2n * c).enumerate().for_each_init(
        || vec![0.0f32; o2n * c],
        |up, (r, orow)| {
            let o1 = r % o1n;
            let o0 = (r / o1n) % o0n;
            let n = r / (o1n * o0n);
            let (a0, a1, la0, la1) = w0[o0];
            let (b0, b1, lb0, lb1) = w1[o1];
            up.fill(0.0);
            // the reference's order of terms: the up-sampled value first, then the skip
            for (i0, l0) in [(a0, la0), (a1, la1)] {
                for (i1, l1) in [(b0, lb0), (b1, lb1)] {
                    let wl = l0 * l1;
                    let start = ((n * d0 + i0) * d1 + i1) * d2 * c;
                    let line = &low[start..start + d2 * c];
                    for (o, &(e0, e1, le0, le1)) in up.chunks_exact_mut(c).zip(&w2) {
                        let (p, q) = (&line[e0 * c..e0 * c + c], &line[e1 * c..e1 * c + c]);
                        let (wp, wq) = (wl * le0, wl * le1);
                        for ((o, &p), &q) in o.iter_mut().zip(p).zip(q) {
                            *o += wp * p + wq * q;
                        }
                    }
                }
            }
            for (o, &u) in orow.iter_mut().zip(up.iter()) {
                *o += u;
            }
        },
    );
}

/// 2x2x2 max-pool, stride 2, odd sizes floored (NaN propagates, as in torch).
pub fn maxpool2(x: &[f32], xs: Shape, out: &mut [f32], os: Shape) {
    let c = xs.c;
    let [d0, d1, d2] = xs.d;
    let [o0n, o1n, o2n] = os.d;
    if out.is_empty() {
        return;
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
                        for v in [p, q] {
                            if v > *o || v.is_nan() {
                                *o = v;
                            }
                        }
                    }
                }
            }
        }
    });
}
