// batchnorm.cu — per-channel reductions over (N, D0, D1, D2) and training-mode batch norm.
// Channels-last float32 tensors; sums accumulate in double, as the CPU reference does (a conv bias
// feeding a BN gets a gradient that is 0 in exact arithmetic: float32 sums would leave M * |mean|
// * 6e-8 of it). Double values between kernels live in float buffers of 2 * len, each the raw bits
// of one double (low word, high word), so the launch layer still passes only float buffers.
// Deterministic: every sum has one fixed order (no atomics), whatever order threads run in.
//
// Two-pass channel sums. Pass 1, grid (ceil(C / 32), chunks), block (32, 8), static shared memory
// 2 KiB (4 KiB for two sums): thread (tx, ty) sums rows chunk_start + ty, +8, ... of channel
// 32 * blockIdx.x + tx; the 8 row lanes are added by a fixed tree (4, 2, 1) in shared memory; the
// block writes one double per channel to part[chunk][..]:
//   channel_sum_partial_f32  — sum of x                                 (bias gradient, BN mean)
//   bn_sqdev_partial_f32     — sum of (x - mean)^2, mean = sum / rows    (BN biased variance)
//   bn_backward_partial_f32  — [sum dy | sum dy * xhat], xhat = (x - mean) * invstd
// Pass 2, one thread per value, 1D grid of ceil(len / 256) blocks of 256 threads:
//   sum_partials_f64_f32     — sum over chunks in order; out as doubles (out_double) or floats
// Per channel, one thread each, 1D grid of ceil(C / 256) blocks of 256:
//   bn_stats_f32             — mean, invstd = 1 / sqrt(var + eps), var, and the affine scale/shift
//                              the forward applies with channel_affine_f32 (elementwise.cu)
//   bn_backward_params_f32   — dgamma, dbeta, and the doubles dx needs: mean, gamma * invstd,
//                              sum dy / M, sum dy * xhat / M
// One thread per element, 1D grid of ceil(total / 256) blocks of 256:
//   bn_backward_dx_f32       — dx = gamma * invstd * (dy - sum dy / M - xhat * sum(dy * xhat) / M)
// CPU reference: TrainBackend for CpuBackend (src/train/cpu.rs): conv3d_backward_bias,
// batch_norm_train, batch_norm_backward.
#include "deepis_device.h"

#ifdef DEEPIS_EMU
DEEPIS_DEVICE double bits_to_double(int lo, int hi) {
    const uint64_t b = ((uint64_t)(uint32_t)hi << 32) | (uint64_t)(uint32_t)lo;
    double d;
    std::memcpy(&d, &b, 8);
    return d;
}
DEEPIS_DEVICE int double_lo(double d) {
    uint64_t b;
    std::memcpy(&b, &d, 8);
    return (int)(uint32_t)b;
}
DEEPIS_DEVICE int double_hi(double d) {
    uint64_t b;
    std::memcpy(&b, &d, 8);
    return (int)(uint32_t)(b >> 32);
}
#else
DEEPIS_DEVICE double bits_to_double(int lo, int hi) { return __hiloint2double(hi, lo); }
DEEPIS_DEVICE int double_lo(double d) { return __double2loint(d); }
DEEPIS_DEVICE int double_hi(double d) { return __double2hiint(d); }
#endif

DEEPIS_DEVICE double load_d(gptr<const float> p, int i) {
    return bits_to_double(__float_as_int(p[2 * i]), __float_as_int(p[2 * i + 1]));
}
DEEPIS_DEVICE void store_d(gptr<float> p, int i, double v) {
    p[2 * i] = __int_as_float(double_lo(v));
    p[2 * i + 1] = __int_as_float(double_hi(v));
}

#define RED_X 32  // channels per block
#define RED_Y 8   // row lanes per channel

// Adds the RED_Y row lanes of s[ty][tx] into s[0][tx] by a fixed tree. Every thread calls it.
template <class S> DEEPIS_DEVICE void tree8(S& s, int tx, int ty) {
    for (int st = RED_Y / 2; st > 0; st >>= 1) {
        __syncthreads();
        if (ty < st) s[ty][tx] += s[ty + st][tx];
    }
    __syncthreads();
}

extern "C" __global__ void channel_sum_partial_f32(gptr<float> part, gptr<const float> x, int rows, int c, int chunk_rows) {
    DEEPIS_SHARED2(double, s, RED_Y, RED_X);
    const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
    const int ch = (int)blockIdx.x * RED_X + tx;
    const int r0 = (int)blockIdx.y * chunk_rows;
    const int r1 = min(rows, r0 + chunk_rows);
    double acc = 0.0;
    if (ch < c)
        for (int r = r0 + ty; r < r1; r += RED_Y) acc += (double)x[r * c + ch];
    s[ty][tx] = acc;
    tree8(s, tx, ty);
    if (ty == 0 && ch < c) store_d(part, (int)blockIdx.y * c + ch, s[0][tx]);
}

