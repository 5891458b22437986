// emu.cpp — the runtime of the kernel emulator (see emu.h): fibers, the block scheduler, barriers,
// warp collectives, checked shared memory (emu/shared.h), tensor-core operations and async copies
// (emu/tensor.h), the OS-thread pool that runs blocks in parallel, and error reporting.
// The system headers come first: emu.h defines CUDA keywords (__noinline__) they use.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "emu.h"

namespace emu {

__thread Tls tl;

static const int kMaxThreads = 1024;
static const size_t kMaxSmem = 227 * 1024;  // dynamic + static, per block (H100)
static const size_t kMaxStaticSmem = 48 * 1024;
static const size_t kArena = kMaxSmem + kMaxStaticSmem + 64;
static const size_t kGuard = 4096;
static const size_t kSlot = DEEPIS_EMU_STACK_BYTES + kGuard;

// ---- context switch ----------------------------------------------------------------------------
// x86-64: a hand-written switch of the callee-saved registers (swapcontext also saves the signal
// mask with a syscall, ~20x slower). Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void deepis_emu_switch(void** save_sp, void* to_sp);
extern "C" void deepis_emu_trampoline();
asm(R"(
    .text
    .globl deepis_emu_switch
    .hidden deepis_emu_switch
    .type deepis_emu_switch,@function
deepis_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size deepis_emu_switch, .-deepis_emu_switch
    .globl deepis_emu_trampoline
    .hidden deepis_emu_trampoline
    .type deepis_emu_trampoline,@function
deepis_emu_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size deepis_emu_trampoline, .-deepis_emu_trampoline
)");
struct Ctx {
    void* sp = nullptr;
};
static inline void ctx_switch(Ctx* from, Ctx* to) { deepis_emu_switch(&from->sp, to->sp); }
static void ctx_make(Ctx* c, char* stack_lo, size_t size, void (*fn)(void*), void* arg) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size - 16) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top) - 7;  // r15 r14 r13 r12 rbx rbp ret
    sp[0] = sp[1] = nullptr;
    sp[2] = reinterpret_cast<void*>(fn);  // r13
    sp[3] = arg;                          // r12
    sp[4] = sp[5] = nullptr;
    sp[6] = reinterpret_cast<void*>(&deepis_emu_trampoline);
    c->sp = sp;
}
#else
struct Ctx {
    ucontext_t uc;
};
static inline void ctx_switch(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }
static void (*g_uc_fn)(void*);
static void uc_entry(unsigned lo, unsigned hi) {
    void* arg = reinterpret_cast<void*>((uintptr_t(hi) << 32) | lo);
    g_uc_fn(arg);
}
static void ctx_make(Ctx* c, char* stack_lo, size_t size, void (*fn)(void*), void* arg) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack_lo;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    g_uc_fn = fn;
    uintptr_t a = reinterpret_cast<uintptr_t>(arg);
    makecontext(&c->uc, reinterpret_cast<void (*)()>(uc_entry), 2, unsigned(a), unsigned(a >> 32));
}
#endif

// ---- launch state ------------------------------------------------------------------------------
struct Job {
    const EmuLaunch* L;
    const char* kernel;
    void (*body)(void*);
    void* ctx;
    unsigned nthreads;
    unsigned long long nblocks;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::atomic<long long> nerrors{0};
    std::mutex mu;
    std::string first;
};

static void record(Job* J, const std::string& msg) {
    J->nerrors.fetch_add(1);
    std::lock_guard<std::mutex> g(J->mu);
    if (J->first.empty()) J->first = msg;
    J->failed.store(true);
}

static std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

static std::string where() {
    return fmt("block (%u,%u,%u) thread (%u,%u,%u)", tl.block_idx.x, tl.block_idx.y, tl.block_idx.z,
               tl.thread_idx.x, tl.thread_idx.y, tl.thread_idx.z);
}

void oob(int arg, long long index, long long len) {
    std::string what = arg < 0 ? std::string("dynamic shared memory") : fmt("argument %d", arg);
    record(tl.job, fmt("out-of-bounds access: %s index %lld, length %lld, at %s", what.c_str(), index, len,
                       where().c_str()));
}

// ---- fibers and the block scheduler ------------------------------------------------------------
enum State : uint8_t { RUN, BAR, WARP, DONE };

// One cp.async in flight: the bytes it will write (read from the source when issued).
struct Copy {
    unsigned char* dst;
    int bytes, line;
    alignas(16) unsigned char data[16];
};

// One thread's part of a wgmma in flight: its registers, the result they get when it retires,
// and the op (Worker::wgops) whose operands it read.
struct WgPending {
    float* d;
    int line;
    size_t op;
    std::vector<float> res;
};

struct Fiber {
    Ctx ctx;
    uint3 tid;
    State st;
    int kind;  // BarKind or WarpKind
    int line;
    unsigned mask;
    int arg, width;
    uint64_t val, res;  // for W_LDMATRIX / W_MMA, val points to the lane's LdmLane / MmaLane
    std::vector<Copy> copies;         // issued, not yet completed, oldest first
    std::vector<size_t> group_ends;   // committed groups: end index in `copies`
    std::vector<WgPending> wg;        // wgmma issued, not yet retired, oldest first
    std::vector<size_t> wg_group_ends;  // committed wgmma groups: end index in `wg`
    bool wg_fenced;    // a wgmma_fence since the last wgmma_wait_group
    bool proxy_dirty;  // wrote shared memory since its last fence.proxy.async
};

static const char* warp_name(int k) {
    static const char* n[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                              "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp", "ldmatrix", "mma.sync", "wgmma.mma_async"};
    return n[k];
}

// Shadow state of 2 bytes of shared memory. Threads are stored as linear index + 1 (0: none).
struct Sh {
    uint32_t w_b, w_w;  // barrier counts (block, warp) when written
    uint32_t r_b, r_w;  // ... when last read
    uint16_t w_t, r_t;  // writer, last reader (kManyReaders: two unordered readers)
    uint8_t st;         // kUnwritten, kWritten, kPending (a cp.async of thread w_t in flight)
};
static const uint16_t kManyReaders = 0xffff;
enum : uint8_t { kUnwritten = 0, kWritten = 1, kPending = 2 };

// A wgmma of one warpgroup: its descriptors and the operand bits it read, for the check at retirement.
struct WgOp {
    int line, type, n;
    uint64_t da, db;
    unsigned first;  // linear index of the warpgroup's first thread
    int pending;     // threads that have not retired it
    std::vector<uint32_t> a, b;  // raw element bits (16 or 32 of them)
};

// A static shared array of the running block.
struct StaticArr {
    const void* key;
    size_t off, bytes;
    const char* name;
};

