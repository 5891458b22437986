// deepis_device.h — the one header every kernel includes. It gives kernels the device intrinsics
// they may use, with a real implementation under NVRTC and an emulated one on the host
// (DEEPIS_EMU, see emu/emu.h), so the same .cu source runs on a GPU and under the emulator.
//
// Kernel-side rules:
//  - kernels are `extern "C" __global__ void name(...)`;
//  - device-buffer parameters are `gptr<T>` (a raw pointer under NVRTC, a bounds-checked pointer
//    under the emulator), used only through [] , + , - and unary *;
//  - scalars are `int` / `float` (no structs), so the Rust launch code passes the same list everywhere;
//  - dynamic shared memory: `DEEPIS_DYN_SMEM(float, name);`  static shared: `DEEPIS_SHARED(T, a, N);`
//    or `DEEPIS_SHARED2(T, a, N, M);` (never bare `__shared__`: the emulator checks these);
//    a pointer into shared memory is `sptr<T>` (`sptr<f16> p = a + i;`);
//  - half types `f16`, `bf16`: 16-bit words (`.bits`), converted with `f16_from_f32`, `f16_to_f32`,
//    `bf16_from_f32`, `bf16_to_f32` (round to nearest even), packed two to a register by `pack2`;
//  - tensor cores (sm_80+), warp-wide, all 32 lanes at one line: `ldmatrix_x1/x2/x4(r, p)` and
//    `ldmatrix_x1/x2/x4_trans(r, p)` (r: unsigned[num], p: sptr to this lane's 16-byte row),
//    `mma_16816_f16(d, a, b, c)` / `mma_16816_bf16(d, a, b, c)` (m16n8k16 row.col, f32 accumulate;
//    d, c: float[4], a: unsigned[4], b: unsigned[2]; PTX ISA fragment layouts);
//    `mma_1688_tf32(d, a, b, c)` (m16n8k8 row.col .tf32, f32 accumulate; a: 4 registers, one tf32
//    each, b: 2; every operand must already be a tf32 value: the emulator fails the launch on one
//    with any of its low 13 bits set), `tf32_from_f32(x)` (cvt.rna.tf32.f32: the bits of x rounded
//    to 10 mantissa bits, to nearest, ties away from zero; infinities kept, a NaN stays a NaN);
//  - async copies: `cp_async4/8/16(dst sptr, src gptr, src_bytes)` (src_bytes 0 zero-fills),
//    `cp_async_commit_group()`, `cp_async_wait_group(N)` (N a constant);
//  - warpgroup MMA (sm_90a; `DEEPIS_HAS_WGMMA` is 1 where it exists: under NVRTC for sm_90a, and on
//    the emulator): `wgmma_desc(p, lbo, sbo)` (the 64-bit descriptor of a K-major, no-swizzle
//    operand at sptr p, LBO / SBO in bytes, multiples of 16), `wgmma_m64n64k16_f16(d, da, db,
//    scale_d)` / `wgmma_m64n64k16_bf16` / `wgmma_m64n64k8_tf32` (all 128 threads of the
//    warpgroup; d: float[32], the CLayout_64x64 fragment; D = A B^T + (scale_d ? D : 0); tf32
//    operands must be tf32 values in shared memory: the emulator fails the launch on any other), `wgmma_fence()` before the wgmmas of a
//    batch, `wgmma_commit_group()`, `wgmma_wait_group(N)` (N a constant), then
//    `wgmma_fence_acc(d, n)` before reading the n accumulators (it keeps the compiler from moving
//    their reads above the wait), and `fence_proxy_async()` between a thread's shared-memory writes
//    (plain or cp.async, after its wait) and the barrier before a wgmma reads them;
//  - barriers `__syncthreads()`, warp shuffles `__shfl_xor_sync / __shfl_down_sync / __shfl_sync`,
//    `atomicAdd`, `atomicMax` on int, math `expf fmaxf fminf floorf sqrtf rsqrtf fmaf`.
// Also available on both sides (the emulator, emu/emu.h, implements exactly these):
//  - `__restrict__`, `__launch_bounds__(..)`, `__forceinline__`, `__ldg(p)`, `warpSize`, `dim3`;
//  - `__syncthreads_count/_and/_or(p)`, `__syncwarp(mask)`, `__shfl_up_sync`, `__ballot_sync`,
//    `__any_sync`, `__all_sync`, `__activemask()`; atomics `atomicAdd` (int, unsigned, float),
//    `atomicSub`, `atomicMax/Min` (int, unsigned), `atomicCAS`, `atomicExch`, `atomicAnd/Or/Xor` (int);
//  - math `expf logf ceilf fabsf fminf ... __expf __logf __fdividef __saturatef`, `min`/`max` on
//    int, unsigned and float, `__float_as_int` and friends, `__popc __clz __ffs`.
// Emulator rules (the emulator checks what a GPU does not; see emu/emu.h):
//  - `DEEPIS_DYN_SMEM` goes inside a function body; its name is a `gptr<T>` under the emulator
//    (bounds-checked against the launch's shmem bytes): index it or offset it (`gptr<float> b =
//    smem + n;`), never convert it or a `gptr` to `T*` (take `&p[i]` only to pass to an atomic);
//  - shared memory (static and dynamic) is per block, filled with 0xff (NaN) at block start, and
//    every access is checked: bounds, reads of bytes nothing wrote, cp.async destinations read
//    before their wait, and races (see emu/shared.h); elements are read and written whole (no
//    `.x` member access through a shared reference);
//  - every thread is a fiber with a 64 KiB stack: local arrays up to a few KiB per thread;
//  - warp-synchronous code uses the `_sync` collectives or `__syncwarp`: lanes do not run in lockstep;
//    a collective that reads a lane outside its mask (or an exited lane) gets NaN / -1;
//  - every `__syncthreads` must be reached by all threads of the block (no barrier after an early
//    `return` of some threads); a race shows as a difference between the Forward and Reverse schedules;
//  - no inline PTX, CUDA headers or `extern __shared__` outside an `#ifdef DEEPIS_EMU` alternative.
#pragma once

