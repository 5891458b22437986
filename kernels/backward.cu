// backward.cu — backward of the element-wise, pooling, up-sampling and softmax ops, and the small
// tensor helpers the autograd tape needs. Channels-last, float32. Every kernel writes each output
// element from one thread (a gather, never a scatter), so no atomics and no order to depend on.
// One thread per element, 1D grid of ceil(total / 256) blocks of 256 threads, no shared memory:
//   relu_backward_f32      — dx = y > 0 ? dy : 0                        (TrainBackend::relu_backward for CpuBackend)
//   sigmoid_backward_f32   — dx = dy * y * (1 - y)                      (sigmoid_backward)
//   mul_f32                — y = a * b                                  (mul: dropout and its backward)
//   accumulate_f32         — acc += g                                   (accumulate, accumulate_param)
//   copy_f32               — y = x                                      (duplicate)
//   maxpool2_backward_f32  — one thread per INPUT element: it receives dy of its 2x2x2 window when it
//                            is the window's first maximum in PyTorch's scan order (NaN counts as a
//                            maximum); voxels cut off by flooring odd sizes get 0  (maxpool2_backward)
//   upsample_trilinear_backward_f32 — one thread per INPUT element: gathers every output that reads it
//                            (align_corners=True, r = (in-1)/(out-1) in float32 from the host, as the
//                            forward). The outputs reading input i along an axis are contiguous: found
//                            by binary search on the monotone floor(r * o). Sums nest d0 > d1 > d2 with
//                            the innermost along d2, in increasing output order, the order of the CPU's
//                            separable adjoint (upsample_backward)
// One thread per (n, voxel), same grid over N*D0*D1*D2:
//   softmax_backward_f32   — dx = y * (dy - sum_c dy * y), channel sum in order (softmax_backward)
#include "deepis_device.h"

extern "C" __global__ void relu_backward_f32(gptr<float> dx, gptr<const float> dy, gptr<const float> y, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

extern "C" __global__ void sigmoid_backward_f32(gptr<float> dx, gptr<const float> dy, gptr<const float> y, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    const float v = y[i];
    const float gy = dy[i] * v;
    dx[i] = gy * (1.0f - v);
}

extern "C" __global__ void mul_f32(gptr<float> y, gptr<const float> a, gptr<const float> b, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    y[i] = a[i] * b[i];
}

extern "C" __global__ void accumulate_f32(gptr<float> acc, gptr<const float> g, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    acc[i] = acc[i] + g[i];
}

extern "C" __global__ void copy_f32(gptr<float> y, gptr<const float> x, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    y[i] = x[i];
}

extern "C" __global__ void maxpool2_backward_f32(gptr<float> dx, gptr<const float> dy, gptr<const float> x, int n, int d0,
                                                 int d1, int d2, int c, int o0, int o1, int o2) {
    const int total = n * d0 * d1 * d2 * c;
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    const int ch = idx % c;
    int v = idx / c;
    const int i2 = v % d2; v /= d2;
    const int i1 = v % d1; v /= d1;
    const int i0 = v % d0;
    const int b = v / d0;
    const int j0 = i0 >> 1, j1 = i1 >> 1, j2 = i2 >> 1;
    float g = 0.0f;
    if (j0 < o0 && j1 < o1 && j2 < o2) {
        // PyTorch's scan: start at the window's first voxel, take a larger value or a NaN.
        float best = -__int_as_float(0x7f800000);  // -inf
        int at = 0;
        for (int t = 0; t < 8; ++t) {
            const int a0 = t >> 2, a1 = (t >> 1) & 1, a2 = t & 1;
            const float e = x[(((b * d0 + 2 * j0 + a0) * d1 + 2 * j1 + a1) * d2 + 2 * j2 + a2) * c + ch];
            if (e > best || e != e) {
                best = e;
                at = t;
            }
        }
        const int mine = ((i0 & 1) << 2) | ((i1 & 1) << 1) | (i2 & 1);
        if (at == mine) g = dy[(((b * o0 + j0) * o1 + j1) * o2 + j2) * c + ch];
    }
    dx[idx] = g;
}

// Lower source index of output o along an axis of `in` inputs (the forward's floor, clamped).
DEEPIS_DEVICE int up_lo(float r, int o, int in) {
    const int a = (int)(r * (float)o);
    return a < in - 1 ? a : in - 1;
}

// The weights output o gives input i along an axis: the CPU's lin_weights (l1 clamped to [0, 1]).
DEEPIS_DEVICE void up_w(float r, int o, int in, int i, float& wlo, float& whi) {
    const int a = up_lo(r, o, in);
    const int e = a < in - 1 ? a + 1 : a;
    float l1 = r * (float)o - (float)a;
    l1 = l1 < 0.0f ? 0.0f : (l1 > 1.0f ? 1.0f : l1);
    wlo = a == i ? 1.0f - l1 : 0.0f;
    whi = e == i ? l1 : 0.0f;
}

// First output along an axis whose lower source index is >= i - 1 (up_lo is monotone in o).
DEEPIS_DEVICE int up_first(float r, int out, int in, int i) {
    int lo = 0, hi = out;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (up_lo(r, mid, in) >= i - 1) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

extern "C" __global__ void upsample_trilinear_backward_f32(gptr<float> dx, gptr<const float> dy, int n, int d0, int d1,
                                                           int d2, int c, int o0, int o1, int o2, float r0,
                                                           float r1, float r2) {
    const int total = n * d0 * d1 * d2 * c;
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    const int ch = idx % c;
    int v = idx / c;
    const int i2 = v % d2; v /= d2;
    const int i1 = v % d1; v /= d1;
    const int i0 = v % d0;
    const int b = v / d0;
    const int f0 = up_first(r0, o0, d0, i0), f1 = up_first(r1, o1, d1, i1), f2 = up_first(r2, o2, d2, i2);
    float acc0 = 0.0f;
    for (int q0 = f0; q0 < o0 && up_lo(r0, q0, d0) <= i0; ++q0) {
        float acc1 = 0.0f;
        for (int q1 = f1; q1 < o1 && up_lo(r1, q1, d1) <= i1; ++q1) {
            float acc2 = 0.0f;
            for (int q2 = f2; q2 < o2 && up_lo(r2, q2, d2) <= i2; ++q2) {
                float wl, wh;
                up_w(r2, q2, d2, i2, wl, wh);
                const float g = dy[(((b * o0 + q0) * o1 + q1) * o2 + q2) * c + ch];
                if (wl != 0.0f) acc2 += wl * g;
                if (wh != 0.0f) acc2 += wh * g;
            }
            float wl, wh;
            up_w(r1, q1, d1, i1, wl, wh);
            if (wl != 0.0f) acc1 += wl * acc2;
            if (wh != 0.0f) acc1 += wh * acc2;
        }
        float wl, wh;
        up_w(r0, q0, d0, i0, wl, wh);
        if (wl != 0.0f) acc0 += wl * acc1;
        if (wh != 0.0f) acc0 += wh * acc1;
    }
    dx[idx] = acc0;
}

extern "C" __global__ void softmax_backward_f32(gptr<float> dx, gptr<const float> dy, gptr<const float> y, int voxels, int c) {
    const int p = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (p >= voxels) return;
    const int base = p * c;
    float s = 0.0f;
    for (int ch = 0; ch < c; ++ch) {
        const float gy = dy[base + ch] * y[base + ch];
        s += gy;
    }
    for (int ch = 0; ch < c; ++ch) dx[base + ch] = y[base + ch] * (dy[base + ch] - s);
}