struct Worker {
    char* stacks = nullptr;
    int guarded = 0;  // stacks whose guard page is set
    Fiber fibers[kMaxThreads];
    Ctx sched;
    unsigned char* smem = nullptr;  // the shared-memory arena: dynamic at 0, static arrays after
    Sh* shadow = nullptr;           // one entry per 2 bytes of the arena
    size_t dyn_bytes = 0, static_top = 0;
    std::vector<StaticArr> statics;
    std::vector<WgOp> wgops;        // the block's wgmma ops (operands kept until the last thread retires)
    uint32_t bsync = 1;             // __syncthreads resolved so far
    uint32_t wsync[kMaxThreads / 32];  // full-warp __syncwarp (and __syncthreads) per warp

    void prepare(unsigned n) {
        if (!stacks) {
            void* p = mmap(nullptr, kSlot * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) {
                perror("deepis emu: mmap of fiber stacks");
                abort();
            }
            stacks = static_cast<char*>(p);
            smem = static_cast<unsigned char*>(std::aligned_alloc(64, kArena));
            shadow = static_cast<Sh*>(std::calloc(kArena / 2, sizeof(Sh)));
        }
        for (; guarded < (int)n; ++guarded) mprotect(stacks + kSlot * guarded, kGuard, PROT_NONE);
    }
    ~Worker() {
        if (stacks) munmap(stacks, kSlot * kMaxThreads);
        std::free(smem);
        std::free(shadow);
    }
};
static thread_local Worker* t_worker = nullptr;
static thread_local struct WorkerOwner {
    ~WorkerOwner() { delete t_worker; }
} t_worker_owner;

static Worker& worker() {
    if (!t_worker) {
        (void)&t_worker_owner;
        t_worker = new Worker();
    }
    return *t_worker;
}

static void fiber_main(void* p) {
    Fiber* f = static_cast<Fiber*>(p);
    tl.job->body(tl.job->ctx);
    if (!f->copies.empty())
        record(tl.job, fmt("thread exits with %zu cp.async copies pending (%zu committed groups; the first issued at line %d): "
                           "no cp_async_wait_group for them, at %s",
                           f->copies.size(), f->group_ends.size(), f->copies[0].line, where().c_str()));
    if (!f->wg.empty())
        record(tl.job, fmt("thread exits with %zu wgmma pending (the first issued at line %d): no wgmma_wait_group for them, at %s",
                           f->wg.size(), f->wg[0].line, where().c_str()));
    f->st = DONE;
    ctx_switch(&f->ctx, &t_worker->sched);
    __builtin_trap();
}

static inline void block_on(Fiber* f) { ctx_switch(&f->ctx, &t_worker->sched); }

int syncthreads(int line, int kind, int pred) {
    Fiber* f = tl.fiber;
    f->st = BAR;
    f->line = line;
    f->kind = kind;
    f->val = pred;
    block_on(f);
    return (int)f->res;
}

uint64_t warp_op(int line, int kind, unsigned mask, uint64_t val, int arg, int width) {
    Fiber* f = tl.fiber;
    if (kind >= W_LDMATRIX) mask = 0xffffffffu;  // .aligned: the whole warp
    f->st = WARP;
    f->line = line;
    f->kind = kind;
    f->mask = mask;
    f->val = val;
    f->arg = arg;
    f->width = width;
    block_on(f);
    return f->res;
}

unsigned activemask() {
    Worker& w = *t_worker;
    unsigned lin = unsigned(tl.fiber - w.fibers), base = lin & ~31u, n = tl.job->nthreads, m = 0;
    for (unsigned l = 0; l < 32 && base + l < n; ++l)
        if (w.fibers[base + l].st != DONE) m |= 1u << l;
    return m;
}

// ---- checked shared memory (emu/shared.h) ------------------------------------------------------
static std::string thread_name(unsigned lin) {
    const uint3 bd = tl.block_dim;
    return fmt("thread (%u,%u,%u)", lin % bd.x, (lin / bd.x) % bd.y, lin / (bd.x * bd.y));
}

// "static shared `As` byte 12" / "dynamic shared memory byte 12" for arena offset `o`.
static std::string describe(const Worker& w, size_t o) {
    for (const StaticArr& a : w.statics)
        if (o >= a.off && o < a.off + a.bytes) return fmt("static shared `%s` byte %zu", a.name, o - a.off);
    if (o < w.dyn_bytes || o == 0) return fmt("dynamic shared memory byte %zu", o);
    return fmt("shared memory arena byte %zu (outside every array)", o);
}

// Whether an access by thread `t` (linear + 1) at barrier counts (b, wv) happens before the running thread's.
static inline bool ordered(const Worker& w, unsigned me, uint16_t t, uint32_t b, uint32_t wv) {
    if (t == kManyReaders) return b < w.bsync;
    unsigned o = unsigned(t) - 1;
    return o == me || b < w.bsync || ((o >> 5) == (me >> 5) && wv < w.wsync[me >> 5]);
}

static void shared_fault(Worker& w, size_t o, const char* what, const std::string& more) {
    record(tl.job, fmt("%s: %s%s, at %s", what, describe(w, o).c_str(), more.c_str(), where().c_str()));
}

// The write checks of one granule; false after recording a fault.
static inline bool check_write(Worker& w, size_t g, unsigned me) {
    Sh& e = w.shadow[g];
    if (e.st == kPending) {
        shared_fault(w, 2 * g, "write to a cp.async destination before its cp_async_wait_group",
                     fmt(" (copy of %s in flight)", thread_name(e.w_t - 1).c_str()));
        return false;
    }
    if (e.st == kWritten && !ordered(w, me, e.w_t, e.w_b, e.w_w)) {
        shared_fault(w, 2 * g, "write-after-write race (no __syncthreads between)",
                     fmt(", written before by %s", thread_name(e.w_t - 1).c_str()));
        return false;
    }
    if (e.r_t && !ordered(w, me, e.r_t, e.r_b, e.r_w)) {
        shared_fault(w, 2 * g, "write-after-read race (no __syncthreads between the read and this write)",
                     e.r_t == kManyReaders ? std::string(", read by several threads since the last barrier")
                                           : fmt(", read by %s since the last barrier", thread_name(e.r_t - 1).c_str()));
        return false;
    }
    return true;
}

static inline void mark_written(Worker& w, size_t g, unsigned me) {
    Sh& e = w.shadow[g];
    e.st = kWritten;
    e.w_t = uint16_t(me + 1);
    e.w_b = w.bsync;
    e.w_w = w.wsync[me >> 5];
    e.r_t = 0;
}

