// emu.cpp — the runtime of the kernel emulator (see emu.h): fibers, the block scheduler, barriers,
// warp collectives, the OS-thread pool that runs blocks in parallel, and error reporting.
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
static const size_t kMaxSmem = 227 * 1024;
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

struct Fiber {
    Ctx ctx;
    uint3 tid;
    State st;
    int kind;  // BarKind or WarpKind
    int line;
    unsigned mask;
    int arg, width;
    uint64_t val, res;
};

static const char* warp_name(int k) {
    static const char* n[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                              "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};
    return n[k];
}

struct Worker {
    char* stacks = nullptr;
    int guarded = 0;  // stacks whose guard page is set
    Fiber fibers[kMaxThreads];
    Ctx sched;
    unsigned char* smem = nullptr;

    void prepare(unsigned n) {
        if (!stacks) {
            void* p = mmap(nullptr, kSlot * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) {
                perror("deepis emu: mmap of fiber stacks");
                abort();
            }
            stacks = static_cast<char*>(p);
            smem = static_cast<unsigned char*>(std::malloc(kMaxSmem));
        }
        for (; guarded < (int)n; ++guarded) mprotect(stacks + kSlot * guarded, kGuard, PROT_NONE);
    }
    ~Worker() {
        if (stacks) munmap(stacks, kSlot * kMaxThreads);
        std::free(smem);
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
                // A lane outside the group: undefined on a GPU; all-ones bits here (NaN, -1).
                f.res = (src >= 0 && src < 32 && (group >> src & 1)) ? F[src].val : ~0ull;
            }
        }
    }
    return done;
}

static void report_stuck_warp(Job* J, Worker& w, unsigned n) {
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = w.fibers[i];
        if (f.st != WARP) continue;
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
    if (J->L->shmem) std::memset(w.smem, 0xff, J->L->shmem);  // uninitialized shared memory reads as NaN
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = w.fibers[i];
        f.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        f.st = RUN;
        ctx_make(&f.ctx, w.stacks + kSlot * i + kGuard, DEEPIS_EMU_STACK_BYTES, &fiber_main, &f);
    }
    for (;;) {
        for (unsigned k = 0; k < n; ++k) {
            Fiber& f = w.fibers[rev ? n - 1 - k : k];
            if (f.st != RUN) continue;
            tl.fiber = &f;
            tl.thread_idx = f.tid;
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
