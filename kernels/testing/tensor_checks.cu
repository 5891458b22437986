// tensor_checks.cu — test-only kernels for the tensor-core path (tests/tensor_core.rs): half
// conversions, the lane-layout truth table of ldmatrix and mma.sync, an mma with fragments built by
// the PTX ISA formulas, a cp.async + ldmatrix + mma tile loop, and planted bugs, each of which the
// emulator must catch. All run on a GPU too (sm_80+); benches/gpu_check.sh compares the truth table.
//
//  half_convert       y16[i] = f16(x[i]), yb[i] = bf16(x[i]) (round to nearest even)
//  half_widen         f[i] = float(h[i]), g[i] = float(b[i]) (exact)
//  tt_fragments       one warp: the truth table (layout below), out[9 * 256]
//  mma_frag_f16/bf16  one warp: D = A B + C, A 16x16 row-major, B 16x8 given n-major (Bn[n*16+k]),
//                     C, D 16x8 row-major; fragments loaded from global memory by the ISA formulas
//  tc_tile_gemm       block 64 (2 warps): D (16x16) = A (16xK, row-major) B (K x 16, given n-major
//                     Bn[n*K+k]), K a multiple of 16: per 16-wide step, cp.async of both tiles to
//                     shared memory, wait, barrier, ldmatrix, mma, barrier
//  cp_async_sizes     one warp: 4/8/16-byte copies, a 16-byte copy with src-size 8 and one with 0
//  tf32_round_bits    y[i] = the bits of tf32_from_f32(x[i]) (cvt.rna.tf32.f32)
//  mma_frag_tf32      one warp: D = A B + C in m16n8k8 .tf32, A 16x8 row-major (rounded to tf32 in
//                     the kernel), B 8x8 given n-major (Bn[n*8+k], tf32 values), C, D 16x8
//                     row-major; fragments loaded from global memory by the ISA formulas
//
// Planted bugs (each must fail on the emulator with a message naming the fault):
//  bug_mma_swapped_a_rows   A fragment registers 0/1 swapped (rows g and g+8)
//  bug_mma_b_row_major      B read as row-major (Bn[k*8+n]) instead of n-major
//  bug_tile_no_wait         no cp_async_wait_group before the barrier
//  bug_tile_no_barrier      no __syncthreads between the wait and the ldmatrix
//  bug_tile_war             no __syncthreads at the end of the tile loop (write-after-read)
//  bug_ldmatrix_misaligned  row addresses 2 bytes off the 16-byte alignment
//  bug_shared_oob           static shared index one past the end
//  bug_shared_uninit        reads shared memory no thread wrote
//  bug_shared_stale         block 1 reads shared memory only block 0 wrote (grid 2)
//  bug_shfl_exited          a shuffle reads lanes that returned
//  bug_mma_exited_lane      half the warp returns before mma.sync
//  bug_cp_async_exit        a thread exits with a cp.async pending
//  bug_mma_tf32_unrounded   mma_frag_tf32 with A not rounded to tf32 (an undefined operand)
#include "deepis_device.h"

extern "C" __global__ void half_convert(gptr<const float> x, gptr<f16> y16, gptr<bf16> yb, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y16[i] = f16_from_f32(x[i]);
    yb[i] = bf16_from_f32(x[i]);
}

extern "C" __global__ void half_widen(gptr<const f16> h, gptr<const bf16> b, gptr<float> f, gptr<float> g, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    f[i] = f16_to_f32(h[i]);
    g[i] = bf16_to_f32(b[i]);
}

// Writes lane `l`'s `num` registers (both halves, as element ids) to out[l * 8 ..], -1 elsewhere.
DEEPIS_DEVICE void tt_store_halves(gptr<float> out, int l, const unsigned* r, int num) {
    for (int i = 0; i < 4; ++i) {
        f16 lo{(unsigned short)(i < num ? r[i] & 0xffffu : 0)}, hi{(unsigned short)(i < num ? r[i] >> 16 : 0)};
        out[l * 8 + 2 * i] = i < num ? f16_to_f32(lo) : -1.0f;
        out[l * 8 + 2 * i + 1] = i < num ? f16_to_f32(hi) : -1.0f;
    }
}
DEEPIS_DEVICE void tt_store_acc(gptr<float> out, int l, const float* d) {
    for (int i = 0; i < 8; ++i) out[l * 8 + i] = i < 4 ? d[i] : -1.0f;
}

