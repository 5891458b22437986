// conv3d_tc.cu — 3D convolution on tensor cores: fp16 / bf16 inputs and weights (mma.sync.aligned
// .m16n8k16), or f32 inputs and weights computed in tf32 (mma.sync.aligned.m16n8k8 .tf32), f32
// accumulation (ldmatrix, cp.async; sm_80 and up), zero padding, any kernel size, stride and
// padding, any Cin and Cout, with a fused epilogue. Launched by src/gpu/tensor_conv.rs.
//
//   conv3d_tc_f16, conv3d_tc_bf16, conv3d_tc_tf32 — implicit GEMM: M = output voxels, N = Cout,
//                  K = taps x Cin; 8 warps, each 32 voxels x 64 channels (two m16 tiles).
//   conv3d_tc_wide_f16, conv3d_tc_wide_bf16, conv3d_tc_wide_tf32 — the same with 4 warps, each 64
//                  voxels x 64 channels (four m16 tiles): 1.5x the FLOPs per byte of ldmatrix,
//                  more registers.
//   Both take the same parameters; tensor_conv::WarpTile picks one.
//
// The element type H: f16 / bf16 (one 16-bit word, 16 channels per mma), or float (two words, 8
// channels per mma of m16n8k8 .tf32). Everything below is in 16-bit words, so the tf32 kernels
// are the half ones byte for byte: a k8 step of floats is 32 bytes like a k16 step of halves, and
// ldmatrix of an 8 x 8 b16 matrix is an 8 x 4 f32 matrix (lane l gets row l / 4, f32 column l % 4),
// which is exactly the m16n8k8 .tf32 A and B fragment layout (A: a0 = A[g][t], a1 = A[g+8][t],
// a2 = A[g][t+4], a3 = A[g+8][t+4]; B: b0 = B[t][g], b1 = B[t+4][g]; C, D as m16n8k16).
// tf32 rounding: the weights are rounded on the host (tensor_conv::round_tf32, ties away); every
// A register is rounded after its ldmatrix with cvt.rna.tf32.f32 (to nearest, ties away), so the
// mma gets tf32 values and the result does not depend on how the hardware treats low bits.
//
// Layouts (channels-last):
//   x    (N, D0, D1, D2, Cin) in H (f16, bf16 or float);
//   wt   [chunk][tap][cout_pad][ck] in H, written by the host (tensor_conv::tc_weight_layout):
//        wt[((c * taps + tap) * cout_pad + co) * ck + j] = w[tap][c * ck + j][co], 0 where the
//        channel c * ck + j >= Cin or co >= Cout; taps = k0 k1 k2 in (t0, t1, t2) order, `ck` (a
//        multiple of the channels of one mma, at most 64) the input channels of one chunk,
//        cout_pad = Cout rounded up to 16;
//   bias [Cout] f32 (zeros for a conv without bias);
//   y    (N, O0, O1, O2, Cout): `yf` (f32) when out_half == 0, else `yh` (H, rounded once; the
//        tf32 kernels always get out_half == 0);
//   res  (N, O0, O1, O2, Cout) in the output's type (`rf` or `rh`), read when has_res.
//   Epilogue: y = relu?(acc + bias + res). The unused one of yf/yh and rf/rh is any live buffer of
//   its type (never read or written).
//
// Block: 256 threads (8 warps; the wide kernels 128, 4 warps) compute an output tile of TC_T0 x
// TC_T1 x TC_T2 = 4 x 8 x 8 voxels (M = 256) by 64 output channels. Grid: (N * ceil(O0/4) *
// ceil(O1/8) * ceil(O2/8), ceil(Cout/64)). Warp w owns voxel rows [16 MT w, 16 MT (w + 1)) (MT = 2
// or 4 m16 tiles) and all 64 channels (eight n8 tiles, n tiles past cout_pad skipped): MT x 8 mma
// per 16 channels of one tap.
//
// Shared memory (dynamic, 16-bit words; tensor_conv::smem_bytes), W = words per element:
//   brick  the input brick of the tile with its halo, Bz = (Tz - 1) sz + kz voxels per axis, one
//          channel chunk: element j of voxel b at words [b * ckp + W j, + W), ckp = W ck + 8 (the
//          16-byte pad makes the 8 row addresses of an ldmatrix hit 8 different 4-bank groups);
//          loaded once per channel chunk (cp.async, 16 bytes, zero-filled outside the input, when
//          Cin is a multiple of 16 bytes' elements; element by element otherwise) and read by
//          every tap: the A fragment of
//          voxel m and tap t is the brick row at m's position shifted by t (ldmatrix takes one
//          row address per lane, so the gather costs nothing);
//   stages TC_STAGES buffers of one tap's weights, 64 x ckp: wstage[co * ckp + j], filled by a
//          cp.async pipeline TC_STAGES - 1 taps ahead of the mma.
// Accumulation order: per chunk, per tap, per 16 (tf32: 8) channels, each mma summing 16 (8) products.
// CPU reference: tests/tensor_conv.rs (float64 on the same rounded inputs and weights).
// deepis-nvrtc: sm_90a on sm_90 (the wgmma kernels need it; the others compile the same)
#include "deepis_device.h"

