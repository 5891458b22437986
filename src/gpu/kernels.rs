//! The one place that names kernels and embeds their sources. Every kernel of `kernels/*.cu` is
//! listed here with its file; the launch code (`ops`) uses these names, NVRTC compiles `SOURCES`.

use crate::gpu::DType;

/// Name of the device header as the sources include it.
pub const HEADER_NAME: &str = "deepis_device.h";
/// The device header (its NVRTC half is what NVRTC sees).
pub const HEADER: &str = include_str!("../../kernels/deepis_device.h");

/// (file, source) of every kernel family.
pub const SOURCES: &[(&str, &str)] = &[
    ("conv3d.cu", include_str!("../../kernels/conv3d.cu")),
    ("conv3d_tc.cu", include_str!("../../kernels/conv3d_tc.cu")),
    ("half.cu", include_str!("../../kernels/half.cu")),
    ("elementwise.cu", include_str!("../../kernels/elementwise.cu")),
    ("pool.cu", include_str!("../../kernels/pool.cu")),
    ("upsample.cu", include_str!("../../kernels/upsample.cu")),
    ("softmax.cu", include_str!("../../kernels/softmax.cu")),
    ("backward.cu", include_str!("../../kernels/backward.cu")),
    ("conv3d_backward.cu", include_str!("../../kernels/conv3d_backward.cu")),
    ("batchnorm.cu", include_str!("../../kernels/batchnorm.cu")),
];

/// (file, source) of the test-only kernels (kernels/testing/): run by the tests on the emulator and,
/// where there is a GPU, on CUDA; compiled by `deepis kernels` with the others.
pub const TESTING_SOURCES: &[(&str, &str)] = &[
    ("testing/emu_checks.cu", include_str!("../../kernels/testing/emu_checks.cu")),
    ("testing/tensor_checks.cu", include_str!("../../kernels/testing/tensor_checks.cu")),
    ("testing/wgmma_checks.cu", include_str!("../../kernels/testing/wgmma_checks.cu")),
];

/// Declares every kernel's name constant and `KERNELS`, the (file, kernel) list, from one
/// listing: file, then its kernels.
macro_rules! kernels {
    ($($file:literal: $($kernel:ident = $name:literal),+;)+) => {
        $($(pub const $kernel: &str = $name;)+)+
        /// (file, kernel) for every kernel.
        pub const KERNELS: &[(&str, &str)] = &[$($(($file, $kernel)),+),+];
    };
}

kernels! {
    "conv3d.cu":
        CONV3D_DIRECT = "conv3d_direct_f32",
        CONV3D_TILED = "conv3d_tiled_f32";
    "conv3d_tc.cu":
        CONV3D_TC_F16 = "conv3d_tc_f16",
        CONV3D_TC_BF16 = "conv3d_tc_bf16",
        CONV3D_TC_WIDE_F16 = "conv3d_tc_wide_f16",
        CONV3D_TC_WIDE_BF16 = "conv3d_tc_wide_bf16",
        CONV3D_TC_TF32 = "conv3d_tc_tf32",
        CONV3D_TC_WIDE_TF32 = "conv3d_tc_wide_tf32",
        CONV3D_WGMMA_F16 = "conv3d_wgmma_f16",
        CONV3D_WGMMA_BF16 = "conv3d_wgmma_bf16",
        CONV3D_WGMMA_TF32 = "conv3d_wgmma_tf32";
    "half.cu":
        TO_HALF_F16 = "to_half_f16",
        TO_HALF_BF16 = "to_half_bf16",
        TO_F32_F16 = "to_f32_f16",
        TO_F32_BF16 = "to_f32_bf16";
    "elementwise.cu":
        CHANNEL_AFFINE = "channel_affine_f32",
        RELU = "relu_f32",
        ADD = "add_f32",
        SIGMOID = "sigmoid_f32";
    "pool.cu":
        MAXPOOL2 = "maxpool2_f32",
        MAXPOOL2_F16 = "maxpool2_f16",
        MAXPOOL2_BF16 = "maxpool2_bf16";
    "upsample.cu":
        UPSAMPLE_TRILINEAR = "upsample_trilinear_f32",
        UPSAMPLE_ADD = "upsample_add_f32",
        UPSAMPLE_ADD_F16 = "upsample_add_f16",
        UPSAMPLE_ADD_BF16 = "upsample_add_bf16";
    "softmax.cu":
        SOFTMAX_CHANNELS = "softmax_channels_f32";
    // backward kernels (training; launched by src/gpu/train_ops.rs)
    "backward.cu":
        RELU_BACKWARD = "relu_backward_f32",
        SIGMOID_BACKWARD = "sigmoid_backward_f32",
        MUL = "mul_f32",
        ACCUMULATE = "accumulate_f32",
        COPY = "copy_f32",
        MAXPOOL2_BACKWARD = "maxpool2_backward_f32",
        UPSAMPLE_TRILINEAR_BACKWARD = "upsample_trilinear_backward_f32",
        SOFTMAX_BACKWARD = "softmax_backward_f32";
    "conv3d_backward.cu":
        CONV3D_FLIP_WEIGHTS = "conv3d_flip_weights_f32",
        CONV3D_BACKWARD_INPUT = "conv3d_backward_input_f32",
        CONV3D_WGRAD_PARTIAL = "conv3d_wgrad_partial_f32",
        SUM_PARTIALS = "sum_partials_f32";
    "batchnorm.cu":
        CHANNEL_SUM_PARTIAL = "channel_sum_partial_f32",
        BN_SQDEV_PARTIAL = "bn_sqdev_partial_f32",
        BN_BACKWARD_PARTIAL = "bn_backward_partial_f32",
        SUM_PARTIALS_F64 = "sum_partials_f64_f32",
        BN_STATS = "bn_stats_f32",
        BN_BACKWARD_PARAMS = "bn_backward_params_f32",
        BN_BACKWARD_DX = "bn_backward_dx_f32";
}

