// emu.h — the host half of deepis_device.h: the CUDA device environment emulated on the CPU, so
// that kernels/*.cu compile with gcc (C++17, -DDEEPIS_EMU) and run under src/gpu/emu.rs.
//
// Model (runtime in emu.cpp):
//  - every CUDA thread is a fiber with its own stack of DEEPIS_EMU_STACK_BYTES (64 KiB, a guard
//    page below it): enough for kernels with small local arrays (a few KiB), not for large ones;
//  - one block runs at a time on an OS thread; blocks of a grid run in parallel on a few OS threads;
//    shared memory (static `DEEPIS_SHARED` arrays and dynamic) lives in a per-worker arena, poisoned
//    (0xff bytes) at block start, and every access is checked (emu/shared.h);
//  - a block's fibers run in the launch's schedule order (Forward 0..n-1 or Reverse n-1..0) until
//    each blocks at a barrier, a warp collective, or exits; barriers and collectives then resolve;
//  - `gptr<T>` is bounds-checked: an out-of-bounds access is recorded (kernel, argument, index,
//    length), redirected to a scratch cell, and fails the launch;
//  - checks that fail a launch: out-of-bounds access, `__syncthreads` not reached by every thread of
//    the block (some exited or wait at another barrier), a warp collective whose mask names a lane
//    that waits at `__syncthreads` (deadlock on a GPU), collectives of different kinds in one mask.
//  - a shuffle that reads a lane outside its mask or an exited lane fails the launch (the GPU gives
//    an undefined value);
//  - tensor-core operations and async copies: emu/tensor.h.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <tuple>
#include <type_traits>
#include <utility>

#define DEEPIS_EMU_STACK_BYTES (64 * 1024)