// The read checks and bookkeeping of one granule; false after recording a fault.
static inline bool check_read(Worker& w, size_t g, unsigned me) {
    Sh& e = w.shadow[g];
    if (__builtin_expect(e.st != kWritten, 0)) {
        if (e.st == kUnwritten) shared_fault(w, 2 * g, "read of shared memory nothing wrote", "");
        else
            shared_fault(w, 2 * g, "read of a cp.async destination before its cp_async_wait_group",
                         fmt(" (copy of %s in flight)", thread_name(e.w_t - 1).c_str()));
        return false;
    }
    if (!ordered(w, me, e.w_t, e.w_b, e.w_w)) {
        shared_fault(w, 2 * g, "read-after-write race (no __syncthreads between the write and this read)",
                     fmt(", written by %s since the last barrier", thread_name(e.w_t - 1).c_str()));
        return false;
    }
    if (!e.r_t || ordered(w, me, e.r_t, e.r_b, e.r_w)) e.r_t = uint16_t(me + 1);
    else if (e.r_t != me + 1) e.r_t = kManyReaders;
    e.r_b = w.bsync;
    e.r_w = w.wsync[me >> 5];
    return true;
}

// Arena offset of `p`, or false when it is not in the arena (a redirected out-of-bounds cell).
static inline bool arena_off(const Worker& w, const void* p, size_t* o) {
    *o = size_t(static_cast<const unsigned char*>(p) - w.smem);
    return static_cast<const unsigned char*>(p) >= w.smem && *o < kArena;
}

void sh_read(const void* p, int bytes) {
    Worker& w = *t_worker;
    size_t o;
    if (!arena_off(w, p, &o)) return;
    for (size_t g = o >> 1, e = (o + size_t(bytes) + 1) >> 1; g < e; ++g)
        if (!check_read(w, g, tl.lin)) return;
}

void sh_write(const void* p, int bytes) {
    Worker& w = *t_worker;
    size_t o;
    if (!arena_off(w, p, &o)) return;
    tl.fiber->proxy_dirty = true;
    for (size_t g = o >> 1, e = (o + size_t(bytes) + 1) >> 1; g < e; ++g) {
        if (!check_write(w, g, tl.lin)) return;
        mark_written(w, g, tl.lin);
    }
}

// Fills [off, off + bytes) with the poison pattern, nothing written.
static void poison(Worker& w, size_t off, size_t bytes) {
    std::memset(w.smem + off, 0xff, bytes);
    std::memset(static_cast<void*>(w.shadow + off / 2), 0, ((bytes + 1) / 2) * sizeof(Sh));
}

unsigned char* static_smem(const void* key, long long bytes, const char* name) {
    Worker& w = *t_worker;
    for (const StaticArr& a : w.statics)
        if (a.key == key) return w.smem + a.off;
    size_t off = (w.static_top + 15) & ~size_t(15);
    size_t first = (w.dyn_bytes + 16 + 15) & ~size_t(15);
    if (off + size_t(bytes) - first > kMaxStaticSmem || off + size_t(bytes) > kMaxSmem + 15) {
        record(tl.job, fmt("static shared memory: `%s` (%lld bytes) makes %zu bytes of static and %zu of dynamic shared memory "
                           "(at most %zu static, %zu in all), at %s",
                           name, bytes, off + size_t(bytes) - first, w.dyn_bytes, kMaxStaticSmem, kMaxSmem, where().c_str()));
        off = first;  // the launch fails; keep accesses inside the arena meanwhile
    }
    w.statics.push_back(StaticArr{key, off, size_t(bytes), name});
    w.static_top = off + size_t(bytes);
    poison(w, off, size_t(bytes));
    return w.smem + off;
}

void oob_shared(const void* base, long long index, long long len) {
    Worker& w = *t_worker;
    size_t o = 0;
    std::string what = "shared memory";
    if (arena_off(w, base, &o)) {
        what = describe(w, o);
        what = what.substr(0, what.find(" byte"));  // the array's name
    }
    record(tl.job, fmt("out-of-bounds access: %s index %lld, length %lld, at %s", what.c_str(), index, len, where().c_str()));
}

// ---- cp.async (emu/tensor.h) -------------------------------------------------------------------
void cp_async_fail(int line, const char* what, int arg, long long byte_off, long long len_bytes, int bytes) {
    record(tl.job, fmt("cp.async of %d bytes at line %d: %s: argument %d byte offset %lld (buffer of %lld bytes), at %s",
                       bytes, line, what, arg, byte_off, len_bytes, where().c_str()));
}

void cp_async_issue(int line, const unsigned char* dst, long long dst_avail, const unsigned char* src, int bytes) {
    Worker& w = *t_worker;
    size_t o;
    if (!arena_off(w, dst, &o)) {
        record(tl.job, fmt("cp.async at line %d: the destination is not shared memory, at %s", line, where().c_str()));
        return;
    }
    if (o % size_t(bytes)) {
        record(tl.job, fmt("cp.async of %d bytes at line %d: misaligned destination address %s, at %s", bytes, line,
                           describe(w, o).c_str(), where().c_str()));
        return;
    }
    if (dst_avail < bytes) {
        record(tl.job, fmt("cp.async of %d bytes at line %d: out-of-bounds destination %s (%lld bytes left in the array), at %s",
                           bytes, line, describe(w, o).c_str(), dst_avail < 0 ? 0 : dst_avail, where().c_str()));
        return;
    }
    const unsigned me = tl.lin;
    for (size_t g = o / 2; g < (o + size_t(bytes)) / 2; ++g) {
        if (!check_write(w, g, me)) return;
        Sh& e = w.shadow[g];
        e.st = kPending;
        e.w_t = uint16_t(me + 1);
        e.r_t = 0;
    }
    std::memset(w.smem + o, 0xff, size_t(bytes));  // poison until the wait
    Copy c;
    c.dst = w.smem + o;
    c.bytes = bytes;
    c.line = line;
    std::memcpy(c.data, src, size_t(bytes));
    tl.fiber->copies.push_back(c);
}

void cp_async_commit(int) { tl.fiber->group_ends.push_back(tl.fiber->copies.size()); }

void cp_async_wait(int, int n) {
    Fiber* f = tl.fiber;
    Worker& w = *t_worker;
    if (n < 0) n = 0;
    while (f->group_ends.size() > size_t(n)) {
        size_t k = f->group_ends.front();
        if (k) f->proxy_dirty = true;
        for (size_t i = 0; i < k; ++i) {
            const Copy& c = f->copies[i];
            std::memcpy(c.dst, c.data, size_t(c.bytes));
            size_t o = size_t(c.dst - w.smem);
            for (size_t g = o / 2; g < (o + size_t(c.bytes)) / 2; ++g) mark_written(w, g, tl.lin);
        }
        f->copies.erase(f->copies.begin(), f->copies.begin() + long(k));
        f->group_ends.erase(f->group_ends.begin());
        for (size_t& e : f->group_ends) e -= k;
    }
}

// ---- ldmatrix and mma.sync (emu/tensor.h) ------------------------------------------------------
void ldmatrix(int line, int num, bool trans, LdmLane* lane) {
    warp_op(line, W_LDMATRIX, 0xffffffffu, reinterpret_cast<uint64_t>(lane), num, trans ? 1 : 0);
}

