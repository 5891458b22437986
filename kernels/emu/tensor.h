// tensor.h — the emulator's half of the tensor-core intrinsics of deepis_device.h (included by
// emu.h): exact software fp16/bf16 conversions (round to nearest even) and the tf32 rounding
// (cvt.rna: ties away), and `ldmatrix`, `mma.sync` (m16n8k16 f16/bf16, m16n8k8 tf32)
// and `cp.async` as warp / thread operations of the runtime (emu.cpp):
//  - ldmatrix and mma are warp collectives of all 32 lanes at one source line (a lane that exited,
//    waits elsewhere, or a block whose last warp is partial, fails the launch); the runtime gathers
//    every lane's registers by the PTX ISA fragment layouts, computes, and scatters the results;
//  - ldmatrix row addresses must be 16-byte aligned and their 16 bytes inside the shared array;
//  - cp.async checks the size (4, 8, 16), the alignment of both addresses to it and the bounds of
//    both; its destination reads as poison (and fails the read) until the thread's matching
//    cp_async_wait_group; a thread that exits with copies pending fails the launch;
//  - wgmma (sm_90a, m64nNk16 f16 / bf16, f32 accumulate, both operands K-major in shared memory
//    through 64-bit matrix descriptors, no swizzle): see "wgmma" below.
#pragma once

