//! Convolution microkernels of the plan: channels-last, register-blocked, one build per ISA.
//!
//! A convolution is run line by line: an output line (n, o0, o1) holds `n_out` positions along d2.
//! For every kernel tap row (k0, k1) whose input line lies inside the volume, the input line is
//! used in place (no d2 padding) or copied once into a zero-padded row of the thread's scratch.
//! A tile of P consecutive positions x NV vectors of output channels is accumulated in registers
//! over every tap (k0, k1, k2) and input channel (an implicit GEMM with K = taps x cin): per input
//! channel, NV weight vectors are loaded once and each of the P input values is broadcast once.
//! The epilogue adds the residual, applies ReLU (or sigmoid) and stores; the bias is the
//! accumulators' initial value. Taps in the d0/d1 padding are skipped (they add exact zeros).
//!
//! Weights are packed per block of output channels: [block][tap][cin][cbw], cbw = NV x W floats,
//! zero-padded past cout, so a block's weights are one contiguous stream.
//!
//! Builds: AVX-512F (W = 16, up to 4 x 16 channels x 6..12 positions, 32 registers), AVX2+FMA
//! (W = 8, up to 2 x 8 channels x 6 positions, 16 registers), portable Rust (W = 8, `a * b + c`).
//! The ISA is chosen at run time (`Isa::detect`); tests run every build this CPU has.
use crate::backend::ConvSpec;
use crate::cpu::conv::for_each_tap_row;
use crate::cpu::ops::sigmoid;
use crate::tensor::Shape;
use rayon::prelude::*;

/// Which build of the microkernels runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX-512F (zmm registers, 16 floats).
    Avx512,
    /// x86-64 AVX2 + FMA (ymm registers, 8 floats).
    Avx2Fma,
    /// Portable Rust, whatever the target's baseline SIMD is.
    Portable,
}

impl Isa {
    /// The fastest build this CPU supports.
    pub fn detect() -> Isa {
        Isa::all_available()[0]
    }

    /// Every build this CPU can run, fastest first.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2Fma, Isa::Portable].into_iter().filter(|i| i.available()).collect()
    }

    pub fn available(self) -> bool {
        match self {
            Isa::Avx512 => crate::cpu::simd::avx512f(),
            Isa::Avx2Fma => crate::cpu::simd::avx2_fma(),
            Isa::Portable => true,
        }
    }

    /// Floats per vector.
    pub fn width(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2Fma | Isa::Portable => 8,
        }
    }

    /// Most vectors of output channels per tile.
    fn max_nv(self) -> usize {
        match self {
            Isa::Avx512 => 4,
            Isa::Avx2Fma | Isa::Portable => 2,
        }
    }
}

pub use crate::graph::passes::Act;

/// A convolution with its weights packed for one ISA.
pub struct PackedConv {
    pub spec: ConvSpec,
    pub isa: Isa,
    /// Output channels per block (NV x W).
    cbw: usize,
    nblk: usize,
    /// [block][tap][cin][cbw]
    w: Vec<f32>,
    /// [block][cbw]
    bias: Vec<f32>,
}

impl PackedConv {
    /// `w` in the engine layout [k0][k1][k2][cin][cout] (see `conv_weight_layout`); `bias` per cout.
    pub fn new(spec: ConvSpec, w: &[f32], bias: Option<&[f32]>, isa: Isa) -> PackedConv {
        assert_eq!(w.len(), spec.weight_len(), "packed conv: weight length");
        let width = isa.width();
        let nv = spec.cout.div_ceil(width).clamp(1, isa.max_nv());
        let cbw = nv * width;
        let nblk = spec.cout.div_ceil(cbw);
        let taps = spec.k[0] * spec.k[1] * spec.k[2];
        let (cin, cout) = (spec.cin, spec.cout);
        let mut pw = vec![0.0f32; nblk * taps * cin * cbw];
        let mut pb = vec![0.0f32; nblk * cbw];
        for b in 0..nblk {
            for t in 0..taps {
                for ci in 0..cin {
                    let dst = ((b * taps + t) * cin + ci) * cbw;
                    let src = (t * cin + ci) * cout;
                    for j in 0..cbw.min(cout - b * cbw) {
                        pw[dst + j] = w[src + b * cbw + j];
                    }
                }
            }
            if let Some(bias) = bias {
                for j in 0..cbw.min(cout - b * cbw) {
                    pb[b * cbw + j] = bias[b * cbw + j];
                }
            }
        }
        PackedConv { spec, isa, cbw, nblk, w: pw, bias: pb }
    }