void mma(int line, int type, MmaLane* lane) { warp_op(line, W_MMA, 0xffffffffu, reinterpret_cast<uint64_t>(lane), type, 0); }

static inline uint16_t u16_at(const unsigned char* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

// Runs one ldmatrix of the 32 lanes F[0..32). False after recording an error.
static bool run_ldmatrix(Worker& w, Fiber* F, unsigned base) {
    const int num = F[0].arg;
    const bool trans = F[0].width != 0;
    const char* op = trans ? "ldmatrix .trans" : "ldmatrix";
    const unsigned char* rows[4][8];
    for (int i = 0; i < num; ++i)
        for (int r = 0; r < 8; ++r) {
            unsigned s = unsigned(8 * i + r);
            const LdmLane* L = reinterpret_cast<const LdmLane*>(F[s].val);
            tl.thread_idx = F[s].tid;
            tl.lin = base + s;
            size_t o;
            if (!arena_off(w, L->addr, &o)) {
                record(tl.job, fmt("%s.x%d: the row address of lane %u is not shared memory, at %s", op, num, s, where().c_str()));
                return false;
            }
            if (o % 16) {
                record(tl.job, fmt("%s.x%d: misaligned row address of lane %u: %s is not 16-byte aligned, at %s", op, num, s,
                                   describe(w, o).c_str(), where().c_str()));
                return false;
            }
            if (L->avail < 16) {
                record(tl.job, fmt("out-of-bounds access: %s.x%d row of lane %u at %s needs 16 bytes, %lld left in the array, at %s", op,
                                   num, s, describe(w, o).c_str(), L->avail < 0 ? 0 : L->avail, where().c_str()));
                return false;
            }
            for (size_t g = o / 2; g < o / 2 + 8; ++g)
                if (!check_read(w, g, base + s)) return false;
            rows[i][r] = L->addr;
        }
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        unsigned* out = reinterpret_cast<const LdmLane*>(F[l].val)->out;
        for (int i = 0; i < num; ++i) {
            uint16_t lo, hi;
            if (!trans) {
                lo = u16_at(rows[i][g] + 4 * t);
                hi = u16_at(rows[i][g] + 4 * t + 2);
            } else {
                lo = u16_at(rows[i][2 * t] + 2 * g);
                hi = u16_at(rows[i][2 * t + 1] + 2 * g);
            }
            out[i] = unsigned(lo) | (unsigned(hi) << 16);
        }
    }
    return true;
}

// mma.sync of the 32 lanes F[0..32), m16n8k16 in f16 / bf16 or m16n8k8 in tf32: the fragments
// are gathered by the PTX ISA layouts (groupID g = lane / 4, threadID_in_group t = lane % 4):
//  m16n8k16.row.col.f32.{f16,bf16}.f32 (the lower half of a register holds the lower column / row):
//   A (16x16): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B (16x8):  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//  m16n8k8.row.col.f32.tf32.tf32.f32 (one tf32 per register):
//   A (16x8):  a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
//   B (8x8):   b[0] = B[t][g], b[1] = B[t+4][g]
//  C, D (16x8), both shapes: c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1].
// Products are exact in double and summed there, then rounded once to f32. A tf32 operand with
// any of its low 13 bits set fails the launch (the PTX ISA leaves such operands undefined; a
// kernel rounds them with cvt.rna.tf32.f32 first). False after recording an error.
static bool gather_tf32(Job* J, Fiber* F, double (&A)[16][16], double (&B)[16][8]) {
    for (unsigned l = 0; l < 32; ++l) {
        const MmaLane* L = reinterpret_cast<const MmaLane*>(F[l].val);
        const unsigned g = l >> 2, t = l & 3;
        const unsigned regs[6] = {L->a[0], L->a[1], L->a[2], L->a[3], L->b[0], L->b[1]};
        for (int r = 0; r < 6; ++r)
            if (regs[r] & 0x1fffu) {
                tl.thread_idx = F[l].tid;
                record(J, fmt("mma.sync m16n8k8 .tf32 at line %d: lane %u's %s[%d] = %#010x is not a tf32 value (low 13 bits set): "
                              "round it with tf32_from_f32 (cvt.rna.tf32.f32) first, at %s",
                              F[l].line, l, r < 4 ? "a" : "b", r < 4 ? r : r - 4, regs[r], where().c_str()));
                return false;
            }
        auto f = [](unsigned v) {
            float x;
            std::memcpy(&x, &v, 4);
            return double(x);
        };
        A[g][t] = f(L->a[0]);
        A[g + 8][t] = f(L->a[1]);
        A[g][t + 4] = f(L->a[2]);
        A[g + 8][t + 4] = f(L->a[3]);
        B[t][g] = f(L->b[0]);
        B[t + 4][g] = f(L->b[1]);
    }
    return true;
}

static void gather_half(Fiber* F, bool bf, double (&A)[16][16], double (&B)[16][8]) {
    auto h = [bf](unsigned reg, int hi) {
        uint16_t v = uint16_t(hi ? reg >> 16 : reg & 0xffffu);
        return double(bf ? bf16_bits_to_f32(v) : f16_bits_to_f32(v));
    };
    for (unsigned l = 0; l < 32; ++l) {
        const MmaLane* L = reinterpret_cast<const MmaLane*>(F[l].val);
        const unsigned g = l >> 2, t = l & 3;
        for (int j = 0; j < 2; ++j) {
            A[g][2 * t + j] = h(L->a[0], j);
            A[g + 8][2 * t + j] = h(L->a[1], j);
            A[g][2 * t + 8 + j] = h(L->a[2], j);
            A[g + 8][2 * t + 8 + j] = h(L->a[3], j);
            B[2 * t + j][g] = h(L->b[0], j);
            B[2 * t + 8 + j][g] = h(L->b[1], j);
        }
    }
}

static bool run_mma(Job* J, Fiber* F) {
    const int type = F[0].arg;
    const int K = type == MMA_TF32 ? 8 : 16;
    double A[16][16], B[16][8], C[16][8];
    if (type == MMA_TF32) {
        if (!gather_tf32(J, F, A, B)) return false;
    } else {
        gather_half(F, type == MMA_BF16, A, B);
    }
    for (unsigned l = 0; l < 32; ++l) {
        const MmaLane* L = reinterpret_cast<const MmaLane*>(F[l].val);
        const unsigned g = l >> 2, t = l & 3;
        for (int j = 0; j < 2; ++j) {
            C[g][2 * t + j] = L->c[j];
            C[g + 8][2 * t + j] = L->c[2 + j];
        }
    }
    float D[16][8];
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) {
            double acc = C[m][n];
            for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
            D[m][n] = float(acc);
        }
    for (unsigned l = 0; l < 32; ++l) {
        float* d = reinterpret_cast<const MmaLane*>(F[l].val)->d;
        const unsigned g = l >> 2, t = l & 3;
        d[0] = D[g][2 * t];
        d[1] = D[g][2 * t + 1];
        d[2] = D[g + 8][2 * t];
        d[3] = D[g + 8][2 * t + 1];
    }
    return true;
}

