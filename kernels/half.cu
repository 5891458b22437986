// half.cu — conversions between f32 and the half types of the tensor-core path, on channels-last
// tensors (N, D0, D1, D2, C) of either side, so the layout is unchanged: one thread per element,
// 1D grid of ceil(total / 256) blocks of 256 threads, no shared memory. Launched by
// src/gpu/convert.rs; the reference is the `half` crate (gpu::to_half_bits / from_half_bits).
//   to_half_f16, to_half_bf16 — y = x rounded to nearest even (overflow to infinity, NaN stays NaN)
//   to_f32_f16, to_f32_bf16   — y = x, exact
#include "deepis_device.h"

template <class Y, class X> DEEPIS_DEVICE void half_convert_all(gptr<Y> y, gptr<const X> x, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < total) y[i] = half_cast(x[i], Y{});
}

extern "C" __global__ void to_half_f16(gptr<f16> y, gptr<const float> x, int total) { half_convert_all(y, x, total); }
extern "C" __global__ void to_half_bf16(gptr<bf16> y, gptr<const float> x, int total) { half_convert_all(y, x, total); }
extern "C" __global__ void to_f32_f16(gptr<float> y, gptr<const f16> x, int total) { half_convert_all(y, x, total); }
extern "C" __global__ void to_f32_bf16(gptr<float> y, gptr<const bf16> x, int total) { half_convert_all(y, x, total); }