#define TC_T0 4
#define TC_T1 8
#define TC_T2 8
#define TC_BN 64
#define TC_STAGES 3
#define WG_STAGES 4  // the wgmma kernels: one more stage, so that one tap's wgmmas stay in flight

#if defined(DEEPIS_EMU) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define TC_SUPPORTED 1
#else
#define TC_SUPPORTED 0
#endif

// 16-bit words per element and channels per mma of each element type.
template <class H> struct TcElem {
    enum { W = 1, K = 16 };
};
template <> struct TcElem<float> {
    enum { W = 2, K = 8 };
};

DEEPIS_DEVICE void tc_mma(float* d, const unsigned* a, const unsigned* b, f16) { mma_16816_f16(d, a, b, d); }
DEEPIS_DEVICE void tc_mma(float* d, const unsigned* a, const unsigned* b, bf16) { mma_16816_bf16(d, a, b, d); }
DEEPIS_DEVICE void tc_mma(float* d, const unsigned* a, const unsigned* b, float) { mma_1688_tf32(d, a, b, d); }
// An A fragment after its ldmatrix: halves are used as loaded, floats rounded to tf32.
DEEPIS_DEVICE void tc_round_a(unsigned*, f16) {}
DEEPIS_DEVICE void tc_round_a(unsigned*, bf16) {}
DEEPIS_DEVICE void tc_round_a(unsigned* a, float) {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = tf32_from_f32(__uint_as_float(a[r]));
}
DEEPIS_DEVICE float tc_widen(f16 h) { return f16_to_f32(h); }
DEEPIS_DEVICE float tc_widen(bf16 h) { return bf16_to_f32(h); }
DEEPIS_DEVICE float tc_widen(float v) { return v; }
DEEPIS_DEVICE void tc_round(f16& h, float v) { h = f16_from_f32(v); }
DEEPIS_DEVICE void tc_round(bf16& h, float v) { h = bf16_from_f32(v); }
DEEPIS_DEVICE void tc_round(float& h, float v) { h = v; }
// One element into the brick's 16-bit words (a float as two: low word first).
DEEPIS_DEVICE void tc_put(sptr<unsigned short> p, f16 v) { p[0] = v.bits; }
DEEPIS_DEVICE void tc_put(sptr<unsigned short> p, bf16 v) { p[0] = v.bits; }
DEEPIS_DEVICE void tc_put(sptr<unsigned short> p, float v) {
    const unsigned u = __float_as_uint(v);
    p[0] = (unsigned short)(u & 0xffffu);
    p[1] = (unsigned short)(u >> 16);
}