    /// Bytes of packed weights and biases.
    pub fn bytes(&self) -> usize {
        4 * (self.w.len() + self.bias.len())
    }

    /// Floats of thread scratch one line needs (the zero-padded tap rows).
    pub fn scratch_floats(&self, xd: [usize; 3]) -> usize {
        if self.spec.pad[2] == 0 {
            0
        } else {
            self.spec.k[0] * self.spec.k[1] * (xd[2] + 2 * self.spec.pad[2]) * self.spec.cin
        }
    }
}

/// Per-thread scratch: zero-padded input rows and the tap list of a line.
#[derive(Default)]
pub struct Scratch {
    rows: Vec<f32>,
    taps: Vec<Tap>,
}

/// Runs `pc` on `x` (shape `xs`, n volumes) into `out` (the output shape, channels-last),
/// adding `res` (same shape as out) before `act`. Parallel over output lines (rayon).
pub fn conv3d(pc: &PackedConv, x: &[f32], xs: Shape, out: &mut [f32], res: Option<&[f32]>, act: Act) {
    let od = pc.spec.out_dims(xs.d);
    let line = od[2] * pc.spec.cout;
    let lines = xs.n * od[0] * od[1];
    assert_eq!(out.len(), lines * line, "conv3d: output length");
    assert_eq!(x.len(), xs.len(), "conv3d: input length");
    assert_eq!(xs.c, pc.spec.cin, "conv3d: input channels");
    if let Some(r) = res {
        assert_eq!(r.len(), out.len(), "conv3d: residual length");
    }
    if line == 0 {
        return;
    }
    // A few lines per task keeps rayon's overhead small on large layers and every thread busy on small ones.
    let per = (lines / (rayon::current_num_threads() * 32)).clamp(1, 16);
    out.par_chunks_mut(per * line).enumerate().for_each_init(Scratch::default, |sc, (i, chunk)| {
        let r = res.map(|r| &r[i * per * line..i * per * line + chunk.len()]);
        conv_lines(pc, x, xs, chunk, r, i * per, act, sc);
    });
}

/// Output lines first..first + out.len() / line_len of `pc` on `x`, on the calling thread.
#[allow(clippy::too_many_arguments)]
pub fn conv_lines(pc: &PackedConv, x: &[f32], xs: Shape, out: &mut [f32], res: Option<&[f32]>, first: usize, act: Act, sc: &mut Scratch) {
    let spec = &pc.spec;
    let od = spec.out_dims(xs.d);
    let os = Shape::new(xs.n, od, spec.cout);
    let [k0n, k1n, k2n] = spec.k;
    let (s2, p2) = (spec.stride[2], spec.pad[2]);
    let cin = spec.cin;
    let line = od[2] * spec.cout;
    let xline = xs.d[2] * cin;
    let padded = xline + 2 * p2 * cin;
    if p2 > 0 && sc.rows.len() < k0n * k1n * padded {
        sc.rows = vec![0.0; k0n * k1n * padded];
    }
    for (j, oline) in out.chunks_exact_mut(line).enumerate() {
        let r = first + j;
        sc.taps.clear();
        let mut slot = 0;
        for_each_tap_row(xs, spec, os.line_coords(r), |t, start| {
            let base = if p2 > 0 {
                let row = &mut sc.rows[slot * padded..(slot + 1) * padded];
                row[..p2 * cin].fill(0.0);
                row[p2 * cin..p2 * cin + xline].copy_from_slice(&x[start..start + xline]);
                row[p2 * cin + xline..].fill(0.0);
                slot += 1;
                (slot - 1) * padded
            } else {
                start
            };
            for k2 in 0..k2n {
                sc.taps.push(Tap { x: base + k2 * cin, w: (t * k2n + k2) * cin * pc.cbw });
            }
        });
        let src = if p2 > 0 { sc.rows.as_ptr() } else { x.as_ptr() };
        let a = LineArgs {
            src,
            taps: &sc.taps,
            n_out: od[2],
            xstep: s2 * cin,
            out: oline.as_mut_ptr(),
            res: res.map_or(std::ptr::null(), |r| r[j * line..].as_ptr()),
            relu: act == Act::Relu,
        };
        // SAFETY: every tap offset + (n_out - 1) * xstep + cin stays inside `src` (the input tensor, or
        // the padded rows: (n_out - 1) * s2 + k2 < d2 + 2 * p2 by the output-size formula); the out
        // and residual lines hold n_out x cout floats; the ISA was checked when `pc` was packed
        // (`Isa::available`) — `run_line` re-checks in debug builds.
        unsafe { run_line(pc, &a) };
        if act == Act::Sigmoid {
            oline.iter_mut().for_each(|v| *v = sigmoid(*v));
        }
    }
}

