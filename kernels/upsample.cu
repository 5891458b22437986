// upsample.cu — trilinear up-sampling with align_corners=True to an arbitrary size (PyTorch
// F.interpolate(mode="trilinear", align_corners=True)). Source coordinate = r * out_index with
// r = (in - 1) / (out - 1) computed on the host in float32 (0 when out == 1); size-1 dims read index 0.
// Each kernel: one thread per output element (channel fastest); 1D grid of ceil(N*O0*O1*O2*C / 256)
// blocks of 256 threads, no shared memory.
//   upsample_trilinear_f32 — y = up(x)                                  (CpuBackend::upsample)
//   upsample_add_f32, upsample_add_f16, upsample_add_bf16 — y = skip + up(x), computed in f32 from
//                        the stored values and rounded once to the storage type (plan::ops::upsample_add);
//                        y may be skip itself (each thread reads and writes its own element).
#include "deepis_device.h"

// The up-sampled value of output element idx (of n * o0 * o1 * o2 * c) of x, in f32.
template <class T> DEEPIS_DEVICE float trilinear_at(gptr<const T> x, int idx, int d0, int d1, int d2, int c,
                                                    int o0, int o1, int o2, float r0, float r1, float r2) {
    const int ch = idx % c;
    int v = idx / c;
    const int j2 = v % o2; v /= o2;
    const int j1 = v % o1; v /= o1;
    const int j0 = v % o0;
    const int b = v / o0;

    const float s0 = r0 * (float)j0, s1 = r1 * (float)j1, s2 = r2 * (float)j2;
    int a0 = (int)s0, a1 = (int)s1, a2 = (int)s2;  // floor: coordinates are >= 0
    a0 = a0 < d0 - 1 ? a0 : d0 - 1;
    a1 = a1 < d1 - 1 ? a1 : d1 - 1;
    a2 = a2 < d2 - 1 ? a2 : d2 - 1;
    const int e0 = a0 < d0 - 1 ? 1 : 0, e1 = a1 < d1 - 1 ? 1 : 0, e2 = a2 < d2 - 1 ? 1 : 0;
    const float l0 = s0 - (float)a0, l1 = s1 - (float)a1, l2 = s2 - (float)a2;
    const float h0 = 1.0f - l0, h1 = 1.0f - l1, h2 = 1.0f - l2;

    // Offsets in elements of one step along each dim.
    const int st2 = c, st1 = d2 * c, st0 = d1 * d2 * c;
    const int base = (((b * d0 + a0) * d1 + a1) * d2 + a2) * c + ch;
    const int q0 = e0 * st0, q1 = e1 * st1, q2 = e2 * st2;
    const T t000 = x[base], t001 = x[base + q2];
    const T t010 = x[base + q1], t011 = x[base + q1 + q2];
    const T t100 = x[base + q0], t101 = x[base + q0 + q2];
    const T t110 = x[base + q0 + q1], t111 = x[base + q0 + q1 + q2];
    const float v000 = half_cast(t000, 0.0f), v001 = half_cast(t001, 0.0f);
    const float v010 = half_cast(t010, 0.0f), v011 = half_cast(t011, 0.0f);
    const float v100 = half_cast(t100, 0.0f), v101 = half_cast(t101, 0.0f);
    const float v110 = half_cast(t110, 0.0f), v111 = half_cast(t111, 0.0f);
    return h0 * (h1 * (h2 * v000 + l2 * v001) + l1 * (h2 * v010 + l2 * v011)) +
           l0 * (h1 * (h2 * v100 + l2 * v101) + l1 * (h2 * v110 + l2 * v111));
}

extern "C" __global__ void upsample_trilinear_f32(gptr<float> y, gptr<const float> x, int n, int d0, int d1,
                                              int d2, int c, int o0, int o1, int o2, float r0,
                                              float r1, float r2) {
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= n * o0 * o1 * o2 * c) return;
    y[idx] = trilinear_at(x, idx, d0, d1, d2, c, o0, o1, o2, r0, r1, r2);
}

template <class T> DEEPIS_DEVICE void upsample_add_all(gptr<T> y, gptr<const T> skip, gptr<const T> x, int n, int d0,
                                                       int d1, int d2, int c, int o0, int o1, int o2,
                                                       float r0, float r1, float r2) {
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= n * o0 * o1 * o2 * c) return;
    const T s = skip[idx];
    y[idx] = half_cast(half_cast(s, 0.0f) + trilinear_at(x, idx, d0, d1, d2, c, o0, o1, o2, r0, r1, r2), T{});
}

extern "C" __global__ void upsample_add_f32(gptr<float> y, gptr<const float> skip, gptr<const float> x, int n, int d0,
                                            int d1, int d2, int c, int o0, int o1, int o2, float r0,
                                            float r1, float r2) {
    upsample_add_all(y, skip, x, n, d0, d1, d2, c, o0, o1, o2, r0, r1, r2);
}
extern "C" __global__ void upsample_add_f16(gptr<f16> y, gptr<const f16> skip, gptr<const f16> x, int n, int d0,
                                            int d1, int d2, int c, int o0, int o1, int o2, float r0,
                                            float r1, float r2) {
    upsample_add_all(y, skip, x, n, d0, d1, d2, c, o0, o1, o2, r0, r1, r2);
}
extern "C" __global__ void upsample_add_bf16(gptr<bf16> y, gptr<const bf16> skip, gptr<const bf16> x, int n, int d0,
                                             int d1, int d2, int c, int o0, int o1, int o2, float r0,
                                             float r1, float r2) {
    upsample_add_all(y, skip, x, n, d0, d1, d2, c, o0, o1, o2, r0, r1, r2);
}