// The shapes of one launch, and what each thread derives from them once.
struct TcGeom {
    int d0, d1, d2, cin, o0, o1, o2, cout;
    int taps, ck, ckp, cout_pad;  // ckp in 16-bit words
    int b1, b2, brick_vox;  // brick extent (b0 is implied by brick_vox)
    int batch, j0, j1, j2;  // the tile's batch index and first output voxel
    int i0, i1, i2;         // input coordinate of brick voxel (0, 0, 0)
    int n0, rows;           // first output channel of the block, weight rows it loads (multiple of 16)
};

// Where element j (a multiple of 8 / W when it starts a 16-byte piece) of brick voxel v, and of
// weight row `row`, lie in shared memory, in 16-bit words:
//  TcRows (the mma.sync kernels): rows of ckp words, [v * ckp + W j] and [row * ckp + W j];
//  WgCore (the wgmma kernels): 16-byte pieces in the canonical K-major core-matrix layout,
//   brick piece (voxel (b0, b1, b2), channel group kg = W j / 8) at (((b0 B1 + b1) KG + kg) B2 + b2) * 8,
//   weight piece (row, kg) at (kg * 64 + row) * 8 (KG = W ck / 8 groups per chunk).
struct TcRows {
    int ckp;
    DEEPIS_DEVICE int brick(int v, int j, int w) const { return v * ckp + w * j; }
    DEEPIS_DEVICE int weight(int row, int j, int w) const { return row * ckp + w * j; }
};
struct WgCore {
    int kg, b2;
    DEEPIS_DEVICE int brick(int v, int j, int w) const { return (((v / b2) * kg + (w * j) / 8) * b2 + v % b2) * 8 + (w * j) % 8; }
    DEEPIS_DEVICE int weight(int row, int j, int w) const { return (((w * j) / 8) * TC_BN + row) * 8 + (w * j) % 8; }
};

// Loads channel chunk `c` of the input brick into `brick` (zero outside the input and past Cin).
template <class H, class L>
DEEPIS_DEVICE void tc_load_brick(sptr<unsigned short> brick, gptr<const H> x, const TcGeom& g, int c, L lay) {
    const int tid = (int)threadIdx.x;
    const int c0 = c * g.ck;
    const int per = 8 / TcElem<H>::W;  // elements in 16 bytes
    if (g.cin % per == 0) {
        const int parts = g.ck / per;
        for (int q = tid; q < g.brick_vox * parts; q += (int)blockDim.x) {
            const int v = q / parts, part = q - v * parts;
            const int b2 = v % g.b2, b1 = (v / g.b2) % g.b1, b0 = v / (g.b2 * g.b1);
            const int i0 = g.i0 + b0, i1 = g.i1 + b1, i2 = g.i2 + b2, ci = c0 + per * part;
            const bool in = i0 >= 0 && i0 < g.d0 && i1 >= 0 && i1 < g.d1 && i2 >= 0 && i2 < g.d2 && ci < g.cin;
            const int src = in ? (((g.batch * g.d0 + i0) * g.d1 + i1) * g.d2 + i2) * g.cin + ci : 0;
            cp_async16(brick + lay.brick(v, per * part, TcElem<H>::W), x + src, in ? 16 : 0);
        }
    } else {
        for (int q = tid; q < g.brick_vox * g.ck; q += (int)blockDim.x) {
            const int v = q / g.ck, j = q - v * g.ck;
            const int b2 = v % g.b2, b1 = (v / g.b2) % g.b1, b0 = v / (g.b2 * g.b1);
            const int i0 = g.i0 + b0, i1 = g.i1 + b1, i2 = g.i2 + b2, ci = c0 + j;
            const bool in = i0 >= 0 && i0 < g.d0 && i1 >= 0 && i1 < g.d1 && i2 >= 0 && i2 < g.d2 && ci < g.cin;
            tc_put(brick + lay.brick(v, j, TcElem<H>::W), in ? x[(((g.batch * g.d0 + i0) * g.d1 + i1) * g.d2 + i2) * g.cin + ci] : H{});
        }
    }
}

