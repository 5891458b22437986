//! The one run-time detection of the CPU's SIMD: every CPU engine's kernels (the reference conv,
//! the plan's microkernels, the training ops) choose their build from these answers.

/// x86-64 AVX2 with FMA.
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x86-64 AVX-512F.
pub fn avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
