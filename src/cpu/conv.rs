//! 3D convolution on the host, channels-last.
//!
//! One rayon task per output line (n, o0, o1). For every kernel tap row (k0, k1) whose input line
//! (i0, i1) lies inside the volume, the input line is zero-padded along d2 (a copy of d2 x cin
//! values, when p2 > 0) and a line kernel accumulates
//!     out[o2][co] += x[o2 * s2 + k2][ci] * w[k0][k1][k2][ci][co]
//! over k2 and ci. The line kernel works on register blocks of P output positions x CB output
//! channels (a GEMM micro-kernel: one weight vector load serves P positions, the inner loop runs
//! over contiguous co), so a 1x1x1 convolution is a plain [o2 x cin] * [cin x cout] GEMM per line.
//! Taps whose input line falls in the d0/d1 padding are skipped (they add exact zeros).
//!
//! On x86-64 with AVX2+FMA (detected at run time) the same kernel is compiled a second time with
//! those features enabled and fused multiply-adds; elsewhere it uses plain a * b + c.
use crate::backend::ConvSpec;
use crate::tensor::Shape;
use rayon::prelude::*;

/// Output channels per register block.
const CB: usize = 16;

/// Which build of the line kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// Portable Rust, `a * b + c`, whatever the target's baseline SIMD is.
    Portable,
    /// x86-64 AVX2 + FMA (fused multiply-add), chosen at run time.
    Avx2Fma,
}

impl ConvPath {
    /// The fastest path this machine supports.
    pub fn detect() -> Self {
        if super::simd::avx2_fma() {
            ConvPath::Avx2Fma
        } else {
            ConvPath::Portable
        }
    }
}