// Issues the cp.async copies of the weights of (chunk c, tap) for this block's channels into `stage`.
template <class H, class L>
DEEPIS_DEVICE void tc_load_weights(sptr<unsigned short> stage, gptr<const H> wt, const TcGeom& g, int c, int tap, L lay) {
    const int per = 8 / TcElem<H>::W;  // elements in 16 bytes
    const int parts = g.ck / per;
    const int base = ((c * g.taps + tap) * g.cout_pad + g.n0) * g.ck;
    for (int q = (int)threadIdx.x; q < g.rows * parts; q += (int)blockDim.x) {
        const int row = q / parts, part = q - row * parts;
        cp_async16(stage + lay.weight(row, per * part, TcElem<H>::W), wt + base + row * g.ck + per * part, 16);
    }
}

// acc[i][j][e] (m16 tile i, n8 tile j, register e: the mma.sync C layout, which each 16-row
// slice of a wgmma accumulator also has) plus bias and residual, ReLU, stored; mrow[i]: the first
// voxel row of this warp's tile i.
template <class H, int MT>
DEEPIS_DEVICE void tc_epilogue(float (*acc)[8][4], const int* mrow, const TcGeom& g, gptr<const float> bias, gptr<float> yf, gptr<H> yh,
                               gptr<const float> rf, gptr<const H> rh, int out_half, int has_res, int relu) {
    const int l = (int)threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
            const int m = mrow[i] + l / 4 + 8 * e2;
            const int j0 = g.j0 + m / (TC_T1 * TC_T2), j1 = g.j1 + (m / TC_T2) % TC_T1, j2 = g.j2 + m % TC_T2;
            if (j0 >= g.o0 || j1 >= g.o1 || j2 >= g.o2) continue;
            const int row = (((g.batch * g.o0 + j0) * g.o1 + j1) * g.o2 + j2) * g.cout;
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e1 = 0; e1 < 2; ++e1) {
                    const int co = g.n0 + 8 * j + 2 * (l % 4) + e1;
                    if (co >= g.cout) continue;
                    float v = acc[i][j][2 * e2 + e1] + bias[co];
                    if (has_res) v += out_half ? tc_widen(rh[row + co]) : rf[row + co];
                    if (relu) v = fmaxf(v, 0.0f);
                    if (out_half) tc_round(yh[row + co], v);
                    else yf[row + co] = v;
                }
        }
}

// The geometry of this block's tile (blockIdx.x: batch and output tile, blockIdx.y: 64 channels).
DEEPIS_DEVICE TcGeom tc_geom(int d0, int d1, int d2, int cin, int o0, int o1, int o2, int cout, int k0, int k1, int k2, int s0,
                             int s1, int s2, int p0, int p1, int p2, int ck, int cout_pad, int ckp) {
    TcGeom g;
    g.d0 = d0; g.d1 = d1; g.d2 = d2; g.cin = cin; g.o0 = o0; g.o1 = o1; g.o2 = o2; g.cout = cout;
    g.taps = k0 * k1 * k2;
    g.ck = ck;
    g.ckp = ckp;
    g.cout_pad = cout_pad;
    const int b0 = (TC_T0 - 1) * s0 + k0;
    g.b1 = (TC_T1 - 1) * s1 + k1;
    g.b2 = (TC_T2 - 1) * s2 + k2;
    g.brick_vox = b0 * g.b1 * g.b2;
    const int nt0 = (o0 + TC_T0 - 1) / TC_T0, nt1 = (o1 + TC_T1 - 1) / TC_T1, nt2 = (o2 + TC_T2 - 1) / TC_T2;
    int t = (int)blockIdx.x;
    g.j2 = (t % nt2) * TC_T2; t /= nt2;
    g.j1 = (t % nt1) * TC_T1; t /= nt1;
    g.j0 = (t % nt0) * TC_T0;
    g.batch = t / nt0;
    g.i0 = g.j0 * s0 - p0;
    g.i1 = g.j1 * s1 - p1;
    g.i2 = g.j2 * s2 - p2;
    g.n0 = (int)blockIdx.y * TC_BN;
    g.rows = min(TC_BN, cout_pad - g.n0);
    return g;
}