namespace emu {

inline uint16_t f32_to_f16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;                  // NaN: the canonical NaN, as cvt.rn.f16.f32
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u); // >= 65520 rounds to infinity
    if (ax >= 0x38800000u) {                                // normal in f16
        const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
        return uint16_t(sign | ((r - 0x38000000u) >> 13));
    }
    if (ax <= 0x33000000u) return uint16_t(sign);  // <= 2^-25: rounds to zero (the tie to even)
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u, sh = 126u - e;
    uint32_t r = m >> sh;
    const uint32_t rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 31) x = sign | 0x7f800000u | (m << 13);
    else if (e) x = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m) x = sign;
    else {
        int k = 0;  // normalise the subnormal
        uint32_t mm = m;
        while (!(mm & 0x400u)) { mm <<= 1; ++k; }
        x = sign | (uint32_t(113 - k) << 23) | ((mm & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

inline uint16_t f32_to_bf16_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: the canonical NaN, as cvt.rn.bf16.f32
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) {
    uint32_t x = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// cvt.rna.tf32.f32: the bits of f rounded to a 10-bit mantissa (the low 13 bits zero), to nearest
// with ties away from zero: adding half an ulp to the magnitude's bit pattern and truncating (a
// carry into the exponent is the correct next binade; past the largest tf32 it gives infinity);
// subnormals round the same way. Infinities are kept; a NaN stays a NaN (quieted, its low 13 bits
// dropped: what sm_80's SASS gives for every quiet NaN, where it would turn a signalling NaN
// whose payload lies only in the low 13 bits into an infinity).
inline uint32_t f32_to_tf32_bits(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (x | 0x00400000u) & 0xffffe000u;
    if (ax == 0x7f800000u) return x;
    return (x + 0x1000u) & 0xffffe000u;
}

// ---- warp operations (runtime in emu.cpp) ------------------------------------------------------
struct LdmLane {
    const unsigned char* addr;  // this lane's row address (lanes 0..8*num-1 supply rows)
    long long avail;            // bytes of its shared array from addr on (< 16: out of the array)
    unsigned* out;              // num registers
};
struct MmaLane {
    const unsigned* a;  // 4 registers of f16x2 / bf16x2 (m16n8k16), or of one tf32 each (m16n8k8)
    const unsigned* b;  // 2 registers
    const float* c;     // 4 accumulators
    float* d;           // 4 results (may be c)
};
enum MmaType : int { MMA_F16 = 0, MMA_BF16 = 1, MMA_TF32 = 2 };

void ldmatrix(int line, int num, bool trans, LdmLane* lane);
void mma(int line, int type, MmaLane* lane);

template <class T> inline void ldmatrix_at(int line, int num, bool trans, unsigned* r, sptr<T> p) {
    LdmLane l{p.addr(), p.off < 0 ? -1 : (p.len - p.off) * (long long)sizeof(T), r};
    ldmatrix(line, num, trans, &l);
}
inline void mma_at(int line, int type, float* d, const unsigned* a, const unsigned* b, const float* c) {
    MmaLane l{a, b, c, d};
    mma(line, type, &l);
}

// ---- cp.async (runtime in emu.cpp) -------------------------------------------------------------
// `src` holds the source bytes already read (src_bytes of them, zero-filled to `bytes`); checks of
// the source were made by the caller.
void cp_async_issue(int line, const unsigned char* dst, long long dst_avail, const unsigned char* src, int bytes);
void cp_async_fail(int line, const char* what, int arg, long long byte_off, long long len_bytes, int bytes);
void cp_async_commit(int line);
void cp_async_wait(int line, int n);

template <class D, class S>
inline void cp_async_at(int line, int bytes, sptr<D> dst, gptr<S> src, int src_bytes) {
    alignas(16) unsigned char buf[16] = {0};
    const long long off = src.off * (long long)sizeof(S), len = src.len * (long long)sizeof(S);
    const uintptr_t sa = reinterpret_cast<uintptr_t>(src.base) + (uintptr_t)off;
    if (src_bytes < 0 || src_bytes > bytes) return cp_async_fail(line, "src-size outside 0..cp-size", src.arg, off, len, bytes);
    if (sa % (uintptr_t)bytes) return cp_async_fail(line, "misaligned source address", src.arg, off, len, bytes);
    if (src_bytes > 0) {
        if (off < 0 || off + src_bytes > len) return cp_async_fail(line, "out-of-bounds source", src.arg, off, len, bytes);
        std::memcpy(buf, reinterpret_cast<const unsigned char*>(src.base) + off, (size_t)src_bytes);
    }
    cp_async_issue(line, dst.addr(), dst.off < 0 ? -1 : (dst.len - dst.off) * (long long)sizeof(D), buf, bytes);
}

// ---- wgmma (runtime in emu.cpp) ----------------------------------------------------------------
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} and m64nNk8.f32.tf32.tf32: a collective of the 128 threads of a
// warpgroup (threads 128 q .. 128 q + 127 of the block; the block must be whole warpgroups), all at
// one source line with the same descriptors, N and scale-d. The runtime
//  - decodes both descriptors (PTX ISA "Matrix Descriptor": bits 0-13 start address >> 4, 16-29
//    leading byte offset >> 4, 32-45 stride byte offset >> 4, 49-51 base offset, 62-63 swizzle)
//    and fails the launch on a swizzle or base offset other than 0 (not emulated) or a reserved
//    bit set; the start address is the byte offset in the block's dynamic shared memory;
//  - gathers A (64 x K) and B (N x K; K = 16 halves or 8 tf32) by the canonical K-major
//    no-swizzle layout ((8,m),(T,2)):((1T,SBO),(1,LBO)), T = 16 bytes of elements: element
//    (row r, k) at byte start + 16 (r % 8) + SBO (r / 8) + e (k % T) + LBO (k / T) for e-byte
//    elements; a tf32 element with any of its low 13 bits set fails the launch (a kernel rounds
//    it with tf32_from_f32 first, as for mma.sync); every byte must lie in dynamic
//    shared memory, be written, be ordered before the read (barriers), and its writer must have
//    made a fence.proxy.async since writing it (conservative: any shared write of the writer after
//    its last fence counts);
//  - computes D = A B^T (+ the accumulator when scale-d: its registers, or the pending result of
//    an earlier wgmma of this thread on the same registers) exactly in double, rounded once to f32;
//    D's fragment (PTX ISA / CUTLASS CLayout_64xN): thread 32 w + l of the warpgroup, register i
//    in 0..N/2: row 16 w + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4) + i % 2;
//  - fills the accumulator registers with a NaN poison until the thread's wgmma_wait_group
//    retires the op; then the registers must still hold the poison exactly ("written while in
//    flight"), and, when the last thread retires it, the operands re-gathered from shared memory
//    must equal what the op read ("modified while in flight").
// Every wgmma must follow a wgmma_fence of its thread made since that thread's last wait_group;
// commit_group / wait_group are per thread like cp.async's. A thread that exits with a wgmma
// pending fails the launch.
struct WgLane {
    uint64_t da, db;  // the descriptors of A and B
    float* d;         // N / 2 accumulator registers
    int scale_d;      // 0: D = A B, else D = A B + D
};
enum WgType : int { WG_F16 = 0, WG_BF16 = 1, WG_TF32 = 2 };
void wgmma(int line, int type, int n, WgLane* lane);
void wgmma_fence(int line);
void wgmma_commit(int line);
void wgmma_wait(int line, int n);
void fence_proxy_async(int line);
// The byte offset of `p` in the block's shared memory (what a descriptor's start address encodes).
unsigned smem_offset(const void* p);
inline void wgmma_at(int line, int type, int n, float* d, uint64_t da, uint64_t db, int scale_d) {
    WgLane l{da, db, d, scale_d};
    wgmma(line, type, n, &l);
}

}  // namespace emu