struct f16;  // deepis_device.h
struct bf16;

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 u) : x(u.x), y(u.y), z(u.z) {}
};
struct int2 { int x, y; };
struct float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace emu {

struct Job;
struct Fiber;

// Per-OS-thread state of the block being run. `thread_idx` is set by the scheduler each time it
// switches into a fiber.
struct Tls {
    uint3 thread_idx;
    uint3 block_idx;
    uint3 block_dim;  // uint3, not dim3: __thread needs a constant initializer
    uint3 grid_dim;
    unsigned char* dyn_smem;
    size_t dyn_smem_bytes;
    unsigned lin;  // linear index of the running thread in its block
    Job* job;
    Fiber* fiber;
};
extern __thread Tls tl;  // __thread: no TLS wrapper call on each threadIdx read

// W_LDMATRIX and later: `.sync.aligned` operations of the whole warp (all 32 lanes, one line);
// W_WGMMA: of the whole warpgroup (128 threads).
enum WarpKind : int { W_SHFL, W_SHFL_UP, W_SHFL_DOWN, W_SHFL_XOR, W_BALLOT, W_ANY, W_ALL, W_SYNCWARP, W_LDMATRIX, W_MMA, W_WGMMA };
enum BarKind : int { B_SYNC, B_COUNT, B_AND, B_OR };

int syncthreads(int line, int kind, int pred);
uint64_t warp_op(int line, int kind, unsigned mask, uint64_t val, int arg, int width);
unsigned activemask();
// Records an out-of-bounds access of argument `arg` (-1: dynamic shared memory).
void oob(int arg, long long index, long long len);

template <class T> T* oob_cell(int arg, long long index, long long len) {
    oob(arg, index, len);
    alignas(16) static thread_local unsigned char cell[sizeof(T) < 16 ? 16 : sizeof(T)];
    return reinterpret_cast<T*>(cell);
}

template <class T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp collectives take values of at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace emu

// A bounds-checked device pointer: base and length of the buffer, an offset, the argument index.
template <class T> struct gptr {
    T* base = nullptr;
    long long len = 0;
    long long off = 0;
    int arg = -1;

    gptr() = default;
    gptr(T* b, long long n, int a, long long o = 0) : base(b), len(n), off(o), arg(a) {}
    template <class U, class = std::enable_if_t<std::is_same<const U, T>::value && !std::is_same<U, T>::value>>
    gptr(const gptr<U>& o) : base(o.base), len(o.len), off(o.off), arg(o.arg) {}

    T& operator[](long long i) const {
        long long j = off + i;
        if (__builtin_expect((unsigned long long)j >= (unsigned long long)len, 0)) return *emu::oob_cell<T>(arg, j, len);
        return base[j];
    }
    T& operator*() const { return (*this)[0]; }
    T* operator->() const { return &(*this)[0]; }
    gptr operator+(long long i) const { gptr r = *this; r.off += i; return r; }
    gptr operator-(long long i) const { gptr r = *this; r.off -= i; return r; }
    friend gptr operator+(long long i, const gptr& p) { return p + i; }
    friend long long operator-(const gptr& a, const gptr& b) { return (a.base + a.off) - (b.base + b.off); }
    gptr& operator+=(long long i) { off += i; return *this; }
    gptr& operator-=(long long i) { off -= i; return *this; }
    gptr& operator++() { ++off; return *this; }
    gptr& operator--() { --off; return *this; }
    gptr operator++(int) { gptr r = *this; ++off; return r; }
    gptr operator--(int) { gptr r = *this; --off; return r; }
    friend bool operator==(const gptr& a, const gptr& b) { return a.base + a.off == b.base + b.off; }
    friend bool operator!=(const gptr& a, const gptr& b) { return !(a == b); }
    friend bool operator<(const gptr& a, const gptr& b) { return a.base + a.off < b.base + b.off; }
};

#include "shared.h"
#include "tensor.h"

// ---- CUDA keywords ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __grid_constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared arrays are DEEPIS_SHARED / DEEPIS_SHARED2, so that the emulator can check them.
#define __shared__ static_assert(false, "deepis emulator: declare static shared arrays with DEEPIS_SHARED(T, name, n)");
#define DEEPIS_DEVICE inline

#define threadIdx (::emu::tl.thread_idx)
#define blockIdx (::emu::tl.block_idx)
#define blockDim (::emu::tl.block_dim)
#define gridDim (::emu::tl.grid_dim)
static constexpr int warpSize = 32;

// ---- barriers and warp collectives -----------------------------------------------------------
#define __syncthreads() ((void)::emu::syncthreads(__LINE__, ::emu::B_SYNC, 0))
#define __syncthreads_count(p) ::emu::syncthreads(__LINE__, ::emu::B_COUNT, (p) ? 1 : 0)
#define __syncthreads_and(p) ::emu::syncthreads(__LINE__, ::emu::B_AND, (p) ? 1 : 0)
#define __syncthreads_or(p) ::emu::syncthreads(__LINE__, ::emu::B_OR, (p) ? 1 : 0)

namespace emu {
template <class T> inline T shfl(int line, int kind, unsigned mask, T v, int arg, int width = 32) {
    return from_bits<T>(warp_op(line, kind, mask, to_bits(v), arg, width));
}
}  // namespace emu
#define __shfl_sync(...) ::emu::shfl(__LINE__, ::emu::W_SHFL, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl(__LINE__, ::emu::W_SHFL_UP, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl(__LINE__, ::emu::W_SHFL_DOWN, __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl(__LINE__, ::emu::W_SHFL_XOR, __VA_ARGS__)
#define __ballot_sync(mask, p) ((unsigned)::emu::warp_op(__LINE__, ::emu::W_BALLOT, (mask), (p) ? 1 : 0, 0, 32))
#define __any_sync(mask, p) ((int)::emu::warp_op(__LINE__, ::emu::W_ANY, (mask), (p) ? 1 : 0, 0, 32))
#define __all_sync(mask, p) ((int)::emu::warp_op(__LINE__, ::emu::W_ALL, (mask), (p) ? 1 : 0, 0, 32))
#define __syncwarp(...) ((void)::emu::warp_op(__LINE__, ::emu::W_SYNCWARP, ::emu::syncwarp_mask(__VA_ARGS__), 0, 0, 32))
#define __activemask() ::emu::activemask()
namespace emu {
inline unsigned syncwarp_mask(unsigned m = 0xffffffffu) { return m; }
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics: real atomics, blocks run on several OS threads ---------------------------------
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* a, float v) {
    uint32_t* p = reinterpret_cast<uint32_t*>(a);
    uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED), nw;
    do {
        float f;
        std::memcpy(&f, &old, 4);
        f += v;
        std::memcpy(&nw, &f, 4);
    } while (!__atomic_compare_exchange_n(p, &old, nw, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    float r;
    std::memcpy(&r, &old, 4);
    return r;
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
template <class T> inline T emu_atomic_max(T* a, T v) {
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
template <class T> inline T emu_atomic_min(T* a, T v) {
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
inline int atomicMax(int* a, int v) { return emu_atomic_max(a, v); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return emu_atomic_max(a, v); }
inline int atomicMin(int* a, int v) { return emu_atomic_min(a, v); }
inline unsigned atomicMin(unsigned* a, unsigned v) { return emu_atomic_min(a, v); }
template <class T> inline T emu_atomic_cas(T* a, T cmp, T v) {
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline int atomicCAS(int* a, int c, int v) { return emu_atomic_cas(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return emu_atomic_cas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) { return emu_atomic_cas(a, c, v); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* a, float v) {
    uint32_t b = emu::from_bits<uint32_t>(emu::to_bits(v));
    return emu::from_bits<float>(__atomic_exchange_n(reinterpret_cast<uint32_t*>(a), b, __ATOMIC_RELAXED));
}
inline int atomicAnd(int* a, int v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }
inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline int atomicXor(int* a, int v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }
// The same on a gptr (`atomicAdd(out + i, v)`): bounds-checked at the element.
template <class T, class V> inline T atomicAdd(gptr<T> p, V v) { return atomicAdd(&*p, (T)v); }
template <class T, class V> inline T atomicSub(gptr<T> p, V v) { return atomicSub(&*p, (T)v); }
template <class T, class V> inline T atomicMax(gptr<T> p, V v) { return atomicMax(&*p, (T)v); }
template <class T, class V> inline T atomicMin(gptr<T> p, V v) { return atomicMin(&*p, (T)v); }
template <class T, class V> inline T atomicExch(gptr<T> p, V v) { return atomicExch(&*p, (T)v); }
template <class T, class C, class V> inline T atomicCAS(gptr<T> p, C c, V v) { return atomicCAS(&*p, (T)c, (T)v); }

// ---- math and bit intrinsics -----------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int i) { return emu::from_bits<float>(emu::to_bits(i)); }
inline int __float_as_int(float f) { return emu::from_bits<int>(emu::to_bits(f)); }
inline unsigned __float_as_uint(float f) { return emu::from_bits<unsigned>(emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return emu::from_bits<float>(emu::to_bits(u)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline std::remove_const_t<T> __ldg(gptr<T> p) { return *p; }

// ---- launch glue used by the code build.rs generates -----------------------------------------
extern "C" {
struct EmuLaunch {
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t shmem;
    int32_t schedule;  // 0 Forward, 1 Reverse
    int32_t threads;   // OS threads; 0: default
    char* err;         // error message out (NUL-terminated), err_cap bytes
    uint32_t err_cap;
};
struct EmuBufArg {
    void* ptr;
    uint64_t bytes;
};
}

namespace emu {
// Runs the grid; `body(ctx)` runs one CUDA thread. Returns 0, or 1 with the message in L->err.
int run_grid(const EmuLaunch* L, const char* kernel, void (*body)(void*), void* ctx);

template <class P> struct Arg;  // a kernel parameter type outside gptr<T>/int/float has no Arg
// A buffer's element kind: 'H' f16, 'G' bf16, 'U' any 16-bit word, 'B' 32-bit and others;
// lower case for a const element. src/gpu/emu.rs matches them against the buffers' dtypes.
template <class T> constexpr char elem_sig() {
    using U = std::remove_const_t<T>;
    char c = std::is_same<U, f16>::value ? 'H' : std::is_same<U, bf16>::value ? 'G' : sizeof(U) == 2 ? 'U' : 'B';
    return std::is_const<T>::value ? char(c + 32) : c;
}
template <class T> struct Arg<gptr<T>> {
    static constexpr char sig = elem_sig<T>();
    static gptr<T> get(void* a, int index) {
        auto* d = static_cast<EmuBufArg*>(a);
        return gptr<T>(static_cast<T*>(d->ptr), (long long)(d->bytes / sizeof(T)), index);
    }
};
template <> struct Arg<int> {
    static constexpr char sig = 'i';
    static int get(void* a, int) { return *static_cast<int*>(a); }
};
template <> struct Arg<float> {
    static constexpr char sig = 'f';
    static float get(void* a, int) { return *static_cast<float*>(a); }
};

template <class... P> struct Bound {
    void (*k)(P...);
    std::tuple<P...> args;
    static void run(void* self) {
        auto* b = static_cast<Bound*>(self);
        std::apply(b->k, b->args);
    }
};
template <class... P, size_t... I>
int launch_impl(const EmuLaunch* L, void** a, const char* name, void (*k)(P...), std::index_sequence<I...>) {
    Bound<P...> b{k, std::tuple<P...>(Arg<P>::get(a[I], (int)I)...)};
    return run_grid(L, name, &Bound<P...>::run, &b);
}
template <class... P> int launch(const EmuLaunch* L, void** a, const char* name, void (*k)(P...)) {
    return launch_impl(L, a, name, k, std::index_sequence_for<P...>{});
}
// The parameter kinds: 'B' gptr<T>, 'b' gptr<const T>, 'i' int, 'f' float.
template <class... P> const char* signature(void (*)(P...)) {
    static const char s[] = {Arg<P>::sig..., '\0'};
    return s;
}
}  // namespace emu
