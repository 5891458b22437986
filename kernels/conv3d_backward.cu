// conv3d_backward.cu — gradients of the 3D convolution (conv3d.cu), float32, channels-last.
// Layouts: x (N, D0, D1, D2, Cin); dy (N, O0, O1, O2, Cout); w and dw [k0][k1][k2][cin][cout].
// Input gradient (src/gpu/train_ops.rs picks the path):
//   stride 1: a forward conv (conv3d.cu, any variant) of dy with the weights flipped in space and
//             cin/cout swapped, padding k-1-p — the CPU's own method (CpuBackend::conv3d_backward_input):
//   conv3d_flip_weights_f32   — wf[k-1-t][co][ci] = w[t][ci][co]; one thread per weight, 1D grid of
//                               ceil(len / 256) blocks of 256 threads.
//   conv3d_backward_input_f32 — any stride: one thread per input element (voxel, ci), ci fastest;
//                               gathers the taps t with (i + p - t) divisible by the stride, so the
//                               zeros a dilated gradient would hold are never read. 1D grid of
//                               ceil(N*D0*D1*D2*Cin / 256) blocks of 256 threads.
// Weight gradient, deterministic in two passes (no atomics; partial sums in a fixed order):
//   conv3d_wgrad_partial_f32  — part[chunk][widx] = sum over the chunk's output voxels m (in order) of
//                               x[m * s + t - p][ci] * dy[m][co]; one thread per (chunk, weight), co
//                               fastest (dy reads coalesce, x is a broadcast). Grid
//                               (ceil(wlen / 256), chunks), block 256. Chunks depend on shapes only.
//   sum_partials_f32          — out[j] = float(sum over chunks, in order, in double, of part[k][j]);
//                               one thread per j, 1D grid of ceil(len / 256) blocks of 256 threads.
// CPU reference: TrainBackend for CpuBackend (src/train/cpu.rs): conv3d_backward_input,
// conv3d_backward_weight (float32 chunk sums added in float64, like this).
#include "deepis_device.h"

extern "C" __global__ void conv3d_flip_weights_f32(gptr<float> wf, gptr<const float> w, int k0, int k1, int k2, int cin,
                                                   int cout) {
    const int total = k0 * k1 * k2 * cin * cout;
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    const int co = idx % cout;
    int v = idx / cout;
    const int ci = v % cin;
    const int t = v / cin;
    const int t2 = t % k2, t1 = (t / k2) % k1, t0 = t / (k1 * k2);
    const int tf = ((k0 - 1 - t0) * k1 + (k1 - 1 - t1)) * k2 + (k2 - 1 - t2);
    wf[(tf * cout + co) * cin + ci] = w[idx];
}

extern "C" __global__ void conv3d_backward_input_f32(gptr<float> dx, gptr<const float> dy, gptr<const float> w, int n, int d0,
                                                     int d1, int d2, int cin, int o0, int o1, int o2, int cout,
                                                     int k0, int k1, int k2, int s0, int s1, int s2, int p0,
                                                     int p1, int p2) {
    const int total = n * d0 * d1 * d2 * cin;
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    const int ci = idx % cin;
    int v = idx / cin;
    const int i2 = v % d2; v /= d2;
    const int i1 = v % d1; v /= d1;
    const int i0 = v % d0;
    const int b = v / d0;
    float acc = 0.0f;
    for (int t0 = 0; t0 < k0; ++t0) {
        const int q0 = i0 + p0 - t0;
        if (q0 < 0 || q0 % s0 != 0 || q0 / s0 >= o0) continue;
        for (int t1 = 0; t1 < k1; ++t1) {
            const int q1 = i1 + p1 - t1;
            if (q1 < 0 || q1 % s1 != 0 || q1 / s1 >= o1) continue;
            for (int t2 = 0; t2 < k2; ++t2) {
                const int q2 = i2 + p2 - t2;
                if (q2 < 0 || q2 % s2 != 0 || q2 / s2 >= o2) continue;
                const int gb = (((b * o0 + q0 / s0) * o1 + q1 / s1) * o2 + q2 / s2) * cout;
                const int wb = (((t0 * k1 + t1) * k2 + t2) * cin + ci) * cout;
                for (int co = 0; co < cout; ++co) acc = fmaf(dy[gb + co], w[wb + co], acc);
            }
        }
    }
    dx[idx] = acc;
}

extern "C" __global__ void conv3d_wgrad_partial_f32(gptr<float> part, gptr<const float> x, gptr<const float> dy, int n, int d0,
                                                    int d1, int d2, int cin, int o0, int o1, int o2, int cout,
                                                    int k0, int k1, int k2, int s0, int s1, int s2, int p0,
                                                    int p1, int p2, int chunk_vox) {
    const int wlen = k0 * k1 * k2 * cin * cout;
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= wlen) return;
    const int co = idx % cout;
    int v = idx / cout;
    const int ci = v % cin;
    const int t = v / cin;
    const int t2 = t % k2, t1 = (t / k2) % k1, t0 = t / (k1 * k2);
    const int M = n * o0 * o1 * o2;
    const int m0 = (int)blockIdx.y * chunk_vox;
    const int m1 = min(M, m0 + chunk_vox);
    // Output coordinates of m0, then stepped along with m.
    int j2 = m0 % o2, r = m0 / o2;
    int j1 = r % o1;
    r /= o1;
    int j0 = r % o0;
    int b = r / o0;
    float acc = 0.0f;
    for (int m = m0; m < m1; ++m) {
        const int i0 = j0 * s0 - p0 + t0, i1 = j1 * s1 - p1 + t1, i2 = j2 * s2 - p2 + t2;
        if (i0 >= 0 && i0 < d0 && i1 >= 0 && i1 < d1 && i2 >= 0 && i2 < d2)
            acc = fmaf(x[(((b * d0 + i0) * d1 + i1) * d2 + i2) * cin + ci], dy[m * cout + co], acc);
        if (++j2 == o2) {
            j2 = 0;
            if (++j1 == o1) {
                j1 = 0;
                if (++j0 == o0) {
                    j0 = 0;
                    ++b;
                }
            }
        }
    }
    part[(int)blockIdx.y * wlen + idx] = acc;
}

extern "C" __global__ void sum_partials_f32(gptr<float> out, gptr<const float> part, int chunks, int len) {
    const int j = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (j >= len) return;
    double s = 0.0;
    for (int k = 0; k < chunks; ++k) s += (double)part[k * len + j];
    out[j] = (float)s;
}
