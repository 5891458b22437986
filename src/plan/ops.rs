//! The plan's non-convolution steps, channels-last, in place where the plan allows it, parallel
//! over lines with rayon. Each matches the CPU reference op of the same name (`cpu::ops`).
use crate::cpu::ops::{relu, sigmoid, Upsampler};
use crate::tensor::Shape;
use rayon::prelude::*;

/// 2x2x2 max-pool into the plan's buffer: the reference op itself.
pub use crate::cpu::ops::maxpool2_into as maxpool2;

const CHUNK: usize = 1 << 14;

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
    x.par_chunks_mut(CHUNK).for_each(|x| x.iter_mut().for_each(|v| *v = sigmoid(*v)));
}

/// acc (shape `hs`) += trilinear up-sampling (align_corners=True) of `low` (shape `ls`, same n and c).
pub fn upsample_add(acc: &mut [f32], hs: Shape, low: &[f32], ls: Shape) {
    let up = Upsampler::new(ls, hs);
    if acc.is_empty() {
        return;
    }
    let line = hs.d[2] * hs.c;
    acc.par_chunks_mut(line).enumerate().for_each_init(
        || vec![0.0f32; line],
        |buf, (r, orow)| {
            buf.fill(0.0);
            up.add_line(low, r, buf);
            // the reference's order of terms: the up-sampled value first, then the skip
            for (o, &u) in orow.iter_mut().zip(buf.iter()) {
                *o += u;
            }
        },
    );
}