extern "C" __global__ void bn_sqdev_partial_f32(gptr<float> part, gptr<const float> x, gptr<const float> sum, int rows, int c,
                                                int chunk_rows) {
    DEEPIS_SHARED2(double, s, RED_Y, RED_X);
    const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
    const int ch = (int)blockIdx.x * RED_X + tx;
    const int r0 = (int)blockIdx.y * chunk_rows;
    const int r1 = min(rows, r0 + chunk_rows);
    double acc = 0.0;
    if (ch < c) {
        const double mean = load_d(sum, ch) / (double)rows;
        for (int r = r0 + ty; r < r1; r += RED_Y) {
            const double d = (double)x[r * c + ch] - mean;
            acc += d * d;
        }
    }
    s[ty][tx] = acc;
    tree8(s, tx, ty);
    if (ty == 0 && ch < c) store_d(part, (int)blockIdx.y * c + ch, s[0][tx]);
}

extern "C" __global__ void bn_backward_partial_f32(gptr<float> part, gptr<const float> dy, gptr<const float> x, gptr<const float> sum,
                                                   gptr<const float> invstd, int rows, int c, int chunk_rows) {
    DEEPIS_SHARED2(double, sd, RED_Y, RED_X);
    DEEPIS_SHARED2(double, sx, RED_Y, RED_X);
    const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
    const int ch = (int)blockIdx.x * RED_X + tx;
    const int r0 = (int)blockIdx.y * chunk_rows;
    const int r1 = min(rows, r0 + chunk_rows);
    double ad = 0.0, ax = 0.0;
    if (ch < c) {
        const double mean = load_d(sum, ch) / (double)rows;
        const double is = (double)invstd[ch];
        for (int r = r0 + ty; r < r1; r += RED_Y) {
            const double g = (double)dy[r * c + ch];
            const double xhat = ((double)x[r * c + ch] - mean) * is;
            ad += g;
            ax += g * xhat;
        }
    }
    sd[ty][tx] = ad;
    sx[ty][tx] = ax;
    tree8(sd, tx, ty);
    tree8(sx, tx, ty);
    if (ty == 0 && ch < c) {
        store_d(part, (int)blockIdx.y * 2 * c + ch, sd[0][tx]);
        store_d(part, (int)blockIdx.y * 2 * c + c + ch, sx[0][tx]);
    }
}

extern "C" __global__ void sum_partials_f64_f32(gptr<float> out, gptr<const float> part, int chunks, int len,
                                                int out_double) {
    const int j = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (j >= len) return;
    double s = 0.0;
    for (int k = 0; k < chunks; ++k) s += load_d(part, k * len + j);
    if (out_double) store_d(out, j, s);
    else out[j] = (float)s;
}

extern "C" __global__ void bn_stats_f32(gptr<float> mean, gptr<float> invstd, gptr<float> var, gptr<float> scale,
                                        gptr<float> shift, gptr<const float> sum, gptr<const float> sq, gptr<const float> gamma,
                                        gptr<const float> beta, int rows, int c, float eps_hi, float eps_lo) {
    const int ch = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (ch >= c) return;
    const double m = load_d(sum, ch) / (double)rows;
    const double v = load_d(sq, ch) / (double)rows;
    const double is = 1.0 / sqrt(v + ((double)eps_hi + (double)eps_lo));
    const float sc = (float)(is * (double)gamma[ch]);
    mean[ch] = (float)m;
    invstd[ch] = (float)is;
    var[ch] = (float)v;
    scale[ch] = sc;
    shift[ch] = (float)((double)beta[ch] - m * (double)sc);
}

// coef (doubles, 4 per channel): mean, gamma * invstd, sum dy / M, sum dy * xhat / M.
extern "C" __global__ void bn_backward_params_f32(gptr<float> dgamma, gptr<float> dbeta, gptr<float> coef,
                                                  gptr<const float> sums, gptr<const float> xsum, gptr<const float> gamma,
                                                  gptr<const float> invstd, int rows, int c) {
    const int ch = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (ch >= c) return;
    const double sd = load_d(sums, ch), sx = load_d(sums, c + ch);
    const double m = (double)rows;
    dbeta[ch] = (float)sd;
    dgamma[ch] = (float)sx;
    store_d(coef, 4 * ch, load_d(xsum, ch) / m);
    store_d(coef, 4 * ch + 1, (double)gamma[ch] * (double)invstd[ch]);
    store_d(coef, 4 * ch + 2, sd / m);
    store_d(coef, 4 * ch + 3, sx / m);
}

extern "C" __global__ void bn_backward_dx_f32(gptr<float> dx, gptr<const float> dy, gptr<const float> x, gptr<const float> coef,
                                              gptr<const float> invstd, int total, int c) {
    const int i = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (i >= total) return;
    const int ch = i % c;
    const double xhat = ((double)x[i] - load_d(coef, 4 * ch)) * (double)invstd[ch];
    const double t = (double)dy[i] - load_d(coef, 4 * ch + 2);
    const double u = xhat * load_d(coef, 4 * ch + 3);
    dx[i] = (float)(load_d(coef, 4 * ch + 1) * (t - u));
}