// A `.sync.aligned` operation waited on by lane l of the warp at F: runs it once all 32 lanes wait
// there. Returns 1 when it ran, 0 when lanes are still running, -1 after recording an error.
static int resolve_aligned(Job* J, Worker& w, Fiber* F, unsigned base, unsigned cnt, unsigned l) {
    const char* op = warp_name(F[l].kind);
    tl.thread_idx = F[l].tid;
    if (cnt < 32) {
        record(J, fmt("%s at line %d: the warp has %u threads (a block of %u): all 32 lanes must execute it, at %s", op, F[l].line,
                      cnt, J->nthreads, where().c_str()));
        return -1;
    }
    for (unsigned j = 0; j < 32; ++j) {
        if (F[j].st == DONE) {
            record(J, fmt("%s at line %d: lane %u has exited: all 32 lanes must execute it, at %s", op, F[l].line, j, where().c_str()));
            return -1;
        }
        if (F[j].st != WARP) return 0;
        if (F[j].kind != F[l].kind || F[j].line != F[l].line || F[j].arg != F[l].arg || F[j].width != F[l].width) {
            record(J, fmt("%s at line %d: lane %u is at %s (line %d): divergent lanes at a .sync.aligned operation, at %s", op,
                          F[l].line, j, warp_name(F[j].kind), F[j].line, where().c_str()));
            return -1;
        }
    }
    if (F[l].kind == W_LDMATRIX) {
        if (!run_ldmatrix(w, F, base)) return -1;
    } else if (!run_mma(J, F)) {
        return -1;
    }
    for (unsigned j = 0; j < 32; ++j) F[j].st = RUN;
    return 1;
}

// ---- wgmma (emu/tensor.h) ----------------------------------------------------------------------
static const uint32_t kWgPoison = 0x7fbadbadu;  // a NaN: what an accumulator in flight reads as

void wgmma(int line, int type, int n, WgLane* lane) { warp_op(line, W_WGMMA, 0xffffffffu, reinterpret_cast<uint64_t>(lane), type, n); }

void wgmma_fence(int) { tl.fiber->wg_fenced = true; }

void fence_proxy_async(int) { tl.fiber->proxy_dirty = false; }

void wgmma_commit(int) { tl.fiber->wg_group_ends.push_back(tl.fiber->wg.size()); }

unsigned smem_offset(const void* p) {
    size_t o;
    if (!arena_off(*t_worker, p, &o)) return 0xffffffffu;  // a descriptor of it fails the wgmma
    return unsigned(o);
}

// A decoded matrix descriptor, in bytes.
struct Desc {
    size_t start, lbo, sbo;
};

// Decodes descriptor `d` of operand `which` ("A" / "B"); false after recording an error.
static bool decode_desc(Job* J, uint64_t d, const char* which, int line, Desc* out) {
    const uint64_t reserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3ffull << 52);
    const char* why = nullptr;
    if (d >> 62) why = "a swizzled layout (bits 62-63; only no-swizzle is emulated)";
    else if ((d >> 49) & 7) why = "a base offset (bits 49-51; only no-swizzle layouts, which have none, are emulated)";
    else if (d & reserved) why = "a reserved bit set (14-15, 30-31, 46-48 or 52-61)";
    if (why) {
        record(J, fmt("wgmma at line %d: descriptor %s = %#018llx has %s, at %s", line, which, (unsigned long long)d, why, where().c_str()));
        return false;
    }
    out->start = size_t(d & 0x3fff) << 4;
    out->lbo = size_t((d >> 16) & 0x3fff) << 4;
    out->sbo = size_t((d >> 32) & 0x3fff) << 4;
    return true;
}

// Bytes of one element of a wgmma type, and the K of one wgmma (32 bytes of each row).
static inline unsigned wg_bytes(int type) { return type == WG_TF32 ? 4 : 2; }
static inline unsigned wg_k(int type) { return 32 / wg_bytes(type); }

// Byte offset of element (r, k) of a K-major, no-swizzle operand of `es`-byte elements (PTX ISA
// canonical layout: T = 16 / es elements per 16-byte core-matrix row).
static inline size_t canon_at(const Desc& d, unsigned r, unsigned k, unsigned es) {
    const unsigned t = 16 / es;
    return d.start + 16 * (r % 8) + d.sbo * (r / 8) + es * (k % t) + d.lbo * (k / t);
}

// Gathers `rows` x K elements of `type` through `d` into `out` (raw bits), checking each one as a
// read of thread `me`; `fresh`: also the fence.proxy.async rule and, for tf32, that each is a
// tf32 value (at issue). False after recording an error.
static bool gather_operand(Job* J, Worker& w, const Desc& d, unsigned rows, int type, const char* which, int line, unsigned me,
                           bool fresh, std::vector<uint32_t>* out) {
    const unsigned es = wg_bytes(type), K = wg_k(type);
    out->resize(size_t(rows) * K);
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned k = 0; k < K; ++k) {
            const size_t o = canon_at(d, r, k, es);
            if (o + es > w.dyn_bytes) {
                record(J, fmt("out-of-bounds access: wgmma at line %d: %s element (%u, %u) at dynamic shared memory byte %zu, past its %zu bytes "
                              "(descriptor start %zu, LBO %zu, SBO %zu), at %s",
                              line, which, r, k, o, w.dyn_bytes, d.start, d.lbo, d.sbo, where().c_str()));
                return false;
            }
            uint32_t v = 0;
            std::memcpy(&v, w.smem + o, es);
            if (fresh) {
                for (size_t g = o / 2; g < (o + es) / 2; ++g) {
                    if (!check_read(w, g, me)) return false;
                    const Sh& e = w.shadow[g];
                    if (e.w_t && w.fibers[e.w_t - 1].proxy_dirty) {
                        record(J, fmt("wgmma at line %d reads %s element (%u, %u), %s, written by %s, which has made no fence.proxy.async "
                                      "(fence_proxy_async) since it wrote shared memory: the async proxy may not see the write, at %s",
                                      line, which, r, k, describe(w, o).c_str(), thread_name(e.w_t - 1).c_str(), where().c_str()));
                        return false;
                    }
                }
                if (type == WG_TF32 && (v & 0x1fffu)) {
                    record(J, fmt("wgmma .tf32 at line %d: %s element (%u, %u), %s, = %#010x is not a tf32 value (low 13 bits set): "
                                  "round it with tf32_from_f32 (cvt.rna.tf32.f32) before the wgmma reads it, at %s",
                                  line, which, r, k, describe(w, o).c_str(), v, where().c_str()));
                    return false;
                }
            }
            (*out)[size_t(r) * K + k] = v;
        }
    return true;
}