#[derive(Clone, Copy)]
pub struct Tap {
    /// Offset of position 0's input for this tap, in floats from `src`.
    x: usize,
    /// Offset of this tap's weights inside a block, in floats.
    w: usize,
}

struct LineArgs<'a> {
    src: *const f32,
    taps: &'a [Tap],
    n_out: usize,
    xstep: usize,
    out: *mut f32,
    res: *const f32,
    relu: bool,
}

unsafe fn run_line(pc: &PackedConv, a: &LineArgs) {
    debug_assert!(pc.isa.available());
    match pc.isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => line_avx512(pc, a),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => line_avx2(pc, a),
        _ => line_generic::<Portable>(pc, a),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn line_avx512(pc: &PackedConv, a: &LineArgs) {
    line_generic::<x86::Avx512>(pc, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn line_avx2(pc: &PackedConv, a: &LineArgs) {
    line_generic::<x86::Avx2>(pc, a)
}

/// The vector operations a microkernel needs.
trait Simd {
    const W: usize;
    type V: Copy;
    /// Largest tile (positions) for NV vectors of channels that fits the register file.
    fn pmax(nv: usize) -> usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn splat(p: *const f32) -> Self::V;
    /// a * b + c
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// max(v, 0) that keeps NaN.
    unsafe fn relu(a: Self::V) -> Self::V;
}

/// Everything a tile reads and writes, for one block of output channels.
struct TileArgs<'a> {
    src: *const f32,
    taps: &'a [Tap],
    /// This block's packed weights.
    wb: *const f32,
    bias: *const f32,
    cin: usize,
    xstep: usize,
    cbw: usize,
    out: *mut f32,
    res: *const f32,
    ostep: usize,
    /// Output channels of this block that exist (cbw, or fewer in the last block).
    valid: usize,
    relu: bool,
}

#[inline(always)]
unsafe fn line_generic<S: Simd>(pc: &PackedConv, a: &LineArgs) {
    let cout = pc.spec.cout;
    let taps_total = pc.spec.k[0] * pc.spec.k[1] * pc.spec.k[2];
    let nv = pc.cbw / S::W;
    for blk in 0..pc.nblk {
        let t = TileArgs {
            src: a.src,
            taps: a.taps,
            wb: pc.w.as_ptr().add(blk * taps_total * pc.spec.cin * pc.cbw),
            bias: pc.bias.as_ptr().add(blk * pc.cbw),
            cin: pc.spec.cin,
            xstep: a.xstep,
            cbw: pc.cbw,
            out: a.out.add(blk * pc.cbw),
            res: if a.res.is_null() { a.res } else { a.res.add(blk * pc.cbw) },
            ostep: cout,
            valid: pc.cbw.min(cout - blk * pc.cbw),
            relu: a.relu,
        };
        match nv {
            1 => tiles::<S, 1>(&t, a.n_out),
            2 => tiles::<S, 2>(&t, a.n_out),
            3 => tiles::<S, 3>(&t, a.n_out),
            _ => tiles::<S, 4>(&t, a.n_out),
        }
    }
}

#[inline(always)]
unsafe fn tiles<S: Simd, const NV: usize>(t: &TileArgs, n_out: usize) {
    let pm = S::pmax(NV);
    let mut o = 0;
    while o < n_out {
        let p = pm.min(n_out - o);
        match p {
            12.. => tile::<S, 12, NV>(t, o),
            8..=11 => tile::<S, 8, NV>(t, o),
            7 => tile::<S, 7, NV>(t, o),
            6 => tile::<S, 6, NV>(t, o),
            5 => tile::<S, 5, NV>(t, o),
            4 => tile::<S, 4, NV>(t, o),
            3 => tile::<S, 3, NV>(t, o),
            2 => tile::<S, 2, NV>(t, o),
            _ => tile::<S, 1, NV>(t, o),
        }
        o += match p {
            12.. => 12,
            8..=11 => 8,
            p => p,
        };
    }
}

/// P positions (o..o+P) x NV vectors of channels, accumulated over every tap and input channel.
#[inline(always)]
unsafe fn tile<S: Simd, const P: usize, const NV: usize>(t: &TileArgs, o: usize) {
    let mut acc = [[S::zero(); NV]; P];
    for v in 0..NV {
        let b = S::load(t.bias.add(v * S::W));
        for p in 0..P {
            acc[p][v] = b;
        }
    }
    for tap in t.taps {
        acc = accumulate::<S, P, NV>(acc, t.src.add(tap.x + o * t.xstep), t.wb.add(tap.w), t.cin, t.xstep, t.cbw);
    }
    // The accumulators go through a stack buffer once per tile: indexing them only with constants
    // keeps them in registers inside the hot loop (LLVM otherwise stored them every iteration).
    let mut buf = [0.0f32; 12 * 4 * 16];
    debug_assert!(P * NV * S::W <= buf.len());
    for p in 0..P {
        for v in 0..NV {
            S::store(buf.as_mut_ptr().add((p * NV + v) * S::W), acc[p][v]);
        }
    }
    epilogue::<S>(t, o, P, NV, &buf);
}

/// acc += sum over ci of x[p * xstep + ci] * w[ci * cbw + v * W ..] for one tap.
#[inline(always)]
unsafe fn accumulate<S: Simd, const P: usize, const NV: usize>(
    mut acc: [[S::V; NV]; P],
    xp: *const f32,
    mut wp: *const f32,
    cin: usize,
    xstep: usize,
    cbw: usize,
) -> [[S::V; NV]; P] {
    for ci in 0..cin {
        let mut wv = [S::zero(); NV];
        for v in 0..NV {
            wv[v] = S::load(wp.add(v * S::W));
        }
        for p in 0..P {
            let xv = S::splat(xp.add(p * xstep + ci));
            for v in 0..NV {
                acc[p][v] = S::fma(xv, wv[v], acc[p][v]);
            }
        }
        wp = wp.add(cbw);
    }
    acc
}

/// Residual, activation and store of a tile's P x NV vectors held in `buf`.
#[inline(always)]
unsafe fn epilogue<S: Simd>(t: &TileArgs, o: usize, np: usize, nv: usize, buf: &[f32]) {
    let full = t.valid == nv * S::W;
    for p in 0..np {
        let op = t.out.add((o + p) * t.ostep);
        let rp = if t.res.is_null() { t.res } else { t.res.add((o + p) * t.ostep) };
        let bp = buf.as_ptr().add(p * nv * S::W);
        if full {
            for v in 0..nv {
                let mut y = S::load(bp.add(v * S::W));
                if !rp.is_null() {
                    y = S::add(y, S::load(rp.add(v * S::W)));
                }
                if t.relu {
                    y = S::relu(y);
                }
                S::store(op.add(v * S::W), y);
            }
        } else {
            // a partial block (cout not a multiple of the vector width)
            for j in 0..t.valid {
                let mut y = *bp.add(j);
                if !rp.is_null() {
                    y += *rp.add(j);
                }
                if t.relu && y < 0.0 {
                    y = 0.0;
                }
                *op.add(j) = y;
            }
        }
    }
}

/// Portable build: 8 lanes of plain `a * b + c`, left to the compiler's auto-vectoriser.
struct Portable;

impl Simd for Portable {
    const W: usize = 8;
    type V = [f32; 8];
    fn pmax(_nv: usize) -> usize {
        4
    }
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        std::ptr::read_unaligned(p as *const [f32; 8])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        std::ptr::write_unaligned(p as *mut [f32; 8], v)
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> [f32; 8] {
        [*p; 8]
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn relu(a: [f32; 8]) -> [f32; 8] {
        a.map(|v| if v < 0.0 { 0.0 } else { v })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 builds: the same operations on 16-float zmm (AVX-512F) or 8-float ymm (AVX2 +
    //! FMA) registers, one expansion of `simd!` each. Their methods are only called from functions
    //! compiled with the matching `target_feature` (`line_avx512`, `line_avx2`), into which they
    //! are inlined.
    use super::Simd;
    use std::arch::x86_64::*;

    macro_rules! simd {
        ($name:ident, $w:literal, $v:ty, |$nv:ident| $pmax:expr, $zero:ident, $load:ident, $store:ident, |$p:ident| $splat:expr,
         $fma:ident, $add:ident, $max:ident) => {
            pub struct $name;

            impl Simd for $name {
                const W: usize = $w;
                type V = $v;
                fn pmax($nv: usize) -> usize {
                    $pmax
                }
                #[inline(always)]
                unsafe fn zero() -> $v {
                    $zero()
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> $v {
                    $load(p)
                }
                #[inline(always)]
                unsafe fn store(p: *mut f32, v: $v) {
                    $store(p, v)
                }
                #[inline(always)]
                unsafe fn splat($p: *const f32) -> $v {
                    $splat
                }
                #[inline(always)]
                unsafe fn fma(a: $v, b: $v, c: $v) -> $v {
                    $fma(a, b, c)
                }
                #[inline(always)]
                unsafe fn add(a: $v, b: $v) -> $v {
                    $add(a, b)
                }
                #[inline(always)]
                unsafe fn relu(a: $v) -> $v {
                    // max_ps returns its second operand when either is NaN: NaN stays NaN
                    $max($zero(), a)
                }
            }
        };
    }

    // pmax: accumulators + NV weight vectors within 32 zmm registers
    simd!(Avx512, 16, __m512, |nv| match nv {
        1 | 2 => 12,
        3 => 8,
        _ => 6,
    }, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, |p| _mm512_set1_ps(*p), _mm512_fmadd_ps, _mm512_add_ps, _mm512_max_ps);
    // pmax: accumulators + NV weight vectors + one broadcast within 16 ymm registers
    simd!(Avx2, 8, __m256, |nv| match nv {
        1 => 8,
        _ => 6,
    }, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, |p| _mm256_broadcast_ss(&*p), _mm256_fmadd_ps, _mm256_add_ps, _mm256_max_ps);
}

/// Two in-plane convolutions (k0 = 1, stride 1, no d0 padding: (1,k,1) and (1,1,k)) run plane by
/// plane: `pb(pa(x))` with the intermediate in a per-thread plane buffer (cache-resident) instead
/// of a whole tensor in memory. Parallel over planes (n, o0). Biases are applied in the kernels.
pub fn conv_pair(pa: &PackedConv, pb: &PackedConv, x: &[f32], xs: Shape, out: &mut [f32]) {
    for p in [pa, pb] {
        assert!(p.spec.k[0] == 1 && p.spec.pad[0] == 0 && p.spec.stride == [1, 1, 1], "conv_pair: not an in-plane conv");
    }
    assert_eq!(pa.spec.cout, pb.spec.cin, "conv_pair: channels");
    let plane_in = Shape::new(1, [1, xs.d[1], xs.d[2]], xs.c);
    let md = pa.spec.out_dims(plane_in.d);
    let mid = Shape::new(1, md, pa.spec.cout);
    let od = pb.spec.out_dims(md);
    let plane_out = od[1] * od[2] * pb.spec.cout;
    assert_eq!(out.len(), xs.n * xs.d[0] * plane_out, "conv_pair: output length");
    if plane_out == 0 {
        return;
    }
    out.par_chunks_mut(plane_out).enumerate().for_each_init(
        || (Scratch::default(), vec![0.0f32; mid.len()]),
        |(sc, buf), (i, oplane)| {
            let xp = &x[i * plane_in.len()..(i + 1) * plane_in.len()];
            conv_lines(pa, xp, plane_in, buf, None, 0, Act::None, sc);
            conv_lines(pb, buf, mid, oplane, None, 0, Act::None, sc);
        },
    );
}