// MT: m16 tiles per warp (2: 8 warps of 32 voxels x 64 channels; 4: 4 warps of 64 x 64).
template <class H, int MT>
DEEPIS_DEVICE void conv3d_tc(gptr<float> yf, gptr<H> yh, gptr<const H> x, gptr<const H> wt, gptr<const float> bias,
                             gptr<const float> rf, gptr<const H> rh, int n, int d0, int d1, int d2, int cin, int o0, int o1,
                             int o2, int cout, int k0, int k1, int k2, int s0, int s1, int s2, int p0, int p1, int p2, int ck,
                             int cout_pad, int out_half, int has_res, int relu) {
    DEEPIS_DYN_SMEM(unsigned short, smem);
    const TcGeom g = tc_geom(d0, d1, d2, cin, o0, o1, o2, cout, k0, k1, k2, s0, s1, s2, p0, p1, p2, ck, cout_pad, TcElem<H>::W * ck + 8);
    const sptr<unsigned short> brick = smem;
    const sptr<unsigned short> stages = smem + g.brick_vox * g.ckp;
    const int stage_len = TC_BN * g.ckp;
    const TcRows lay{g.ckp};

    const int l = (int)threadIdx.x % 32, w = (int)threadIdx.x / 32;
    // ldmatrix.x4 row of this lane for A (m16 tile i): voxel row l % 16, words 8 (l / 16) ..;
    // for B (n8 tiles 2p, 2p + 1): weight row 16 p + 8 (l / 16) + l % 8, words 8 ((l / 8) % 2) ..
    // (8 words: 8 halves, or 4 floats)
    int abase[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int m = 16 * MT * w + 16 * i + l % 16;
        const int m0 = m / (TC_T1 * TC_T2), m1 = (m / TC_T2) % TC_T1, m2 = m % TC_T2;
        abase[i] = ((m0 * s0 * g.b1 + m1 * s1) * g.b2 + m2 * s2) * g.ckp + 8 * (l / 16);
    }
    const int bbase = (8 * (l / 16) + l % 8) * g.ckp + 8 * ((l / 8) % 2);
    const int pairs = g.rows / 16;

    float acc[MT][8][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const int chunks = (cin + ck - 1) / ck;
    for (int c = 0; c < chunks; ++c) {
        __syncthreads();  // every warp is done with the previous chunk's brick and stages
        tc_load_brick<H>(brick, x, g, c, lay);
        // Group s holds the weights of tap s (the first one also the brick); one group per tap
        // is committed, empty past the last tap, so that wait_group(TC_STAGES - 2) always means
        // "tap `tap` has landed".
        for (int s = 0; s < TC_STAGES - 1; ++s) {
            if (s < g.taps) tc_load_weights<H>(stages + s * stage_len, wt, g, c, s, lay);
            cp_async_commit_group();
        }
        for (int tap = 0; tap < g.taps; ++tap) {
            cp_async_wait_group(TC_STAGES - 2);
            __syncthreads();  // tap's copies of every thread have landed; stage (tap - 1) % S is free
            const int next = tap + TC_STAGES - 1;
            if (next < g.taps) tc_load_weights<H>(stages + (next % TC_STAGES) * stage_len, wt, g, c, next, lay);
            cp_async_commit_group();

            const int t2 = tap % k2, t1 = (tap / k2) % k1, t0 = tap / (k2 * k1);
            const int aoff = ((t0 * g.b1 + t1) * g.b2 + t2) * g.ckp;
            const sptr<unsigned short> ws = stages + (tap % TC_STAGES) * stage_len;
            for (int kk = 0; kk < TcElem<H>::W * ck; kk += 16) {  // 16 words: one mma's channels
                unsigned a[MT][4];
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    ldmatrix_x4(a[i], brick + abase[i] + aoff + kk);
                    tc_round_a(a[i], H{});
                }
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    if (p >= pairs) continue;
                    unsigned b[4];
                    ldmatrix_x4(b, ws + bbase + 16 * p * g.ckp + kk);
#pragma unroll
                    for (int i = 0; i < MT; ++i) {
                        tc_mma(acc[i][2 * p], a[i], b, H{});
                        tc_mma(acc[i][2 * p + 1], a[i], b + 2, H{});
                    }
                }
            }
        }
    }
    cp_async_wait_group(0);  // only empty groups are left; a thread must not exit with any
    int mrow[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) mrow[i] = 16 * MT * w + 16 * i;
    tc_epilogue<H, MT>(acc, mrow, g, bias, yf, yh, rf, rh, out_half, has_res, relu);
}