static inline double wg_elem(uint32_t v, int type) {
    if (type == WG_TF32) {
        float f;
        std::memcpy(&f, &v, 4);
        return double(f);
    }
    return double(type == WG_BF16 ? bf16_bits_to_f32(uint16_t(v)) : f16_bits_to_f32(uint16_t(v)));
}

// The pending result of the newest wgmma of `f` on registers `d`, or null.
static const WgPending* pending_on(const Fiber& f, const float* d) {
    for (size_t i = f.wg.size(); i-- > 0;)
        if (f.wg[i].d == d) return &f.wg[i];
    return nullptr;
}

// Runs the wgmma of the warpgroup of thread `lin` once all 128 threads wait at it. Returns 1 when
// it ran, 0 when some thread waits at another collective, -1 after recording an error.
static int resolve_wgmma(Job* J, Worker& w, unsigned n, unsigned lin) {
    Fiber& f0 = w.fibers[lin];
    const int line = f0.line;
    if (n % 128) {
        record(J, fmt("wgmma at line %d: a block of %u threads is not whole warpgroups of 128, at %s", line, n, where().c_str()));
        return -1;
    }
    const unsigned first = lin & ~127u;
    Fiber* G = w.fibers + first;
    const WgLane* L0 = reinterpret_cast<const WgLane*>(f0.val);
    for (unsigned j = 0; j < 128; ++j) {
        const Fiber& f = G[j];
        const char* why = f.st == DONE ? "has exited" : f.st == BAR ? "waits at __syncthreads" : nullptr;
        if (why) {
            record(J, fmt("wgmma at line %d: thread %u of the warpgroup %s: all 128 threads must execute it, at %s", line, j, why,
                          where().c_str()));
            return -1;
        }
        if (f.kind != W_WGMMA || f.line != line) return 0;
        const WgLane* L = reinterpret_cast<const WgLane*>(f.val);
        if (f.arg != f0.arg || f.width != f0.width || L->da != L0->da || L->db != L0->db || (L->scale_d != 0) != (L0->scale_d != 0)) {
            record(J, fmt("wgmma at line %d: thread %u of the warpgroup has other descriptors, shape, type or scale-d than thread 0 "
                          "(A %#llx / %#llx, B %#llx / %#llx), at %s",
                          line, j, (unsigned long long)L->da, (unsigned long long)L0->da, (unsigned long long)L->db,
                          (unsigned long long)L0->db, where().c_str()));
            return -1;
        }
        if (!f.wg_fenced) {
            tl.thread_idx = f.tid;
            record(J, fmt("wgmma at line %d: thread %u of the warpgroup made no wgmma_fence since its last wgmma_wait_group "
                          "(wgmma.fence orders its register accesses before the async op), at %s",
                          line, j, where().c_str()));
            return -1;
        }
    }
    const int type = f0.arg, N = f0.width;
    if (N < 8 || N > 256 || N % 8) {
        record(J, fmt("wgmma at line %d: N = %d (8..256, a multiple of 8), at %s", line, N, where().c_str()));
        return -1;
    }
    Desc da, db;
    if (!decode_desc(J, L0->da, "A", line, &da) || !decode_desc(J, L0->db, "B", line, &db)) return -1;
    WgOp op{line, type, N, L0->da, L0->db, first, 128, {}, {}};
    if (!gather_operand(J, w, da, 64, type, "A", line, first, true, &op.a) ||
        !gather_operand(J, w, db, unsigned(N), type, "B", line, first, true, &op.b))
        return -1;
    const size_t id = w.wgops.size();
    const unsigned K = wg_k(type);
    for (unsigned j = 0; j < 128; ++j) {
        Fiber& f = G[j];
        const WgLane* L = reinterpret_cast<const WgLane*>(f.val);
        const unsigned wq = j / 32, l = j % 32;
        const WgPending* prev = L->scale_d ? pending_on(f, L->d) : nullptr;
        WgPending p{L->d, line, id, std::vector<float>(size_t(N / 2))};
        for (int i = 0; i < N / 2; ++i) {
            const unsigned row = 16 * wq + l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
            double acc = !L->scale_d ? 0.0 : prev ? double(prev->res[size_t(i)]) : double(L->d[i]);
            for (unsigned k = 0; k < K; ++k) acc += wg_elem(op.a[row * K + k], type) * wg_elem(op.b[col * K + k], type);
            p.res[size_t(i)] = float(acc);
            std::memcpy(&L->d[i], &kWgPoison, 4);
        }
        f.wg.push_back(std::move(p));
        f.st = RUN;
    }
    w.wgops.push_back(std::move(op));
    return 1;
}

// Retires the oldest pending wgmma of the running thread; false after recording an error.
static bool wg_retire(Worker& w, Fiber* f) {
    WgPending p = std::move(f->wg.front());
    f->wg.erase(f->wg.begin());
    for (size_t i = 0; i < p.res.size(); ++i) {
        uint32_t bits;
        std::memcpy(&bits, &p.d[i], 4);
        if (bits != kWgPoison) {
            record(tl.job, fmt("wgmma issued at line %d: accumulator register %zu was written while the wgmma was in flight "
                               "(before its wgmma_wait_group), at %s",
                               p.line, i, where().c_str()));
            return false;
        }
    }
    if (!pending_on(*f, p.d)) std::memcpy(p.d, p.res.data(), p.res.size() * 4);  // a later op on them writes them instead
    WgOp& op = w.wgops[p.op];
    if (--op.pending == 0) {
        Desc da, db;
        std::vector<uint32_t> a, b;
        decode_desc(tl.job, op.da, "A", op.line, &da);
        decode_desc(tl.job, op.db, "B", op.line, &db);
        if (!gather_operand(tl.job, w, da, 64, op.type, "A", op.line, op.first, false, &a) ||
            !gather_operand(tl.job, w, db, unsigned(op.n), op.type, "B", op.line, op.first, false, &b))
            return false;
        if (a != op.a || b != op.b) {
            record(tl.job, fmt("wgmma issued at line %d: shared memory of its %s operand was modified while it was in flight "
                               "(before the last thread's wgmma_wait_group), at %s",
                               op.line, a != op.a ? "A" : "B", where().c_str()));
            return false;
        }
        std::vector<uint32_t>().swap(op.a);
        std::vector<uint32_t>().swap(op.b);
    }
    return true;
}

void wgmma_wait(int, int n) {
    Fiber* f = tl.fiber;
    Worker& w = *t_worker;
    if (n < 0) n = 0;
    while (f->wg_group_ends.size() > size_t(n)) {
        const size_t k = f->wg_group_ends.front();
        for (size_t i = 0; i < k; ++i)
            if (!wg_retire(w, f)) return;
        f->wg_group_ends.erase(f->wg_group_ends.begin());
        for (size_t& e : f->wg_group_ends) e -= k;
    }
    f->wg_fenced = false;
}