// The truth table: 9 sections of 32 lanes x 8 values.
//  0..2  ldmatrix .x1/.x2/.x4 of M (16x16 f16, M[r][c] = 16r + c); lane l supplies row
//        &M[l % 16][8 (l / 16)] (x1: rows 0..7; x2: rows 0..15): values = the ids of (reg, half)
//  3..5  the same with .trans
//  6     mma f16: A[m][0] = m, A[m][1] = 1, B[0][n] = 8, B[1][n] = n, C = 0 (D = 8m + n); A by
//        ldmatrix.x4 as above, B (stored k-major, 16x8) by ldmatrix.x2.trans: values = d[0..3]
//  7     the same in bf16
//  8     the f16 mma with c[i] = 1000 + 4 lane + i: values = d[0..3] = 8m + n + c
extern "C" __global__ void tt_fragments(gptr<float> out) {
    DEEPIS_SHARED(f16, M, 256);
    DEEPIS_SHARED(f16, A, 256);
    DEEPIS_SHARED(f16, B, 128);
    DEEPIS_SHARED(bf16, Ab, 256);
    DEEPIS_SHARED(bf16, Bb, 128);
    const int l = (int)threadIdx.x;
    for (int e = l * 8; e < l * 8 + 8; ++e) {
        const int r = e / 16, c = e % 16;
        M[e] = f16_from_f32((float)e);
        const float a = c == 0 ? (float)r : c == 1 ? 1.0f : 0.0f;
        A[e] = f16_from_f32(a);
        Ab[e] = bf16_from_f32(a);
    }
    for (int e = l * 4; e < l * 4 + 4; ++e) {
        const int k = e / 8, n = e % 8;
        const float b = k == 0 ? 8.0f : k == 1 ? (float)n : 0.0f;
        B[e] = f16_from_f32(b);
        Bb[e] = bf16_from_f32(b);
    }
    __syncthreads();
    const int row = l % 16, col = 8 * (l / 16);
    unsigned r[4];
    ldmatrix_x1(r, M + (l % 8) * 16);
    tt_store_halves(out + 0 * 256, l, r, 1);
    ldmatrix_x2(r, M + row * 16);
    tt_store_halves(out + 1 * 256, l, r, 2);
    ldmatrix_x4(r, M + row * 16 + col);
    tt_store_halves(out + 2 * 256, l, r, 4);
    ldmatrix_x1_trans(r, M + (l % 8) * 16);
    tt_store_halves(out + 3 * 256, l, r, 1);
    ldmatrix_x2_trans(r, M + row * 16);
    tt_store_halves(out + 4 * 256, l, r, 2);
    ldmatrix_x4_trans(r, M + row * 16 + col);
    tt_store_halves(out + 5 * 256, l, r, 4);

    unsigned a[4], b[2];
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
    ldmatrix_x4(a, A + row * 16 + col);
    ldmatrix_x2_trans(b, B + row * 8);
    mma_16816_f16(d, a, b, c);
    tt_store_acc(out + 6 * 256, l, d);
    ldmatrix_x4(a, Ab + row * 16 + col);
    ldmatrix_x2_trans(b, Bb + row * 8);
    mma_16816_bf16(d, a, b, c);
    tt_store_acc(out + 7 * 256, l, d);
    ldmatrix_x4(a, A + row * 16 + col);
    ldmatrix_x2_trans(b, B + row * 8);
    for (int i = 0; i < 4; ++i) c[i] = 1000.0f + 4.0f * (float)l + (float)i;
    mma_16816_f16(d, a, b, c);
    tt_store_acc(out + 8 * 256, l, d);
}

DEEPIS_DEVICE void mma_typed(float* d, const unsigned* a, const unsigned* b, const float* c, f16) { mma_16816_f16(d, a, b, c); }
DEEPIS_DEVICE void mma_typed(float* d, const unsigned* a, const unsigned* b, const float* c, bf16) { mma_16816_bf16(d, a, b, c); }