/// The tensor-core convolution for inputs and weights of `dtype` (f16, bf16, or f32 computed in
/// tf32), with warps of 32 voxels (`wide` false) or 64 voxels (`wide` true) by 64 channels.
pub fn conv3d_tc(dtype: DType, wide: bool) -> &'static str {
    match (dtype, wide) {
        (DType::F16, false) => CONV3D_TC_F16,
        (DType::BF16, false) => CONV3D_TC_BF16,
        (DType::F32, false) => CONV3D_TC_TF32,
        (DType::F16, true) => CONV3D_TC_WIDE_F16,
        (DType::BF16, true) => CONV3D_TC_WIDE_BF16,
        (DType::F32, true) => CONV3D_TC_WIDE_TF32,
    }
}

/// The wgmma convolution (sm_90a) for f16 / bf16 inputs and weights, or f32 computed in tf32.
pub fn conv3d_wgmma(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => CONV3D_WGMMA_F16,
        DType::BF16 => CONV3D_WGMMA_BF16,
        DType::F32 => CONV3D_WGMMA_TF32,
    }
}

/// The conversion f32 -> `dtype` (f16 or bf16), and `dtype` -> f32.
pub fn to_half(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F16 => Some(TO_HALF_F16),
        DType::BF16 => Some(TO_HALF_BF16),
        DType::F32 => None,
    }
}
pub fn to_f32(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F16 => Some(TO_F32_F16),
        DType::BF16 => Some(TO_F32_BF16),
        DType::F32 => None,
    }
}

/// 2x2x2 max-pool of `dtype` buffers.
pub fn maxpool2(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => MAXPOOL2,
        DType::F16 => MAXPOOL2_F16,
        DType::BF16 => MAXPOOL2_BF16,
    }
}

/// y = skip + trilinear up-sampling, all of `dtype`.
pub fn upsample_add(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => UPSAMPLE_ADD,
        DType::F16 => UPSAMPLE_ADD_F16,
        DType::BF16 => UPSAMPLE_ADD_BF16,
    }
}

pub fn all_kernel_names() -> Vec<&'static str> {
    KERNELS.iter().map(|&(_, k)| k).collect()
}

/// The kernels defined in `file`.
pub fn kernels_of(file: &str) -> impl Iterator<Item = &'static str> + '_ {
    KERNELS.iter().filter(move |&&(f, _)| f == file).map(|&(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_kernel_file_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/testing");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| format!("testing/{}", e.file_name().to_string_lossy()))
            .filter(|f| f.ends_with(".cu"))
            .collect();
        files.sort();
        let listed: Vec<String> = TESTING_SOURCES.iter().map(|&(f, _)| f.to_string()).collect();
        assert_eq!(files, listed);
    }

    #[test]
    fn every_kernel_is_defined_in_its_file() {
        for &(file, kernel) in KERNELS {
            let src = SOURCES.iter().find(|&&(f, _)| f == file).expect("file listed in SOURCES").1;
            let decl = format!("__global__ void {kernel}(");
            let bounded = src.match_indices("__global__ void __launch_bounds__(").any(|(i, _)| {
                let rest = &src[i..];
                rest.find(')').is_some_and(|c| rest[c + 1..].trim_start().starts_with(&format!("{kernel}(")))
            });
            assert!(src.contains(&decl) || bounded, "{kernel} not found in {file}");
        }
        for &(file, src) in SOURCES {
            let n = src.matches("extern \"C\" __global__").count();
            assert_eq!(n, kernels_of(file).count(), "{file}: kernels in source vs KERNELS");
        }
    }
}