/// y = a * b + c, fused or not.
pub(crate) trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}
pub(crate) struct Plain;
impl MulAdd for Plain {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}
/// Only used inside functions compiled with the `fma` target feature (else `mul_add` is a libm call).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Fused;
#[cfg(target_arch = "x86_64")]
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Geometry of one line: `n_out` outputs, stride `s`, `k` taps along d2, channels (the forward
/// line kernel's and the weight gradient's).
#[derive(Clone, Copy)]
pub(crate) struct Line {
    pub n_out: usize,
    pub s: usize,
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
}

/// Convolution of a channels-last input. The caller has checked the shapes:
/// `x.len() == xs.len()`, `xs.c == spec.cin`, `w.len() == spec.weight_len()`, bias length cout,
/// kernel and stride nonzero and `d + 2p >= k` on every axis.
pub fn conv3d(x: &[f32], xs: Shape, w: &[f32], bias: Option<&[f32]>, spec: &ConvSpec, path: ConvPath) -> (Shape, Vec<f32>) {
    let os = spec.out_shape(xs);
    let od = os.d;
    let mut out = vec![0.0f32; os.len()];
    if os.is_empty() {
        return (os, out);
    }
    let k2n = spec.k[2];
    let line = Line { n_out: od[2], s: spec.stride[2], k: k2n, cin: spec.cin, cout: spec.cout };
    let wrow = k2n * spec.cin * spec.cout; // weights of one (k0, k1) tap row

    out.par_chunks_mut(od[2] * spec.cout).enumerate().for_each_init(
        || PaddedLine::new(xs, spec),
        |pad, (r, orow)| {
            match bias {
                Some(b) => orow.chunks_exact_mut(spec.cout).for_each(|o| o.copy_from_slice(b)),
                None => orow.fill(0.0),
            }
            for_each_tap_row(xs, spec, os.line_coords(r), |t, start| {
                run_line(pad.get(x, start), &w[t * wrow..][..wrow], orow, line, path);
            });
        },
    );
    (os, out)
}

/// The tap rows (k0, k1) whose input line (i0, i1) = (o0 * s0 + k0 - p0, o1 * s1 + k1 - p1) lies
/// inside the volume, for output line (n, o0, o1): `f(k0 * k1n + k1, offset of input line (n, i0, i1))`.
/// Rows in the d0/d1 padding are skipped (they add exact zeros). The forward convolution, its
/// weight gradient and the plan's convolution all walk the taps this way.
#[inline(always)]
pub(crate) fn for_each_tap_row(xs: Shape, spec: &ConvSpec, (n, o0, o1): (usize, usize, usize), mut f: impl FnMut(usize, usize)) {
    let [d0, d1, _] = xs.d;
    let [k0n, k1n, _] = spec.k;
    let [s0, s1, _] = spec.stride;
    let [p0, p1, _] = spec.pad;
    for k0 in 0..k0n {
        let Some(i0) = (o0 * s0 + k0).checked_sub(p0).filter(|&i| i < d0) else { continue };
        for k1 in 0..k1n {
            let Some(i1) = (o1 * s1 + k1).checked_sub(p1).filter(|&i| i < d1) else { continue };
            f(k0 * k1n + k1, xs.line_start(n, i0, i1));
        }
    }
}

/// An input line as the line kernels read it: with p2 zero pixels at both ends along d2.
pub(crate) struct PaddedLine {
    /// [p2 zero pixels | the line | p2 zero pixels] when p2 > 0 (the zeros never change), else empty.
    buf: Vec<f32>,
    front: usize,
    len: usize,
}

impl PaddedLine {
    pub(crate) fn new(xs: Shape, spec: &ConvSpec) -> Self {
        let (front, len) = (spec.pad[2] * xs.c, xs.d[2] * xs.c);
        PaddedLine { buf: vec![0.0; if front > 0 { len + 2 * front } else { 0 }], front, len }
    }

    /// The padded line starting at `start` in `x`: `x`'s own line when p2 = 0, else a copy.
    pub(crate) fn get<'a>(&'a mut self, x: &'a [f32], start: usize) -> &'a [f32] {
        let src = &x[start..start + self.len];
        if self.front == 0 {
            return src;
        }
        self.buf[self.front..self.front + self.len].copy_from_slice(src);
        &self.buf
    }
}

fn run_line(x: &[f32], w: &[f32], out: &mut [f32], g: Line, path: ConvPath) {
    match path {
        #[cfg(target_arch = "x86_64")]
        ConvPath::Avx2Fma => {
            // SAFETY: `Avx2Fma` is only ever produced by `ConvPath::detect` after checking that the
            // CPU has AVX2 and FMA (CpuBackend never builds it otherwise).
            unsafe { line_avx2_fma(x, w, out, g) }
        }
        _ => line_kernel::<Plain, 2>(x, w, out, g),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn line_avx2_fma(x: &[f32], w: &[f32], out: &mut [f32], g: Line) {
    line_kernel::<Fused, 4>(x, w, out, g)
}

/// out[o][co] += sum over t < k, ci < cin of x[o * s + t][ci] * w[t][ci][co], for o < n_out.
#[inline(always)]
fn line_kernel<M: MulAdd, const P: usize>(x: &[f32], w: &[f32], out: &mut [f32], g: Line) {
    let Line { n_out, s, k, cin, cout } = g;
    // These checks make every unchecked access below in bounds: the highest input pixel read is
    // (n_out - 1) * s + k - 1, the highest weight row (k - 1) * cin + cin - 1, the highest output n_out - 1.
    assert!(n_out > 0 && x.len() >= ((n_out - 1) * s + k) * cin, "conv line: input too short");
    assert!(w.len() >= k * cin * cout && out.len() >= n_out * cout, "conv line: weights or output too short");
    let (x, w, out) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let mut cb = 0;
    while cb + CB <= cout {
        let mut o = 0;
        while o + P <= n_out {
            // SAFETY: o + P <= n_out and cb + CB <= cout, with the length checks above.
            unsafe { block::<M, P>(x, w, out, o, cb, g) };
            o += P;
        }
        while o < n_out {
            // SAFETY: as above with P = 1.
            unsafe { block::<M, 1>(x, w, out, o, cb, g) };
            o += 1;
        }
        cb += CB;
    }
    if cb < cout {
        // the last cout % CB channels (cout 1 or 3 heads, odd test sizes): simple loops
        for o in 0..n_out {
            for t in 0..k {
                for ci in 0..cin {
                    // SAFETY: o < n_out, t < k, ci < cin, co < cout, with the length checks above.
                    unsafe {
                        let xv = *x.add((o * s + t) * cin + ci);
                        let wr = w.add((t * cin + ci) * cout);
                        let orow = out.add(o * cout);
                        for co in cb..cout {
                            *orow.add(co) = M::mul_add(xv, *wr.add(co), *orow.add(co));
                        }
                    }
                }
            }
        }
    }
}

/// A register block of P output positions (o..o+P) x CB output channels (cb..cb+CB).
///
/// # Safety
/// `x`, `w` and `out` point to a line as checked in `line_kernel`, with o + P <= n_out and cb + CB <= cout.
#[inline(always)]
unsafe fn block<M: MulAdd, const P: usize>(x: *const f32, w: *const f32, out: *mut f32, o: usize, cb: usize, g: Line) {
    let Line { s, k, cin, cout, .. } = g;
    let mut acc = [[0.0f32; CB]; P];
    for (p, a) in acc.iter_mut().enumerate() {
        std::ptr::copy_nonoverlapping(out.add((o + p) * cout + cb), a.as_mut_ptr(), CB);
    }
    for t in 0..k {
        let xt = x.add((o * s + t) * cin);
        let wt = w.add(t * cin * cout + cb);
        for ci in 0..cin {
            let wv: [f32; CB] = std::ptr::read_unaligned(wt.add(ci * cout) as *const [f32; CB]);
            for (p, a) in acc.iter_mut().enumerate() {
                let xv = *xt.add(p * s * cin + ci);
                for j in 0..CB {
                    a[j] = M::mul_add(xv, wv[j], a[j]);
                }
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(a.as_ptr(), out.add((o + p) * cout + cb), CB);
    }
}