// Fragments straight from global memory by the PTX ISA formulas (g = lane / 4, t = lane % 4).
// `swap_a` and `b_row_major` plant the two layout bugs.
template <class H>
DEEPIS_DEVICE void mma_frag(gptr<const H> A, gptr<const H> Bn, gptr<const float> C, gptr<float> D, bool swap_a, bool b_row_major) {
    const int l = (int)threadIdx.x, g = l / 4, t = l % 4;
    unsigned a[4], b[2];
    a[0] = pack2(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
    a[1] = pack2(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
    a[2] = pack2(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
    a[3] = pack2(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
    if (swap_a) {  // BUG when planted: rows g and g + 8 exchanged
        unsigned s = a[0];
        a[0] = a[1];
        a[1] = s;
    }
    if (!b_row_major) {
        b[0] = pack2(Bn[g * 16 + 2 * t], Bn[g * 16 + 2 * t + 1]);
        b[1] = pack2(Bn[g * 16 + 2 * t + 8], Bn[g * 16 + 2 * t + 9]);
    } else {  // BUG when planted: the n-major B indexed as if k-major
        b[0] = pack2(Bn[(2 * t) * 8 + g], Bn[(2 * t + 1) * 8 + g]);
        b[1] = pack2(Bn[(2 * t + 8) * 8 + g], Bn[(2 * t + 9) * 8 + g]);
    }
    float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]}, d[4];
    mma_typed(d, a, b, c, H{});
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

extern "C" __global__ void mma_frag_f16(gptr<const f16> A, gptr<const f16> Bn, gptr<const float> C, gptr<float> D) {
    mma_frag<f16>(A, Bn, C, D, false, false);
}
extern "C" __global__ void mma_frag_bf16(gptr<const bf16> A, gptr<const bf16> Bn, gptr<const float> C, gptr<float> D) {
    mma_frag<bf16>(A, Bn, C, D, false, false);
}
extern "C" __global__ void bug_mma_swapped_a_rows(gptr<const f16> A, gptr<const f16> Bn, gptr<const float> C, gptr<float> D) {
    mma_frag<f16>(A, Bn, C, D, true, false);
}
extern "C" __global__ void bug_mma_b_row_major(gptr<const f16> A, gptr<const f16> Bn, gptr<const float> C, gptr<float> D) {
    mma_frag<f16>(A, Bn, C, D, false, true);
}

extern "C" __global__ void tf32_round_bits(gptr<const float> x, gptr<unsigned> y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = tf32_from_f32(x[i]);
}

// m16n8k8 .tf32 fragments by the PTX ISA formulas (g = lane / 4, t = lane % 4): a0 = A[g][t],
// a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]; b0 = B[t][g], b1 = B[t+4][g].
DEEPIS_DEVICE void mma_frag_tf32_impl(gptr<const float> A, gptr<const float> Bn, gptr<const float> C, gptr<float> D, bool round) {
    const int l = (int)threadIdx.x, g = l / 4, t = l % 4;
    const float av[4] = {A[g * 8 + t], A[(g + 8) * 8 + t], A[g * 8 + t + 4], A[(g + 8) * 8 + t + 4]};
    unsigned a[4], b[2];
    for (int r = 0; r < 4; ++r) a[r] = round ? tf32_from_f32(av[r]) : __float_as_uint(av[r]);  // BUG when !round
    b[0] = __float_as_uint(Bn[g * 8 + t]);
    b[1] = __float_as_uint(Bn[g * 8 + t + 4]);
    float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]}, d[4];
    mma_1688_tf32(d, a, b, c);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}
extern "C" __global__ void mma_frag_tf32(gptr<const float> A, gptr<const float> Bn, gptr<const float> C, gptr<float> D) {
    mma_frag_tf32_impl(A, Bn, C, D, true);
}
extern "C" __global__ void bug_mma_tf32_unrounded(gptr<const float> A, gptr<const float> Bn, gptr<const float> C, gptr<float> D) {
    mma_frag_tf32_impl(A, Bn, C, D, false);
}

// The tile loop of tc_tile_gemm; the flags plant the pipeline bugs.
#define TILE_OK 0
#define TILE_NO_WAIT 1
#define TILE_NO_BARRIER 2
#define TILE_WAR 3
#define TILE_MISALIGNED 4
DEEPIS_DEVICE void tile_gemm(gptr<const f16> A, gptr<const f16> Bn, gptr<float> D, int K, int bug) {
    DEEPIS_SHARED(f16, As, 16 * 16);  // As[m][k]
    DEEPIS_SHARED(f16, Bs, 16 * 16);  // Bs[n][k]
    const int tid = (int)threadIdx.x, l = tid % 32, w = tid / 32;
    const int g = l / 4, t = l % 4;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // Thread tid copies 16 bytes: A row tid/2 (tid < 32) or B row n = (tid-32)/2, k half tid % 2.
    const int cr = (tid % 32) / 2, ch = 8 * (tid % 2);
    for (int k0 = 0; k0 < K; k0 += 16) {
        if (tid < 32) cp_async16(As + cr * 16 + ch, A + cr * K + k0 + ch, 16);
        else cp_async16(Bs + cr * 16 + ch, Bn + cr * K + k0 + ch, 16);
        cp_async_commit_group();
        if (bug != TILE_NO_WAIT) cp_async_wait_group(0);
        if (bug != TILE_NO_BARRIER) __syncthreads();
        unsigned a[4], b[2];
        const int skew = bug == TILE_MISALIGNED ? 1 : 0;  // BUG when planted: 2 bytes off
        ldmatrix_x4(a, As + (l % 16) * 16 + 8 * (l / 16) + skew);
        ldmatrix_x2(b, Bs + (8 * w + l % 8) * 16 + 8 * ((l / 8) % 2));
        mma_16816_f16(acc, a, b, acc);
        if (bug != TILE_WAR) __syncthreads();
    }
    if (bug == TILE_NO_WAIT) cp_async_wait_group(0);
    D[g * 16 + 8 * w + 2 * t] = acc[0];
    D[g * 16 + 8 * w + 2 * t + 1] = acc[1];
    D[(g + 8) * 16 + 8 * w + 2 * t] = acc[2];
    D[(g + 8) * 16 + 8 * w + 2 * t + 1] = acc[3];
}

extern "C" __global__ void tc_tile_gemm(gptr<const f16> A, gptr<const f16> Bn, gptr<float> D, int K) {
    tile_gemm(A, Bn, D, K, TILE_OK);
}
extern "C" __global__ void bug_tile_no_wait(gptr<const f16> A, gptr<const f16> Bn, gptr<float> D, int K) {
    tile_gemm(A, Bn, D, K, TILE_NO_WAIT);
}
extern "C" __global__ void bug_tile_no_barrier(gptr<const f16> A, gptr<const f16> Bn, gptr<float> D, int K) {
    tile_gemm(A, Bn, D, K, TILE_NO_BARRIER);
}
extern "C" __global__ void bug_tile_war(gptr<const f16> A, gptr<const f16> Bn, gptr<float> D, int K) {
    tile_gemm(A, Bn, D, K, TILE_WAR);
}
extern "C" __global__ void bug_ldmatrix_misaligned(gptr<const f16> A, gptr<const f16> Bn, gptr<float> D, int K) {
    tile_gemm(A, Bn, D, K, TILE_MISALIGNED);
}

// y[0..32): lane l copies x[l] (4 bytes); y[32..96): lanes copy pairs (8 bytes); y[96..224): 16
// bytes each; y[224..352): 16-byte copies with src-size 8 (even lanes) or 0 (odd lanes): the
// rest of each 16 bytes zero-filled.
extern "C" __global__ void cp_async_sizes(gptr<const float> x, gptr<float> y) {
    DEEPIS_SHARED(float, s, 352);
    const int l = (int)threadIdx.x;
    cp_async4(s + l, x + l, 4);
    cp_async8(s + 32 + 2 * l, x + 32 + 2 * l, 8);
    cp_async_commit_group();
    cp_async16(s + 96 + 4 * l, x + 96 + 4 * l, 16);
    cp_async16(s + 224 + 4 * l, x + 224 + 4 * l, l % 2 ? 0 : 8);
    cp_async_commit_group();
    cp_async_wait_group(1);  // the first group is complete, the second may still be in flight
    float first = s[l] + s[32 + 2 * l] + s[33 + 2 * l];
    cp_async_wait_group(0);
    __syncthreads();
    for (int i = l; i < 352; i += 32) y[i] = s[i];
    y[352 + l] = first;
}

extern "C" __global__ void bug_shared_oob(gptr<float> y) {
    DEEPIS_SHARED(float, s, 32);
    const int t = (int)threadIdx.x;
    s[t + 1] = (float)t;  // BUG (on purpose): thread 31 writes s[32]
    __syncthreads();
    y[t] = s[t];
}

extern "C" __global__ void bug_shared_uninit(gptr<float> y) {
    DEEPIS_SHARED(float, s, 32);
    const int t = (int)threadIdx.x;
    if (t < 16) s[t] = (float)t;  // BUG (on purpose): s[16..32) is never written
    __syncthreads();
    y[t] = s[31 - t];
}

extern "C" __global__ void bug_shared_stale(gptr<float> y) {
    DEEPIS_SHARED(float, s, 32);
    const int t = (int)threadIdx.x;
    if (blockIdx.x == 0) s[t] = (float)t;  // BUG (on purpose): block 1 reads what block 0 left
    __syncthreads();
    y[blockIdx.x * 32 + t] = s[t];
}

extern "C" __global__ void bug_shfl_exited(gptr<float> y) {
    const int t = (int)threadIdx.x;
    if (t >= 16) return;  // BUG (on purpose): lanes 16..31 leave before the shuffle reads them
    float v = (float)t;
    v += __shfl_down_sync(0xffffffffu, v, 8);
    y[t] = v;
}

extern "C" __global__ void bug_mma_exited_lane(gptr<float> y) {
    const int t = (int)threadIdx.x;
    if (t >= 16) return;  // BUG (on purpose): mma.sync needs all 32 lanes
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d[4];
    mma_16816_f16(d, a, b, c);
    y[t] = d[0];
}

extern "C" __global__ void bug_cp_async_exit(gptr<const float> x, gptr<float> y) {
    DEEPIS_SHARED(float, s, 128);
    const int t = (int)threadIdx.x;
    cp_async16(s + 4 * t, x + 4 * t, 16);
    cp_async_commit_group();  // BUG (on purpose): no cp_async_wait_group before the thread exits
    y[t] = (float)t;
}
