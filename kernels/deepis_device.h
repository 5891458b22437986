// deepis_device.h — the one header every kernel includes. It gives kernels the device intrinsics
// they may use, with a real implementation under NVRTC and an emulated one on the host
// (DEEPIS_EMU, see emu/emu.h), so the same .cu source runs on a GPU and under the emulator.
//
// Kernel-side rules:
//  - kernels are `extern "C" __global__ void name(...)`;
//  - device-buffer parameters are `gptr<T>` (a raw pointer under NVRTC, a bounds-checked pointer
//    under the emulator), used only through [] , + , - and unary *;
//  - scalars are `int` / `float` (no structs), so the Rust launch code passes the same list everywhere;
//  - dynamic shared memory: `DEEPIS_DYN_SMEM(float, name);`  static shared: `__shared__ T a[N];`
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
//  - static `__shared__` arrays are per block but not bounds-checked; uninitialized dynamic shared
//    memory reads as NaN;
//  - every thread is a fiber with a 64 KiB stack: local arrays up to a few KiB per thread;
//  - warp-synchronous code uses the `_sync` collectives or `__syncwarp`: lanes do not run in lockstep;
//    a collective that reads a lane outside its mask (or an exited lane) gets NaN / -1;
//  - every `__syncthreads` must be reached by all threads of the block (no barrier after an early
//    `return` of some threads); a race shows as a difference between the Forward and Reverse schedules;
//  - no inline PTX, CUDA headers or `extern __shared__` outside an `#ifdef DEEPIS_EMU` alternative.
#pragma once

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
// ---- real device ------------------------------------------------------------------------------
template <class T> using gptr = T*;
#define DEEPIS_DYN_SMEM(T, name) extern __shared__ T name[]
#define DEEPIS_DEVICE __device__ __forceinline__
#else
// ---- host emulator ----------------------------------------------------------------------------
#include "emu/emu.h"
#endif