// fp16 and bf16 as 16-bit words: no cuda_fp16.h (NVRTC has none), the same layout on both sides.
struct f16 {
    unsigned short bits;
};
struct bf16 {
    unsigned short bits;
};

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
// ---- real device ------------------------------------------------------------------------------
template <class T> using gptr = T*;
template <class T> using sptr = T*;
#define DEEPIS_DYN_SMEM(T, name) extern __shared__ __align__(16) T name[]  // 16: cp.async, ldmatrix
#define DEEPIS_SHARED(T, name, n) __shared__ T name[n]
#define DEEPIS_SHARED2(T, name, n, m) __shared__ T name[n][m]
#define DEEPIS_DEVICE __device__ __forceinline__

DEEPIS_DEVICE f16 f16_from_f32(float x) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
DEEPIS_DEVICE float f16_to_f32(f16 h) {
    float x;
    asm("cvt.f32.f16 %0, %1;" : "=f"(x) : "h"(h.bits));
    return x;
}
DEEPIS_DEVICE bf16 bf16_from_f32(float x) {
    bf16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
DEEPIS_DEVICE float bf16_to_f32(bf16 h) { return __uint_as_float((unsigned)h.bits << 16); }

DEEPIS_DEVICE unsigned deepis_smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
template <class T> DEEPIS_DEVICE void ldmatrix_x1(unsigned* r, const T* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(deepis_smem_addr(p)));
}
template <class T> DEEPIS_DEVICE void ldmatrix_x2(unsigned* r, const T* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(deepis_smem_addr(p)));
}
template <class T> DEEPIS_DEVICE void ldmatrix_x4(unsigned* r, const T* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(deepis_smem_addr(p)));
}
template <class T> DEEPIS_DEVICE void ldmatrix_x1_trans(unsigned* r, const T* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(deepis_smem_addr(p)));
}
template <class T> DEEPIS_DEVICE void ldmatrix_x2_trans(unsigned* r, const T* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(deepis_smem_addr(p)));
}
template <class T> DEEPIS_DEVICE void ldmatrix_x4_trans(unsigned* r, const T* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(deepis_smem_addr(p)));
}
DEEPIS_DEVICE void mma_16816_f16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
DEEPIS_DEVICE void mma_16816_bf16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
DEEPIS_DEVICE void mma_1688_tf32(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
DEEPIS_DEVICE unsigned tf32_from_f32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
template <int N, class T, class S> DEEPIS_DEVICE void deepis_cp_async(T* dst, const S* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(deepis_smem_addr(dst)), "l"(src), "n"(N), "r"(src_bytes) : "memory");
}
#define cp_async4(dst, src, n) deepis_cp_async<4>((dst), (src), (n))
#define cp_async8(dst, src, n) deepis_cp_async<8>((dst), (src), (n))
#define cp_async16(dst, src, n) deepis_cp_async<16>((dst), (src), (n))
#define cp_async_commit_group() asm volatile("cp.async.commit_group;" ::: "memory")
#define cp_async_wait_group(n) asm volatile("cp.async.wait_group %0;" ::"n"(n) : "memory")
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DEEPIS_HAS_WGMMA 1
DEEPIS_DEVICE unsigned deepis_smem_offset(const void* p) { return deepis_smem_addr(p); }
#define wgmma_fence() asm volatile("wgmma.fence.sync.aligned;" ::: "memory")
#define wgmma_commit_group() asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory")
#define wgmma_wait_group(n) asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(n) : "memory")
#define fence_proxy_async() asm volatile("fence.proxy.async.shared::cta;" ::: "memory")
DEEPIS_DEVICE void wgmma_fence_acc(float* d, int n) {
#pragma unroll
    for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#define DEEPIS_WGMMA_64(TYPE)                                                                                        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                     \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                                                              \
                 : "l"(da), "l"(db), "r"(scale_d))