// Resolves the warp collectives whose lanes have all arrived. Returns how many groups ran, or -1
// after recording an error.
static int resolve_warps(Job* J, Worker& w, unsigned n) {
    int done = 0;
    for (unsigned base = 0; base < n; base += 32) {
        unsigned cnt = std::min(32u, n - base);
        Fiber* F = w.fibers + base;
        unsigned handled = 0;
        for (unsigned l = 0; l < cnt; ++l) {
            if (F[l].st != WARP || (handled >> l & 1)) continue;
            unsigned m = F[l].mask;
            tl.thread_idx = F[l].tid;
            if (F[l].kind == W_WGMMA) {
                int r = resolve_wgmma(J, w, n, base + l);
                if (r < 0) return -1;
                if (r > 0) {
                    handled = 0xffffffffu;
                    ++done;
                }
                continue;
            }
            if (F[l].kind >= W_LDMATRIX) {
                int r = resolve_aligned(J, w, F, base, cnt, l);
                if (r < 0) return -1;
                if (r > 0) {
                    handled = 0xffffffffu;
                    ++done;
                }
                continue;
            }
            if (!(m >> l & 1)) {
                record(J, fmt("%s at line %d: mask 0x%08x does not include the calling lane %u, at %s",
                              warp_name(F[l].kind), F[l].line, m, l, where().c_str()));
                return -1;
            }
            unsigned group = 0;
            bool ready = true;
            for (unsigned j = 0; j < cnt; ++j) {
                if (!(m >> j & 1) || F[j].st == DONE) continue;  // exited lanes do not take part
                if (F[j].st != WARP || F[j].mask != m) {
                    ready = false;
                    break;
                }
                if (F[j].kind != F[l].kind) {
                    record(J, fmt("divergent warp collectives in one mask: lane %u at %s (line %d), lane %u at %s (line %d), at %s",
                                  l, warp_name(F[l].kind), F[l].line, j, warp_name(F[j].kind), F[j].line, where().c_str()));
                    return -1;
                }
                group |= 1u << j;
            }
            if (!ready) continue;
            handled |= group;
            ++done;
            int kind = F[l].kind;
            uint64_t bal = 0;
            for (unsigned j = 0; j < cnt; ++j)
                if ((group >> j & 1) && F[j].val) bal |= 1ull << j;
            if (kind == W_SYNCWARP) {
                // Orders the shared-memory accesses of the warp when every live lane took part.
                unsigned live = 0;
                for (unsigned j = 0; j < cnt; ++j)
                    if (F[j].st != DONE) live |= 1u << j;
                if (group == live) ++w.wsync[base / 32];
            }
            for (unsigned j = 0; j < cnt; ++j) {
                if (!(group >> j & 1)) continue;
                Fiber& f = F[j];
                f.st = RUN;
                int wd = f.width;
                if (kind <= W_SHFL_XOR && (wd < 1 || wd > 32 || (wd & (wd - 1)))) {
                    tl.thread_idx = f.tid;
                    record(J, fmt("%s at line %d: width %d is not a power of 2 in 1..32, at %s", warp_name(kind), f.line, wd, where().c_str()));
                    return -1;
                }
                int seg = int(j) & ~(wd - 1), src = int(j);
                switch (kind) {
                case W_SHFL: src = seg + (f.arg & (wd - 1)); break;
                case W_SHFL_UP: src = int(j) - f.arg; if (src < seg) src = int(j); break;
                case W_SHFL_DOWN: src = int(j) + f.arg; if (src >= seg + wd) src = int(j); break;
                case W_SHFL_XOR: src = int(j) ^ f.arg; if (src < seg || src >= seg + wd) src = int(j); break;
                case W_BALLOT: f.res = bal; continue;
                case W_ANY: f.res = bal != 0; continue;
                case W_ALL: f.res = bal == group; continue;
                default: f.res = 0; continue;
                }
                // A lane outside the group: undefined on a GPU, an error here.
                if (!(src >= 0 && src < 32 && (group >> src & 1))) {
                    tl.thread_idx = f.tid;
                    const char* why = src < 0 || src >= int(cnt) ? "which does not exist (a partial warp)"
                                      : F[src].st == DONE        ? "which has exited"
                                                                 : "which is not in the mask";
                    record(J, fmt("%s at line %d: lane %u reads lane %d, %s (mask 0x%08x): an undefined value on a GPU, at %s",
                                  warp_name(kind), f.line, j, src, why, m, where().c_str()));
                    return -1;
                }
                f.res = F[src].val;
            }
        }
    }
    return done;
}

static void report_stuck_warp(Job* J, Worker& w, unsigned n) {
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = w.fibers[i];
        if (f.st != WARP) continue;
        if (f.kind == W_WGMMA) {
            for (unsigned j = i & ~127u; j < (i & ~127u) + 128; ++j) {
                const Fiber& g = w.fibers[j];
                if (g.kind == W_WGMMA && g.line == f.line) continue;
                tl.thread_idx = f.tid;
                record(J, fmt("deadlock: wgmma at line %d waits for thread %u of its warpgroup, which waits at %s (line %d), at %s", f.line,
                              j % 128, warp_name(g.kind), g.line, where().c_str()));
                return;
            }
        }
        unsigned base = i & ~31u, cnt = std::min(32u, n - base);
        for (unsigned j = 0; j < cnt; ++j) {
            Fiber& g = w.fibers[base + j];
            if (!(f.mask >> j & 1) || g.st == DONE) continue;
            std::string why;
            if (g.st == BAR) why = fmt("waits at __syncthreads (line %d)", g.line);
            else if (g.st == WARP && g.mask != f.mask) why = fmt("waits at %s (line %d) with mask 0x%08x", warp_name(g.kind), g.line, g.mask);
            else continue;
            tl.thread_idx = f.tid;
            record(J, fmt("deadlock: %s at line %d with mask 0x%08x waits for lane %u, which %s, at %s",
                          warp_name(f.kind), f.line, f.mask, j, why.c_str(), where().c_str()));
            return;
        }
    }
    record(J, "deadlock in a warp collective");
}

