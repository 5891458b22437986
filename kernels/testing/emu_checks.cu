// emu_checks.cu — test-only kernels for the kernel emulator (tests/emu.rs). Correct kernels show the
// emulator behaves like a GPU (barriers, shared memory, warp collectives, atomics); broken ones show
// its checks fail (a missing barrier, an off-by-one index, a barrier in divergent code).
//
//  emu_block_sum            grid b, block 256: out[b] = sum of x[b*256 .. +256] (tree in __shared__)
//  emu_block_sum_nosync     the same without the barrier inside the tree: a race (Forward != Reverse)
//  emu_warp_sum             block 128: out[warp] = warp sum by __shfl_xor_sync and by __shfl_down_sync
//  emu_warp_scan            block 64: y = inclusive warp scan of x by __shfl_up_sync; y[.] of lane 0
//                           also gets __shfl_sync(.., 31) (the warp total)
//  emu_warp_vote            block 64: out[warp*3 + 0..3] = __ballot_sync, __any_sync, __all_sync of x > 0
//  emu_atomics              any grid: sum += x (float), imax = max(int(x)), count += 1, imin = min
//  emu_dyn_smem_reverse     block n, shmem n*4: y[block tile] = the tile reversed via dynamic shared memory
//  emu_copy_off_by_one      y[i] = x[i] for i <= n: reads x[n] (out of bounds)
//  emu_divergent_barrier    threads >= 16 return before a __syncthreads
//  emu_divergent_shfl       lanes < 16 shuffle with a full mask while lanes >= 16 wait at __syncthreads
//  emu_mismatched_barriers  threads < 32 and threads >= 32 wait at two different __syncthreads
//  emu_sync_count           block n: y[t] = __syncthreads_count(x[t] > 0) (+ 1000 * __syncthreads_or(..))
//  emu_bench_barriers       y[i] = after `rounds` barrier-separated rotations in shared memory
//
// Seen on an H100 (driver 580, sm_90 cubin from NVRTC 12.9): every correct kernel above gives the
// emulator's results; emu_block_sum_nosync gives a wrong sum there too; emu_divergent_barrier
// completes (exited threads count as arrived; CUDA calls it undefined, the emulator rejects it);
// emu_divergent_shfl hangs the GPU (the emulator reports the deadlock).
#include "deepis_device.h"

extern "C" __global__ void emu_block_sum(gptr<const float> x, gptr<float> out, int n) {
    DEEPIS_SHARED(float, s, 256);
    int t = threadIdx.x;
    int i = blockIdx.x * 256 + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int h = 128; h > 0; h >>= 1) {
        if (t < h) s[t] += s[t + h];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void emu_block_sum_nosync(gptr<const float> x, gptr<float> out, int n) {
    DEEPIS_SHARED(float, s, 256);
    int t = threadIdx.x;
    int i = blockIdx.x * 256 + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int h = 128; h > 0; h >>= 1) {
        if (t < h) s[t] += s[t + h];  // BUG (on purpose): no barrier between the levels of the tree
    }
    __syncthreads();
    if (t == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void emu_warp_sum(gptr<const float> x, gptr<float> out_xor, gptr<float> out_down) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i], a = v, b = v;
    for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
    for (int o = 16; o > 0; o >>= 1) b += __shfl_down_sync(0xffffffffu, b, o);
    int warp = i / 32, lane = threadIdx.x % 32;
    if (lane == 7) out_xor[warp] = a;  // every lane holds the sum after the butterfly
    if (lane == 0) out_down[warp] = b;
}

extern "C" __global__ void emu_warp_scan(gptr<const float> x, gptr<float> y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int lane = threadIdx.x % 32;
    float v = x[i];
    for (int o = 1; o < 32; o <<= 1) {
        float u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
    }
    float total = __shfl_sync(0xffffffffu, v, 31);
    y[i] = lane == 0 ? v + 1000.0f * total : v;
}

extern "C" __global__ void emu_warp_vote(gptr<const float> x, gptr<int> out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    bool p = x[i] > 0.0f;
    unsigned b = __ballot_sync(0xffffffffu, p);
    int any = __any_sync(0xffffffffu, p);
    int all = __all_sync(0xffffffffu, p);
    __syncwarp();
    if (threadIdx.x % 32 == 0) {
        int w = i / 32;
        out[w * 3 + 0] = (int)b;
        out[w * 3 + 1] = any;
        out[w * 3 + 2] = all;
    }
}

extern "C" __global__ void emu_atomics(gptr<const float> x, gptr<float> sum, gptr<int> imax, gptr<int> count, gptr<int> imin, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    atomicAdd(&sum[0], v);
    atomicMax(&imax[0], (int)v);
    atomicMin(imin + 0, (int)v);
    atomicAdd(count, 1);
}

extern "C" __global__ void emu_dyn_smem_reverse(gptr<const float> x, gptr<float> y, int n) {
    DEEPIS_DYN_SMEM(float, tile);
    int t = threadIdx.x, nb = blockDim.x;
    int i = blockIdx.x * nb + t;
    tile[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    int j = blockIdx.x * nb + (nb - 1 - t);
    if (j < n) y[j] = tile[t];
}

extern "C" __global__ void emu_copy_off_by_one(gptr<const float> x, gptr<float> y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = x[i];  // BUG (on purpose): i == n is out of bounds
}

extern "C" __global__ void emu_divergent_barrier(gptr<float> y) {
    DEEPIS_SHARED(float, s, 64);
    int t = threadIdx.x;
    if (t >= 16) return;  // BUG (on purpose): the other threads never reach the barrier
    s[t] = (float)t;
    __syncthreads();
    y[t] = s[15 - t];
}

extern "C" __global__ void emu_divergent_shfl(gptr<float> y) {
    int t = threadIdx.x;
    float v = (float)t;
    if (t < 16) v += __shfl_down_sync(0xffffffffu, v, 1);  // BUG (on purpose): lanes 16..31 are not there
    __syncthreads();
    y[t] = v;
}

extern "C" __global__ void emu_mismatched_barriers(gptr<float> y) {
    DEEPIS_SHARED(float, s, 64);
    int t = threadIdx.x;
    s[t] = (float)t;
    if (t < 32) {
        __syncthreads();  // BUG (on purpose): the other half waits at the barrier below
        y[t] = s[63 - t];
    } else {
        __syncthreads();
        y[t] = s[63 - t];
    }
}

extern "C" __global__ void emu_sync_count(gptr<const float> x, gptr<float> y) {
    int t = threadIdx.x;
    bool p = x[t] > 0.0f;
    int c = __syncthreads_count(p);
    int o = __syncthreads_or(p);
    y[t] = (float)c + 1000.0f * (float)o;
}

extern "C" __global__ void emu_bench_barriers(gptr<float> y, int rounds) {
    DEEPIS_SHARED(float, s, 256);
    int t = threadIdx.x;
    float v = (float)(blockIdx.x * blockDim.x + t);
    for (int r = 0; r < rounds; ++r) {
        s[t] = v;
        __syncthreads();
        v = s[(t + 1) % blockDim.x] + 1.0f;
        __syncthreads();
    }
    y[blockIdx.x * blockDim.x + t] = v;
}
