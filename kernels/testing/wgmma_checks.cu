// wgmma_checks.cu — test-only kernels for the warpgroup MMA (tests/wgmma.rs): one wgmma (or a chain
// of two along K) of operands the host laid out in shared memory by the PTX ISA canonical layout,
// and planted bugs the emulator must catch. Runs on a GPU too (sm_90a; compiled to a trap
// elsewhere): benches/gpu_check.sh compares it with float64 there.
//
//  wgmma_gemm  one warpgroup (block 128): img (16-bit words) is copied to dynamic shared memory
//              as is: A (64 x K ksteps) at word 0, B (64 x K ksteps) at word b_off, K-major, no
//              swizzle, with the given LBO / SBO (bytes); acc = c (thread-register order, 128 x 32),
//              then for s < ksteps: acc = A_s B_s^T + (s > 0 || scale_d ? acc : 0), where step s
//              starts 2 LBO bytes further along K; out = acc (thread-register order).
//              type 0: f16, 1: bf16 (K = 16), 2: tf32 (K = 8, elements of two words, low first).
//              fault (0: none) plants one bug:
//   1 no wgmma_fence              2 accumulators read before the wait (stored to out)
//   3 accumulator written before the wait     4 shared memory of A written before the wait
//   5 no fence.proxy.async        6 a swizzle mode in A's descriptor (bits 62-63)
//   7 a reserved bit of B's descriptor (bit 46)   8 A's descriptor differs in thread 5
//   9 no wait (the thread exits with the wgmma pending)
//  10 warp 3 of the warpgroup exits before the wgmma
//  11 (tf32) element (0, 0) of A made not a tf32 value (its lowest bit set) in shared memory
// deepis-nvrtc: sm_90a on sm_90 (the wgmma kernels need it; the others compile the same)
#include "deepis_device.h"

#if DEEPIS_HAS_WGMMA
DEEPIS_DEVICE void wgc_mma(float* acc, unsigned long long da, unsigned long long db, int scale_d, int type) {
    if (type == 2) wgmma_m64n64k8_tf32(acc, da, db, scale_d);
    else if (type == 1) wgmma_m64n64k16_bf16(acc, da, db, scale_d);
    else wgmma_m64n64k16_f16(acc, da, db, scale_d);
}

DEEPIS_DEVICE void wgmma_gemm_body(gptr<const unsigned short> img, int img_words, int b_off, int lbo_a, int sbo_a, int lbo_b,
                                   int sbo_b, int ksteps, int type, gptr<const float> c, int scale_d, gptr<float> out, int fault) {
    DEEPIS_DYN_SMEM(unsigned short, smem);
    const int t = (int)threadIdx.x;
    for (int i = t; i < img_words; i += (int)blockDim.x) smem[i] = (unsigned short)(img[i] | (fault == 11 && i == 0 ? 1u : 0u));
    if (fault != 5) fence_proxy_async();
    __syncthreads();
    if (fault == 10 && t >= 96) return;
    float acc[32];
    for (int i = 0; i < 32; ++i) acc[i] = c[t * 32 + i];
    if (fault != 1) wgmma_fence();
    for (int s = 0; s < ksteps; ++s) {
        unsigned long long da = wgmma_desc(smem + s * lbo_a, lbo_a, sbo_a);  // 2 LBO bytes = LBO words
        unsigned long long db = wgmma_desc(smem + b_off + s * lbo_b, lbo_b, sbo_b);
        if (fault == 6) da |= 1ull << 62;
        if (fault == 7) db |= 1ull << 46;
        if (fault == 8 && t == 5) da += 1;
        wgc_mma(acc, da, db, s > 0 || scale_d, type);
    }
    wgmma_commit_group();
    if (fault == 2)
        for (int i = 0; i < 32; ++i) out[t * 32 + i] = acc[i];
    if (fault == 3) acc[7] = 1.0f;
    if (fault == 4 && t == 0) smem[3] = (unsigned short)0x3c00u;
    if (fault == 9) return;
    wgmma_wait_group(0);
    wgmma_fence_acc(acc, 32);
    if (fault != 2)
        for (int i = 0; i < 32; ++i) out[t * 32 + i] = acc[i];
}
#define WGC_BODY wgmma_gemm_body(img, img_words, b_off, lbo_a, sbo_a, lbo_b, sbo_b, ksteps, type, c, scale_d, out, fault)
#else
#define WGC_BODY __trap()  // wgmma needs sm_90a; the tests launch it only there
#endif

extern "C" __global__ void __launch_bounds__(128) wgmma_gemm(gptr<const unsigned short> img, int img_words, int b_off, int lbo_a, int sbo_a,
                                                             int lbo_b, int sbo_b, int ksteps, int type, gptr<const float> c,
                                                             int scale_d, gptr<float> out, int fault) {
    WGC_BODY;
}