// The wgmma kernels (sm_90a): stride 1, Cout a multiple of 64, f16 / bf16 (wgmma m64n64k16), or
// f32 computed in tf32 (m64n64k8 .tf32: a k8 step of floats is the same 32 bytes as a k16 step of
// halves, so everything below is in 16-bit words as in conv3d_tc). wgmma reads A from shared
// memory, so the tf32 kernel rounds its brick there, once per chunk (each thread its own copies,
// after their wait); the weights are rounded on the host. 256 threads = two
// warpgroups; warpgroup q computes output slices 2 q and 2 q + 1 of the 4 x 8 x 8 tile (two m64
// tiles of 8 x 8 voxels) by the block's 64 channels with wgmma.m64n64k16: per tap and 16 channels,
// one wgmma per m64 tile, A and B read from shared memory through descriptors (WgCore layout: a
// core matrix is 8 voxels along axis 2 by 8 channels, 16 bytes a row; no swizzle). The brick and
// WG_STAGES = 4 weight stages are filled by cp.async, two taps ahead. Per tap t: wait for its
// copies, fence.proxy.async (the copies are generic-proxy writes, wgmma reads through the async
// proxy), barrier, issue the copies of tap t + 2 into the stage tap t - 2 read (its wgmmas retired
// at tap t - 1, before this barrier), issue tap t's wgmmas, commit, and wait until only they are
// in flight (tap t - 1's retired): the tensor cores always have the next tap queued while the
// threads wait for copies and barriers. Before the next chunk's brick, and before the epilogue,
// every wgmma retires.
// A descriptor of m64 tile i (output slice m0 = 2 q + i), tap (t0, t1, t2), channel step kk:
//   A: start = brick piece (m0 + t0, t1, t2, 2 kk), LBO = 16 B2 (next 8 channels), SBO = 16 KG B2
//      (next output row m1: 8 voxels further along axis 1);
//   B: start = stage piece (row 0, 2 kk), LBO = 16 * 64 (next 8 channels), SBO = 128 (next 8 rows).
// Accumulation order: per chunk, per tap, per 16 channels (one wgmma summing 16 products).
#if DEEPIS_HAS_WGMMA
DEEPIS_DEVICE void wg_mma(float* d, unsigned long long da, unsigned long long db, f16) { wgmma_m64n64k16_f16(d, da, db, 1); }
DEEPIS_DEVICE void wg_mma(float* d, unsigned long long da, unsigned long long db, bf16) { wgmma_m64n64k16_bf16(d, da, db, 1); }
DEEPIS_DEVICE void wg_mma(float* d, unsigned long long da, unsigned long long db, float) { wgmma_m64n64k8_tf32(d, da, db, 1); }

// Rounds to tf32, in place, the brick elements this thread loaded (the pieces or elements
// tc_load_brick gave it); halves are used as loaded.
template <class H, class L> DEEPIS_DEVICE void wg_round_brick(sptr<unsigned short>, const TcGeom&, L) {}
template <class L> DEEPIS_DEVICE void wg_round_brick_f32(sptr<unsigned short> brick, const TcGeom& g, L lay) {
    const bool pieces = g.cin % 4 == 0;  // tc_load_brick's cp.async path: 4 floats a piece
    const int per = pieces ? 4 : 1, n = g.brick_vox * (g.ck / per);
    for (int q = (int)threadIdx.x; q < n; q += (int)blockDim.x) {
        const int v = q / (g.ck / per), j0 = per * (q - v * (g.ck / per));
        for (int j = j0; j < j0 + per; ++j) {
            const sptr<unsigned short> p = brick + lay.brick(v, j, 2);
            const unsigned u = (unsigned)(unsigned short)p[0] | ((unsigned)(unsigned short)p[1] << 16);
            const unsigned r = tf32_from_f32(__uint_as_float(u));
            p[0] = (unsigned short)(r & 0xffffu);
            p[1] = (unsigned short)(r >> 16);
        }
    }
}
template <> DEEPIS_DEVICE void wg_round_brick<float, WgCore>(sptr<unsigned short> brick, const TcGeom& g, WgCore lay) {
    wg_round_brick_f32(brick, g, lay);
}

