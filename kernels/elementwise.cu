// elementwise.cu — per-element ops on channels-last tensors. Each kernel: one thread per element,
// 1D grid of ceil(total / 256) blocks of 256 threads, no shared memory.
//   channel_affine_f32 — y = x * scale[c] + shift[c], then ReLU if relu != 0   (CpuBackend::channel_affine)
//   relu_f32           — y = max(x, 0)                                         (CpuBackend::relu)
//   add_f32            — y = a + b, then ReLU if relu != 0                     (CpuBackend::add)
//   sigmoid_f32        — y = 1 / (1 + exp(-x))                                 (CpuBackend::sigmoid)
#include "deepis_device.h"

extern "C" __global__ void channel_affine_f32(gptr<float> y, gptr<const float> x, gptr<const float> scale,
                                              gptr<const float> shift, int total, int c, int relu) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    const int ch = i % c;
    float v = x[i] * scale[ch] + shift[ch];
    if (relu && !(v > 0.0f)) v = 0.0f;
    y[i] = v;
}

extern "C" __global__ void relu_f32(gptr<float> y, gptr<const float> x, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    const float v = x[i];
    y[i] = v > 0.0f ? v : 0.0f;
}

extern "C" __global__ void add_f32(gptr<float> y, gptr<const float> a, gptr<const float> b, int total, int relu) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    float v = a[i] + b[i];
    if (relu && !(v > 0.0f)) v = 0.0f;
    y[i] = v;
}

extern "C" __global__ void sigmoid_f32(gptr<float> y, gptr<const float> x, int total) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    y[i] = 1.0f / (1.0f + expf(-x[i]));
}
