// softmax.cu — softmax over the channels of each voxel (channels-last, so one voxel's channels are
// contiguous). The classifier heads have 3 channels, so one thread per voxel is the right shape.
//   softmax_channels_f32 — one thread per (n, voxel); 1D grid of ceil(N*D0*D1*D2 / 256) blocks of 256
//                      threads, no shared memory. Max-subtracted, float32 sum.
// CPU reference: CpuBackend::softmax.
#include "deepis_device.h"

extern "C" __global__ void softmax_channels_f32(gptr<float> y, gptr<const float> x, int voxels, int c) {
    const int p = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (p >= voxels) return;
    const int base = p * c;
    float m = x[base];
    for (int ch = 1; ch < c; ++ch) m = fmaxf(m, x[base + ch]);
    float s = 0.0f;
    for (int ch = 0; ch < c; ++ch) {
        const float e = expf(x[base + ch] - m);
        y[base + ch] = e;
        s += e;
    }
    for (int ch = 0; ch < c; ++ch) y[base + ch] = y[base + ch] / s;
}
