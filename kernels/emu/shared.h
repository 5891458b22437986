// shared.h — shared memory under the emulator (included by emu.h). Every block's shared memory,
// static (`DEEPIS_SHARED`) and dynamic (`DEEPIS_DYN_SMEM`), lives in one per-worker arena that is
// filled with 0xff bytes (NaN in every float type, -1 in every integer) when the block starts, and
// every access goes through a checked reference so that the runtime (emu.cpp) sees it:
//  - an index outside the array fails the launch (static arrays are named in the message);
//  - a read of bytes no thread of the block wrote fails ("read of shared memory nothing wrote");
//  - a read of a cp.async destination before its thread's wait_group fails;
//  - a read of bytes another thread wrote, or a write of bytes another thread read or wrote, with
//    no __syncthreads between them (no __syncwarp either, within one warp) fails: a race.
#pragma once

namespace emu {

// Checks one access of `bytes` bytes at arena address `p` (see the rules above); `p` outside the
// arena (the scratch cell of an out-of-bounds access) is not checked.
void sh_read(const void* p, int bytes);
void sh_write(const void* p, int bytes);
// The arena offset of the static array declared at `key` (allocated, poisoned, on first use in a block).
unsigned char* static_smem(const void* key, long long bytes, const char* name);
// Records an out-of-bounds index of shared memory: `base` is the array's arena address.
void oob_shared(const void* base, long long index, long long len);

template <class T> T* oob_shared_cell(const void* base, long long index, long long len) {
    oob_shared(base, index, len);
    alignas(16) static thread_local unsigned char cell[sizeof(T) < 16 ? 16 : sizeof(T)];
    return reinterpret_cast<T*>(cell);
}

// A reference to one shared element: reads and writes are told apart, so both are checked.
template <class T> struct sref {
    T* p;
    operator T() const {
        sh_read(p, (int)sizeof(T));
        T v;
        std::memcpy(&v, p, sizeof(T));
        return v;
    }
    const sref& operator=(T v) const {
        sh_write(p, (int)sizeof(T));
        std::memcpy(p, &v, sizeof(T));
        return *this;
    }
    const sref& operator=(const sref& o) const { return *this = T(o); }
    template <class U> const sref& operator+=(U v) const { return *this = T(T(*this) + v); }
    template <class U> const sref& operator-=(U v) const { return *this = T(T(*this) - v); }
    template <class U> const sref& operator*=(U v) const { return *this = T(T(*this) * v); }
    template <class U> const sref& operator/=(U v) const { return *this = T(T(*this) / v); }
    template <class U> const sref& operator|=(U v) const { return *this = T(T(*this) | v); }
    template <class U> const sref& operator&=(U v) const { return *this = T(T(*this) & v); }
    T operator++(int) const { T o = *this; *this = T(o + 1); return o; }
    const sref& operator++() const { return *this = T(T(*this) + 1); }
};

}  // namespace emu

// A pointer into shared memory: the array it points into (base, length in elements) and an offset.
template <class T> struct sptr {
    T* base = nullptr;
    long long len = 0;
    long long off = 0;

    sptr() = default;
    sptr(T* b, long long n, long long o = 0) : base(b), len(n), off(o) {}
    template <class U, class = std::enable_if_t<std::is_same<const U, T>::value && !std::is_same<U, T>::value>>
    sptr(const sptr<U>& o) : base(o.base), len(o.len), off(o.off) {}

    emu::sref<T> operator[](long long i) const {
        long long j = off + i;
        if (__builtin_expect((unsigned long long)j >= (unsigned long long)len, 0)) return {emu::oob_shared_cell<T>(base, j, len)};
        return {base + j};
    }
    emu::sref<T> operator*() const { return (*this)[0]; }
    sptr operator+(long long i) const { sptr r = *this; r.off += i; return r; }
    sptr operator-(long long i) const { sptr r = *this; r.off -= i; return r; }
    friend long long operator-(const sptr& a, const sptr& b) { return (a.base + a.off) - (b.base + b.off); }
    sptr& operator+=(long long i) { off += i; return *this; }
    sptr& operator-=(long long i) { off -= i; return *this; }
    // The bytes [p, p + n) as checked by ldmatrix / cp.async: false when outside the array.
    bool covers(long long n_bytes) const {
        long long b = off * (long long)sizeof(T);
        return off >= 0 && b + n_bytes <= len * (long long)sizeof(T);
    }
    const unsigned char* addr() const { return reinterpret_cast<const unsigned char*>(base) + off * (long long)sizeof(T); }
};

namespace emu {
// A static shared array T[N] (DEEPIS_SHARED) or T[N][M] (DEEPIS_SHARED2) placed in the arena.
template <class T, long long N> struct sarr {
    T* base;
    sarr(unsigned char* p) : base(reinterpret_cast<T*>(p)) {}
    sref<T> operator[](long long i) const { return sptr<T>(base, N)[i]; }
    operator sptr<T>() const { return sptr<T>(base, N); }
    sptr<T> operator+(long long i) const { return sptr<T>(base, N, i); }
};
template <class T, long long N, long long M> struct sarr2 {
    T* base;
    sarr2(unsigned char* p) : base(reinterpret_cast<T*>(p)) {}
    // Row i: an out-of-range row is reported with its flat index.
    sptr<T> operator[](long long i) const {
        if (__builtin_expect((unsigned long long)i >= (unsigned long long)N, 0)) {
            oob_shared(base, i * M, N * M);
            return sptr<T>(base, 0);  // every element of it is out of bounds (redirected)
        }
        return sptr<T>(base + i * M, M);
    }
};
template <class T> inline sptr<T> dyn_smem() {
    return sptr<T>(reinterpret_cast<T*>(tl.dyn_smem), (long long)(tl.dyn_smem_bytes / sizeof(T)));
}
}  // namespace emu

#define DEEPIS_SHARED(T, name, n)                  \
    static const char name##_emu_key = 0;          \
    const ::emu::sarr<T, (n)> name(::emu::static_smem(&name##_emu_key, (long long)sizeof(T) * (n), #name))
#define DEEPIS_SHARED2(T, name, n, m)              \
    static const char name##_emu_key = 0;          \
    const ::emu::sarr2<T, (n), (m)> name(::emu::static_smem(&name##_emu_key, (long long)sizeof(T) * (n) * (m), #name))
#define DEEPIS_DYN_SMEM(T, name) ::sptr<T> name = ::emu::dyn_smem<T>()
