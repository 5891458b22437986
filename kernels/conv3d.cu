// conv3d.cu — 3D convolution, float32 with float32 accumulation, zero padding.
// Layouts: x (N, D0, D1, D2, Cin) channels-last; w [k0][k1][k2][cin][cout]; y (N, O0, O1, O2, Cout).
// Kernels are named {op}_{dtype} (candle's pattern); both take the same parameter list, so the
// launch code (src/gpu/ops.rs, ConvVariant) picks a variant per shape:
//   conv3d_direct_f32 — one thread per output (voxel, cout); cout fastest across threads so weight reads
//                   coalesce and the input value is a broadcast. 1D grid of ceil(N*O*Cout / 256)
//                   blocks of 256 threads, no shared memory. Best for small Cout (heads: Cout 1..3).
//   conv3d_tiled_f32  — implicit GEMM: M = N*O0*O1*O2 output voxels, Ncol = Cout, K = k0*k1*k2*Cin.
//                   Block = 256 threads computes a 64 (voxels) x 64 (cout) tile, 4x4 outputs per
//                   thread; K walked in steps of 16 with the input patch (zero padded, gathered on
//                   the fly) and the weight slab staged in static shared memory (8.25 KiB).
//                   Grid (ceil(M/64), ceil(Cout/64)), block 256.
// CPU reference: CpuBackend::conv3d (src/cpu/).
#include "deepis_device.h"

extern "C" __global__ void conv3d_direct_f32(gptr<float> y, gptr<const float> x, gptr<const float> w, gptr<const float> bias,
                                         int has_bias, int n, int d0, int d1, int d2, int cin,
                                         int o0, int o1, int o2, int cout, int k0, int k1, int k2,
                                         int s0, int s1, int s2, int p0, int p1, int p2) {
    const int total = n * o0 * o1 * o2 * cout;
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    const int co = idx % cout;
    int v = idx / cout;
    const int j2 = v % o2; v /= o2;
    const int j1 = v % o1; v /= o1;
    const int j0 = v % o0;
    const int b = v / o0;
    // Start from the bias and sum taps then channels in order, as the CPU reference does.
    float acc = has_bias ? bias[co] : 0.0f;
    for (int t0 = 0; t0 < k0; ++t0) {
        const int i0 = j0 * s0 - p0 + t0;
        if (i0 < 0 || i0 >= d0) continue;
        for (int t1 = 0; t1 < k1; ++t1) {
            const int i1 = j1 * s1 - p1 + t1;
            if (i1 < 0 || i1 >= d1) continue;
            for (int t2 = 0; t2 < k2; ++t2) {
                const int i2 = j2 * s2 - p2 + t2;
                if (i2 < 0 || i2 >= d2) continue;
                const int xb = (((b * d0 + i0) * d1 + i1) * d2 + i2) * cin;
                const int wb = ((t0 * k1 + t1) * k2 + t2) * cin * cout + co;
                for (int ci = 0; ci < cin; ++ci) acc = fmaf(x[xb + ci], w[wb + ci * cout], acc);
            }
        }
    }
    y[idx] = acc;
}

#define CT_BM 64   // output voxels per block
#define CT_BN 64   // output channels per block
#define CT_BK 16   // reduction step
#define CT_AS 68   // padded row stride of the A tile (fewer bank conflicts on the transposed store)

extern "C" __global__ void conv3d_tiled_f32(gptr<float> y, gptr<const float> x, gptr<const float> w, gptr<const float> bias,
                                        int has_bias, int n, int d0, int d1, int d2, int cin,
                                        int o0, int o1, int o2, int cout, int k0, int k1, int k2,
                                        int s0, int s1, int s2, int p0, int p1, int p2) {
    DEEPIS_SHARED(float, As, CT_BK * CT_AS);  // As[k][m]
    DEEPIS_SHARED(float, Bs, CT_BK * CT_BN);  // Bs[k][co]
    const int tid = (int)threadIdx.x;
    const int M = n * o0 * o1 * o2;
    const int K = k0 * k1 * k2 * cin;
    const int m0 = (int)blockIdx.x * CT_BM;
    const int n0 = (int)blockIdx.y * CT_BN;

    // A loader: consecutive threads read consecutive input channels of one voxel (coalesced).
    const int a_k = tid & 15;
    const int a_m = tid >> 4;  // rows a_m + 16 i
    int rb[4], r0[4], r1[4], r2[4];
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + a_m + 16 * i;
        if (m < M) {
            int v = m;
            const int j2 = v % o2; v /= o2;
            const int j1 = v % o1; v /= o1;
            const int j0 = v % o0;
            rb[i] = v / o0;
            r0[i] = j0 * s0 - p0;
            r1[i] = j1 * s1 - p1;
            r2[i] = j2 * s2 - p2;
        } else {
            rb[i] = 0;
            r0[i] = -(1 << 29);  // never in range: the row reads as zeros
            r1[i] = 0;
            r2[i] = 0;
        }
    }
    // B loader: consecutive threads read consecutive output channels of one weight row.
    const int b_n = tid & 63;
    const int b_k = tid >> 6;  // rows b_k + 4 i
    // Compute mapping: thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j.
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const int k12 = k1 * k2;

    // Start from the bias and walk K in order (taps, then channels), as the CPU reference does.
    float acc[4][4];
    for (int j = 0; j < 4; ++j) {
        const int co = n0 + tx + 16 * j;
        const float b0 = (has_bias && co < cout) ? bias[co] : 0.0f;
        for (int i = 0; i < 4; ++i) acc[i][j] = b0;
    }

    for (int kt = 0; kt < K; kt += CT_BK) {
        const int k = kt + a_k;
        const int tap = k / cin;
        const int ci = k - tap * cin;
        const int t0 = tap / k12;
        const int tr = tap - t0 * k12;
        const int t1 = tr / k2;
        const int t2 = tr - t1 * k2;
        for (int i = 0; i < 4; ++i) {
            float v = 0.0f;
            const int i0 = r0[i] + t0, i1 = r1[i] + t1, i2 = r2[i] + t2;
            if (k < K && i0 >= 0 && i0 < d0 && i1 >= 0 && i1 < d1 && i2 >= 0 && i2 < d2)
                v = x[(((rb[i] * d0 + i0) * d1 + i1) * d2 + i2) * cin + ci];
            As[a_k * CT_AS + a_m + 16 * i] = v;
        }
        for (int i = 0; i < 4; ++i) {
            const int kk = b_k + 4 * i;
            const int kg = kt + kk;
            const int co = n0 + b_n;
            Bs[kk * CT_BN + b_n] = (kg < K && co < cout) ? w[kg * cout + co] : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < CT_BK; ++kk) {
            float a[4], bv[4];
            for (int i = 0; i < 4; ++i) a[i] = As[kk * CT_AS + ty + 16 * i];
            for (int j = 0; j < 4; ++j) bv[j] = Bs[kk * CT_BN + tx + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }

    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= M) continue;
        for (int j = 0; j < 4; ++j) {
            const int co = n0 + tx + 16 * j;
            if (co >= cout) continue;
            y[m * cout + co] = acc[i][j];
        }
    }
}
