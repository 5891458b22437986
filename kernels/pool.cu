// pool.cu — 2x2x2 max-pool, stride 2, floor of odd sizes (PyTorch MaxPool3d(2)).
//   maxpool2_f32, maxpool2_f16, maxpool2_bf16 — one thread per output element (channel fastest, so
//              reads coalesce across channels); 1D grid of ceil(N*O0*O1*O2*C / 256) blocks of 256
//              threads, no shared memory. The maximum of halves is a half: exact in every type.
// A NaN in a window is the window's maximum (PyTorch's scan: take a larger value or a NaN).
// CPU reference: CpuBackend::maxpool2.
#include "deepis_device.h"

template <class T> DEEPIS_DEVICE void maxpool2_all(gptr<T> y, gptr<const T> x, int n, int d0, int d1, int d2,
                                                   int c, int o0, int o1, int o2) {
    const int total = n * o0 * o1 * o2 * c;
    const int idx = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    const int ch = idx % c;
    int v = idx / c;
    const int j2 = v % o2; v /= o2;
    const int j1 = v % o1; v /= o1;
    const int j0 = v % o0;
    const int b = v / o0;
    const T first = x[(((b * d0 + 2 * j0) * d1 + 2 * j1) * d2 + 2 * j2) * c + ch];
    float m = half_cast(first, 0.0f);
    for (int t0 = 0; t0 < 2; ++t0)
        for (int t1 = 0; t1 < 2; ++t1)
            for (int t2 = 0; t2 < 2; ++t2) {
                const T et = x[(((b * d0 + 2 * j0 + t0) * d1 + 2 * j1 + t1) * d2 + 2 * j2 + t2) * c + ch];
                const float e = half_cast(et, 0.0f);
                m = (e > m || e != e) ? e : m;  // a NaN wins and stays, as in PyTorch
            }
    y[idx] = half_cast(m, T{});
}

extern "C" __global__ void maxpool2_f32(gptr<float> y, gptr<const float> x, int n, int d0, int d1, int d2,
                                        int c, int o0, int o1, int o2) {
    maxpool2_all(y, x, n, d0, d1, d2, c, o0, o1, o2);
}
extern "C" __global__ void maxpool2_f16(gptr<f16> y, gptr<const f16> x, int n, int d0, int d1, int d2,
                                        int c, int o0, int o1, int o2) {
    maxpool2_all(y, x, n, d0, d1, d2, c, o0, o1, o2);
}
extern "C" __global__ void maxpool2_bf16(gptr<bf16> y, gptr<const bf16> x, int n, int d0, int d1, int d2,
                                         int c, int o0, int o1, int o2) {
    maxpool2_all(y, x, n, d0, d1, d2, c, o0, o1, o2);
}
