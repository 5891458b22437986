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