DEEPIS_DEVICE void wgmma_m64n64k16_f16(float* d, unsigned long long da, unsigned long long db, int scale_d) { DEEPIS_WGMMA_64("f16"); }
DEEPIS_DEVICE void wgmma_m64n64k16_bf16(float* d, unsigned long long da, unsigned long long db, int scale_d) { DEEPIS_WGMMA_64("bf16"); }
// tf32: K = 8, no transpose immediates (tf32 operands are K-major only)
DEEPIS_DEVICE void wgmma_m64n64k8_tf32(float* d, unsigned long long da, unsigned long long db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(da), "l"(db), "r"(scale_d));
}
#else
#define DEEPIS_HAS_WGMMA 0
#endif
#else
// ---- host emulator ----------------------------------------------------------------------------
#include "emu/emu.h"

DEEPIS_DEVICE f16 f16_from_f32(float x) { return f16{::emu::f32_to_f16_bits(x)}; }
DEEPIS_DEVICE float f16_to_f32(f16 h) { return ::emu::f16_bits_to_f32(h.bits); }
DEEPIS_DEVICE bf16 bf16_from_f32(float x) { return bf16{::emu::f32_to_bf16_bits(x)}; }
DEEPIS_DEVICE float bf16_to_f32(bf16 h) { return ::emu::bf16_bits_to_f32(h.bits); }