// Runs one block to completion. Returns false after recording an error.
static bool run_block(Job* J, Worker& w, uint3 bid) {
    const unsigned n = J->nthreads;
    const bool rev = J->L->schedule == 1;
    const uint3 bd = tl.block_dim;
    tl.block_idx = bid;
    // Every block starts with poisoned shared memory: dynamic here, static arrays when first declared.
    w.dyn_bytes = J->L->shmem;
    w.static_top = w.dyn_bytes + 16;  // a gap: no static array starts where dynamic memory does
    w.statics.clear();
    w.wgops.clear();
    poison(w, 0, w.dyn_bytes);
    ++w.bsync;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = w.fibers[i];
        f.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        f.st = RUN;
        f.copies.clear();
        f.group_ends.clear();
        f.wg.clear();
        f.wg_group_ends.clear();
        f.wg_fenced = false;
        f.proxy_dirty = false;
        ctx_make(&f.ctx, w.stacks + kSlot * i + kGuard, DEEPIS_EMU_STACK_BYTES, &fiber_main, &f);
    }
    for (;;) {
        for (unsigned k = 0; k < n; ++k) {
            Fiber& f = w.fibers[rev ? n - 1 - k : k];
            if (f.st != RUN) continue;
            tl.fiber = &f;
            tl.thread_idx = f.tid;
            tl.lin = unsigned(&f - w.fibers);
            ctx_switch(&w.sched, &f.ctx);
        }
        unsigned nbar = 0, nwarp = 0, ndone = 0;
        for (unsigned i = 0; i < n; ++i) {
            State s = w.fibers[i].st;
            nbar += s == BAR;
            nwarp += s == WARP;
            ndone += s == DONE;
        }
        if (ndone == n) return true;
        if (nwarp) {
            int r = resolve_warps(J, w, n);
            if (r < 0) return false;
            if (r > 0) continue;
            report_stuck_warp(J, w, n);
            return false;
        }
        // Every live thread waits at __syncthreads.
        Fiber* first = nullptr;
        for (unsigned i = 0; i < n && !first; ++i)
            if (w.fibers[i].st == BAR) first = &w.fibers[i];
        tl.thread_idx = first->tid;
        if (ndone) {
            record(J, fmt("__syncthreads at line %d reached by %u of %u threads (%u exited): a barrier in divergent code, at %s",
                          first->line, nbar, n, ndone, where().c_str()));
            return false;
        }
        long long count = 0;
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = w.fibers[i];
            if (f.line != first->line || f.kind != first->kind) {
                record(J, fmt("threads wait at different barriers: thread (%u,%u,%u) at line %d, thread (%u,%u,%u) at line %d, in block (%u,%u,%u)",
                              first->tid.x, first->tid.y, first->tid.z, first->line, f.tid.x, f.tid.y, f.tid.z, f.line,
                              bid.x, bid.y, bid.z));
                return false;
            }
            count += f.val != 0;
        }
        int res = first->kind == B_COUNT ? int(count) : first->kind == B_AND ? count == n : first->kind == B_OR ? count > 0 : 0;
        ++w.bsync;
        for (unsigned i = 0; i < n; ++i) {
            w.fibers[i].res = res;
            w.fibers[i].st = RUN;
        }
    }
}

static void work(Job* J) {
    Worker& w = worker();
    w.prepare(J->nthreads);
    const EmuLaunch* L = J->L;
    tl.job = J;
    tl.block_dim = uint3{L->block[0], L->block[1], L->block[2]};
    tl.grid_dim = uint3{L->grid[0], L->grid[1], L->grid[2]};
    tl.dyn_smem = w.smem;
    tl.dyn_smem_bytes = L->shmem;
    const unsigned long long gx = L->grid[0], gy = L->grid[1];
    for (;;) {
        if (J->failed.load(std::memory_order_relaxed)) break;
        unsigned long long k = J->next.fetch_add(1);
        if (k >= J->nblocks) break;
        unsigned long long b = L->schedule == 1 ? J->nblocks - 1 - k : k;
        if (!run_block(J, w, uint3{unsigned(b % gx), unsigned(b / gx % gy), unsigned(b / (gx * gy))})) break;
    }
    tl.job = nullptr;
    tl.fiber = nullptr;
}

// ---- the OS-thread pool: persistent workers, one launch at a time ----------------------------
struct Pool {
    std::mutex launch_mu;  // one launch at a time
    std::mutex mu;
    std::condition_variable cv, done_cv;
    std::vector<std::thread> threads;
    unsigned long long gen = 0;
    unsigned wanted = 0, running = 0;
    Job* job = nullptr;

    void loop(unsigned id) {
        unsigned long long seen = 0;
        std::unique_lock<std::mutex> lk(mu);
        for (;;) {
            cv.wait(lk, [&] { return gen != seen; });
            seen = gen;
            if (id >= wanted) continue;
            Job* j = job;
            lk.unlock();
            work(j);
            lk.lock();
            if (--running == 0) done_cv.notify_all();
        }
    }
    // Runs `J` on the calling thread and `extra` pool threads.
    void run(Job* J, unsigned extra) {
        {
            std::lock_guard<std::mutex> lk(mu);
            while (threads.size() < extra) {
                unsigned id = unsigned(threads.size());
                threads.emplace_back([this, id] { loop(id); });
                threads.back().detach();
            }
            job = J;
            wanted = running = extra;
            ++gen;
        }
        cv.notify_all();
        work(J);
        std::unique_lock<std::mutex> lk(mu);
        done_cv.wait(lk, [&] { return running == 0; });
    }
};
static Pool* pool() {
    static Pool* p = new Pool();  // never destroyed: its detached threads outlive static destructors
    return p;
}

static unsigned default_threads() {
    if (const char* e = std::getenv("DEEPIS_EMU_THREADS")) {
        int v = std::atoi(e);
        if (v > 0) return unsigned(std::min(v, 64));
    }
    unsigned h = std::thread::hardware_concurrency();
    return std::max(1u, std::min(h, 8u));
}

int run_grid(const EmuLaunch* L, const char* kernel, void (*body)(void*), void* ctx) {
    auto fail = [&](const std::string& m) {
        if (L->err && L->err_cap) snprintf(L->err, L->err_cap, "%s", m.c_str());
        return 1;
    };
    unsigned long long nthreads = 1ull * L->block[0] * L->block[1] * L->block[2];
    unsigned long long nblocks = 1ull * L->grid[0] * L->grid[1] * L->grid[2];
    if (nthreads == 0 || nthreads > kMaxThreads) return fail(fmt("block of %llu threads (1..%d)", nthreads, kMaxThreads));
    if (nblocks == 0) return fail("empty grid");
    if (L->shmem > kMaxSmem) return fail(fmt("%u bytes of dynamic shared memory (at most %zu)", L->shmem, kMaxSmem));
    Job J;
    J.L = L;
    J.kernel = kernel;
    J.body = body;
    J.ctx = ctx;
    J.nthreads = unsigned(nthreads);
    J.nblocks = nblocks;
    unsigned t = L->threads > 0 ? unsigned(L->threads) : default_threads();
    unsigned extra = unsigned(std::min<unsigned long long>(t, nblocks)) - 1;
    Pool* p = pool();
    {
        std::lock_guard<std::mutex> g(p->launch_mu);
        p->run(&J, extra);
    }
    if (!J.failed.load()) return 0;
    long long more = J.nerrors.load() - 1;
    return fail(more > 0 ? J.first + fmt(" (and %lld more errors)", more) : J.first);
}

}  // namespace emu