template <class H>
DEEPIS_DEVICE void conv3d_wg(gptr<float> yf, gptr<H> yh, gptr<const H> x, gptr<const H> wt, gptr<const float> bias,
                             gptr<const float> rf, gptr<const H> rh, int n, int d0, int d1, int d2, int cin, int o0, int o1,
                             int o2, int cout, int k0, int k1, int k2, int s0, int s1, int s2, int p0, int p1, int p2, int ck,
                             int cout_pad, int out_half, int has_res, int relu) {
    DEEPIS_DYN_SMEM(unsigned short, smem);
    const int cw = TcElem<H>::W * ck;  // 16-bit words of a chunk's channels
    const TcGeom g = tc_geom(d0, d1, d2, cin, o0, o1, o2, cout, k0, k1, k2, s0, s1, s2, p0, p1, p2, ck, cout_pad, cw);
    const int kg = cw / 8;
    const WgCore lay{kg, g.b2};
    const sptr<unsigned short> brick = smem;
    const sptr<unsigned short> stages = smem + g.brick_vox * cw;
    const int stage_len = TC_BN * cw;
    const int q = (int)threadIdx.x / 128;
    const int a_lbo = 16 * g.b2, a_sbo = 16 * kg * g.b2;
    const int ahead = WG_STAGES - 2;  // taps of weights in flight ahead of the one computed

    float acc[2][32];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int e = 0; e < 32; ++e) acc[i][e] = 0.0f;

    const int chunks = (cin + ck - 1) / ck;
    for (int c = 0; c < chunks; ++c) {
        __syncthreads();  // every warpgroup is done with the previous chunk's brick and stages
        tc_load_brick<H>(brick, x, g, c, lay);
        // Group s holds the weights of tap s (the first one also the brick); one group per tap
        // is committed, empty past the last tap, so that wait_group(ahead - 1) always means "tap
        // `tap` has landed".
        for (int s = 0; s < ahead; ++s) {
            if (s < g.taps) tc_load_weights<H>(stages + s * stage_len, wt, g, c, s, lay);
            cp_async_commit_group();
        }
        for (int tap = 0; tap < g.taps; ++tap) {
            cp_async_wait_group(WG_STAGES - 3);
            if (tap == 0) wg_round_brick<H>(brick, g, lay);  // the brick landed with tap 0's group
            fence_proxy_async();
            __syncthreads();  // tap's copies of every thread have landed and are visible to wgmma;
                              // every thread has retired tap - 2's wgmmas
            const int next = tap + ahead;
            if (next < g.taps) tc_load_weights<H>(stages + (next % WG_STAGES) * stage_len, wt, g, c, next, lay);
            cp_async_commit_group();

            const int t2 = tap % k2, t1 = (tap / k2) % k1, t0 = tap / (k2 * k1);
            const sptr<unsigned short> ws = stages + (tap % WG_STAGES) * stage_len;
            wgmma_fence();
            for (int kk = 0; kk < cw / 16; ++kk) {  // 16 words: one wgmma's channels
                const unsigned long long db = wgmma_desc(ws + 2 * kk * TC_BN * 8, 16 * TC_BN, 128);
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int m0 = 2 * q + i;
                    const unsigned long long da = wgmma_desc(brick + ((((m0 + t0) * g.b1 + t1) * kg + 2 * kk) * g.b2 + t2) * 8, a_lbo, a_sbo);
                    wg_mma(acc[i], da, db, H{});
                }
            }
            wgmma_commit_group();
            wgmma_wait_group(1);  // tap - 1's wgmmas have retired; tap's run on
        }
        wgmma_wait_group(0);  // the brick and stages are free for the next chunk
        wgmma_fence_acc(acc[0], 32);
        wgmma_fence_acc(acc[1], 32);
    }
    cp_async_wait_group(0);  // only empty groups are left; a thread must not exit with any
    // Warp w of warpgroup q holds rows 16 w .. 16 w + 15 of each m64 tile, in the mma.sync C layout
    // per 16 x 8 piece: acc[i] is the [8][4] of tc_epilogue.
    const int w = ((int)threadIdx.x / 32) % 4;
    const int mrow[2] = {64 * (2 * q) + 16 * w, 64 * (2 * q + 1) + 16 * w};
    tc_epilogue<H, 2>(reinterpret_cast<float(*)[8][4]>(acc), mrow, g, bias, yf, yh, rf, rh, out_half, has_res, relu);
}
#define WG_BODY(H) \
    conv3d_wg<H>(yf, yh, x, wt, bias, rf, rh, n, d0, d1, d2, cin, o0, o1, o2, cout, k0, k1, k2, s0, s1, s2, p0, p1, p2, ck, cout_pad, out_half, has_res, relu)
