//! Shared helpers of the integration tests: golden-case files, the GPU tests' inputs and device.
#![allow(dead_code)]
pub mod corpus;
use deepis::backend::ConvSpec;
use deepis::gpu::cuda::{cuda_available, CudaDevice};
use deepis::gpu::Device;
use deepis::segment::SegmentArgs;
use deepis::tensor::Tensor;
use std::path::{Path, PathBuf};

pub const CASES: &[&str] = &["tiny", "small", "readme", "mid"];

pub fn data(case: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(case).join(file)
}

/// Reads a float32/float64/int64 `.npy` as (dims, f32 values).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).expect("npy header");
    let dims: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = match npy.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 => {
            npy.into_vec::<f32>().unwrap()
        }
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 8 => {
            npy.into_vec::<f64>().unwrap().into_iter().map(|x| x as f32).collect()
        }
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Int => {
            npy.into_vec::<i64>().unwrap().into_iter().map(|x| x as f32).collect()
        }
        d => panic!("{}: unexpected dtype {d:?}", path.display()),
    };
    (dims, data)
}

/// An N x C x D0 x D1 x D2 `.npy` as a channels-last tensor.
pub fn read_5d(path: &Path) -> Tensor {
    let (dims, data) = read_npy(path);
    assert_eq!(dims.len(), 5, "{}: expected 5D", path.display());
    Tensor::from_ncdhw([dims[0], dims[1], dims[2], dims[3], dims[4]], &data).unwrap()
}

/// Every float32 tensor of a safetensors file, by name, with its dims.
pub fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Deterministic values in [-1, 1) from a 64-bit LCG seeded by `seed`.
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A convolution with padding k / 2 on every axis, as the network's are.
pub fn same_pad_conv(cin: usize, cout: usize, k: [usize; 3], stride: usize) -> ConvSpec {
    ConvSpec { cin, cout, k, stride: [stride; 3], pad: k.map(|k| k / 2) }
}

/// Whether this is a CI run: CI set to true or 1 (any case), as CI services set it.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

/// Whether NVRTC loads. When it does not, the running test says so and skips its checks, except
/// under CI (where `.ci/run` installs NVRTC), where a missing NVRTC fails it.
pub fn nvrtc_or_skip() -> bool {
    match deepis::gpu::nvrtc::ensure_loaded() {
        Ok(_) => true,
        Err(e) => {
            assert!(!on_ci(), "CI is set and NVRTC is missing: {e}");
            skip(&format!("no NVRTC ({e})"));
            false
        }
    }
}

/// Says that the running test skips its checks and why: printed, and appended to
/// `$DEEPIS_SKIP_LOG` (one `test<TAB>reason` line) so that `.ci/run` can count the skips.
pub fn skip(reason: &str) {
    let test = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIPPED {test}: {reason}");
    println!("SKIPPED {test}: {reason}");
    if let Ok(log) = std::env::var("DEEPIS_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            // one write(2) of the whole line: O_APPEND keeps lines of parallel tests apart
            let _ = f.write_all(format!("{test}\t{reason}\n").as_bytes());
        }
    }
}

/// CUDA device 0 (its name printed), or None after saying why the test is skipped.
pub fn cuda_device_or_skip() -> Option<CudaDevice> {
    if !cuda_available() {
        let err = CudaDevice::new(0).err().expect("no driver here, so no device");
        skip(&format!("no GPU (CudaDevice::new(0): {err})"));
        return None;
    }
    let dev = CudaDevice::new(0).unwrap_or_else(|e| panic!("{e}"));
    println!("device: {}", dev.name());
    Some(dev)
}

/// Whether two outputs agree bit for bit (same length; a NaN equals the same NaN).
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
}

/// f32 inputs that exercise every rounding case of f16 and bf16: every f16 value, the midpoints
/// between neighbours (ties) and one f32 ulp either side, the same for bf16 over its exponent
/// range, overflow and underflow edges, infinities, NaN, and random bit patterns.
pub fn conversion_inputs() -> Vec<f32> {
    let mut v = Vec::new();
    for h in 0u16..=0x7bff {
        let a = half::f16::from_bits(h).to_f32();
        let b = half::f16::from_bits(h + 1).to_f32();
        let mid = (a as f64 + b as f64) / 2.0;
        for x in [a, mid as f32, f32::from_bits((mid as f32).to_bits() + 1), f32::from_bits((mid as f32).to_bits() - 1)] {
            v.extend([x, -x]);
        }
    }
    for e in 0u32..255 {
        for m in [0u32, 1, 0x7f, 0x3ff, 0x7fff] {
            let bits = (e << 23) | (m << 16) | 0x8000; // a bf16 tie
            for b in [bits, bits + 1, bits - 1] {
                v.extend([f32::from_bits(b), -f32::from_bits(b)]);
            }
        }
    }
    v.extend([65504.0, 65519.99, 65520.0, 1e6, f32::MAX, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 2f32.powi(-25), 2f32.powi(-26), 1e-30]);
    let mut s = 0x9e3779b97f4a7c15u64;
    for _ in 0..100_000 {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.push(f32::from_bits((s >> 32) as u32));
    }
    v
}

pub fn same_half(a: u16, b: u16, dtype: deepis::gpu::DType) -> bool {
    let nan = |x: u16| deepis::gpu::from_half_bits(&[x], dtype)[0].is_nan();
    a == b || (nan(a) && nan(b))
}

/// `deepis segment`'s options for a test: the CLI's defaults but small tiles (32 x 32 x 24,
/// overlap 8), `min_size` 10 and the CPU reference backend.
pub fn segment_args(inputs: Vec<String>, out: &Path, w: &Path) -> SegmentArgs {
    SegmentArgs {
        weights: w.to_path_buf(),
        inputs,
        out_dir: out.to_path_buf(),
        tau: 0.5,
        no_regrow: false,
        tile: [32, 32, 24],
        overlap: 8,
        min_size: 10,
        format: deepis::segment::LabelFormat::Npy,
        blend: deepis::segment::Blend::Window,
        tta: false,
        save_probabilities: false,
        voxel_size: None,
        shard: None,
        shards: None,
        manifest: None,
        keep_going: false,
        resample: false,
        backend: deepis::cli::BackendKind::CpuRef,
        batch: 1,
        readers: None,
        writers: None,
        gpu: Default::default(),
    }
}