#define ldmatrix_x1(r, p) ::emu::ldmatrix_at(__LINE__, 1, false, (r), (p))
#define ldmatrix_x2(r, p) ::emu::ldmatrix_at(__LINE__, 2, false, (r), (p))
#define ldmatrix_x4(r, p) ::emu::ldmatrix_at(__LINE__, 4, false, (r), (p))
#define ldmatrix_x1_trans(r, p) ::emu::ldmatrix_at(__LINE__, 1, true, (r), (p))
#define ldmatrix_x2_trans(r, p) ::emu::ldmatrix_at(__LINE__, 2, true, (r), (p))
#define ldmatrix_x4_trans(r, p) ::emu::ldmatrix_at(__LINE__, 4, true, (r), (p))
#define mma_16816_f16(d, a, b, c) ::emu::mma_at(__LINE__, ::emu::MMA_F16, (d), (a), (b), (c))
#define mma_16816_bf16(d, a, b, c) ::emu::mma_at(__LINE__, ::emu::MMA_BF16, (d), (a), (b), (c))
#define mma_1688_tf32(d, a, b, c) ::emu::mma_at(__LINE__, ::emu::MMA_TF32, (d), (a), (b), (c))
DEEPIS_DEVICE unsigned tf32_from_f32(float x) { return ::emu::f32_to_tf32_bits(x); }
#define cp_async4(dst, src, n) ::emu::cp_async_at(__LINE__, 4, (dst), (src), (n))
#define cp_async8(dst, src, n) ::emu::cp_async_at(__LINE__, 8, (dst), (src), (n))
#define cp_async16(dst, src, n) ::emu::cp_async_at(__LINE__, 16, (dst), (src), (n))
#define cp_async_commit_group() ::emu::cp_async_commit(__LINE__)
#define cp_async_wait_group(n) ::emu::cp_async_wait(__LINE__, (n))
#define DEEPIS_HAS_WGMMA 1
DEEPIS_DEVICE unsigned deepis_smem_offset(const void* p) { return ::emu::smem_offset(p); }
#define wgmma_fence() ::emu::wgmma_fence(__LINE__)
#define wgmma_commit_group() ::emu::wgmma_commit(__LINE__)
#define wgmma_wait_group(n) ::emu::wgmma_wait(__LINE__, (n))
#define fence_proxy_async() ::emu::fence_proxy_async(__LINE__)
DEEPIS_DEVICE void wgmma_fence_acc(float*, int) {}
#define wgmma_m64n64k16_f16(d, da, db, s) ::emu::wgmma_at(__LINE__, ::emu::WG_F16, 64, (d), (da), (db), (s))
#define wgmma_m64n64k16_bf16(d, da, db, s) ::emu::wgmma_at(__LINE__, ::emu::WG_BF16, 64, (d), (da), (db), (s))
#define wgmma_m64n64k8_tf32(d, da, db, s) ::emu::wgmma_at(__LINE__, ::emu::WG_TF32, 64, (d), (da), (db), (s))
#endif

#if DEEPIS_HAS_WGMMA
// The descriptor of a K-major, no-swizzle wgmma operand at p (PTX ISA "Matrix Descriptor"): start
// address >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45; base offset and swizzle 0.
template <class P> DEEPIS_DEVICE unsigned long long wgmma_desc(P p, int lbo, int sbo) {
#if defined(DEEPIS_EMU)
    const unsigned a = deepis_smem_offset(p.addr());
#else
    const unsigned a = deepis_smem_offset(p);
#endif
    return (unsigned long long)((a >> 4) & 0x3fffu) | ((unsigned long long)((lbo >> 4) & 0x3fff) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3fff) << 32);
}
#endif

// One element in the type of the second argument (a value of that type picks the overload):
// f32 -> f16 / bf16 rounded to nearest even, f16 / bf16 -> f32 exact, f32 -> f32 unchanged. Kernels
// templated over their storage type read and write through it and compute in f32.
DEEPIS_DEVICE f16 half_cast(float v, f16) { return f16_from_f32(v); }
DEEPIS_DEVICE bf16 half_cast(float v, bf16) { return bf16_from_f32(v); }
DEEPIS_DEVICE float half_cast(float v, float) { return v; }
DEEPIS_DEVICE float half_cast(f16 v, float) { return f16_to_f32(v); }
DEEPIS_DEVICE float half_cast(bf16 v, float) { return bf16_to_f32(v); }

// Two halves in one 32-bit register: `lo` in bits 0..15 (the lower-index element of a fragment).
template <class H> DEEPIS_DEVICE unsigned pack2(H lo, H hi) { return (unsigned)lo.bits | ((unsigned)hi.bits << 16); }