#else
#define WG_BODY(H) __trap()  // wgmma needs sm_90a; the launch code never gets here
#endif

#if TC_SUPPORTED
#define TC_BODY(H, MT) \
    conv3d_tc<H, MT>(yf, yh, x, wt, bias, rf, rh, n, d0, d1, d2, cin, o0, o1, o2, cout, k0, k1, k2, s0, s1, s2, p0, p1, p2, ck, cout_pad, out_half, has_res, relu)
#else
#define TC_BODY(H, MT) __trap()  // mma.sync m16n8k16 / m16n8k8 .tf32 and cp.async need sm_80; the launch code never gets here
#endif
#define TC_PARAMS(H)                                                                                                    \
    gptr<float> yf, gptr<H> yh, gptr<const H> x, gptr<const H> wt, gptr<const float> bias, gptr<const float> rf,       \
        gptr<const H> rh, int n, int d0, int d1, int d2, int cin, int o0, int o1, int o2, int cout, int k0, int k1, int k2, \
        int s0, int s1, int s2, int p0, int p1, int p2, int ck, int cout_pad, int out_half, int has_res, int relu

extern "C" __global__ void __launch_bounds__(256) conv3d_tc_f16(TC_PARAMS(f16)) { TC_BODY(f16, 2); }
extern "C" __global__ void __launch_bounds__(256) conv3d_tc_bf16(TC_PARAMS(bf16)) { TC_BODY(bf16, 2); }
extern "C" __global__ void __launch_bounds__(128) conv3d_tc_wide_f16(TC_PARAMS(f16)) { TC_BODY(f16, 4); }
extern "C" __global__ void __launch_bounds__(128) conv3d_tc_wide_bf16(TC_PARAMS(bf16)) { TC_BODY(bf16, 4); }
extern "C" __global__ void __launch_bounds__(256) conv3d_tc_tf32(TC_PARAMS(float)) { TC_BODY(float, 2); }
extern "C" __global__ void __launch_bounds__(128) conv3d_tc_wide_tf32(TC_PARAMS(float)) { TC_BODY(float, 4); }
extern "C" __global__ void __launch_bounds__(256) conv3d_wgmma_f16(TC_PARAMS(f16)) { WG_BODY(f16); }
extern "C" __global__ void __launch_bounds__(256) conv3d_wgmma_bf16(TC_PARAMS(bf16)) { WG_BODY(bf16); }
extern "C" __global__ void __launch_bounds__(256) conv3d_wgmma_tf32(TC_PARAMS(float)) { WG_BODY(float); }
