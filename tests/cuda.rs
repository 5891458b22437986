//! `deepis predict --backend cuda` as a user runs it on a GPU machine: every golden case within
//! the float32 tolerance, and a second start that compiles nothing (the cubin cache's hit count
//! in the log). Needs a CUDA GPU; without one each test prints that it was skipped.
mod common;

use std::path::Path;
use std::process::Command;

use common::{data, read_npy};
use deepis::gpu::kernels::SOURCES;
use deepis::tensor::rel_err;

const BIN: &str = env!("CARGO_BIN_EXE_deepis");
const TOL: f32 = 1e-4;

/// Whether a GPU is here; if not, the skip is reported (stdout, stderr and .ci/run's count).
fn gpu_or_skip() -> bool {
    if deepis::gpu::cuda::cuda_available() {
        return true;
    }
    common::skip("no CUDA GPU on this machine");
    false
}

/// Runs predict on CUDA with `cache_root` as the cache; returns stderr.
fn predict_cuda(case: &str, out: &Path, cache_root: &Path) -> String {
    let o = Command::new(BIN)
        .args(["predict", "--backend", "cuda", "--weights"])
        .arg(data(case, "weights.safetensors"))
        .arg(data(case, "input.npy"))
        .arg("-o")
        .arg(out)
        .env("DEEPIS_CACHE_DIR", cache_root)
        .env_remove("DEEPIS_KERNEL_CACHE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{case}: predict --backend cuda failed: {err}");
    err
}

#[test]
fn golden_cases_on_cuda() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for case in ["tiny", "small", "readme", "mid"] {
        let out = tmp.path().join(format!("{case}.npy"));
        let err = predict_cuda(case, &out, tmp.path());
        assert!(err.contains("backend: cuda"), "{err}");
        let (dims, got) = read_npy(&out);
        let (want_dims, want) = read_npy(&data(case, "expected.npy"));
        assert_eq!(dims, want_dims, "{case}");
        let e = rel_err(&got, &want, 1.0);
        println!("{case} on cuda: rel err {e:.2e} (tol {TOL:.0e})");
        assert!(e <= TOL, "{case}: rel err {e} > {TOL}");
    }
}

#[test]
fn second_start_compiles_nothing() {
    if !gpu_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("y.npy");
    let n = SOURCES.len();
    let t0 = std::time::Instant::now();
    let first = predict_cuda("tiny", &out, tmp.path());
    let t1 = t0.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    let second = predict_cuda("tiny", &out, tmp.path());
    let t2 = t0.elapsed().as_secs_f64();
    let line = |s: &str| s.lines().find(|l| l.starts_with("kernels: ")).unwrap_or("(no kernels: line)").to_string();
    println!("first start:  {} ({t1:.2} s)\nsecond start: {} ({t2:.2} s)", line(&first), line(&second));
    assert!(first.contains(&format!("kernels: 0 cached, {n} compiled")), "{first}");
    assert!(second.contains(&format!("kernels: {n} cached, 0 compiled")), "{second}");
}

/// A batch far past the GPU's memory is refused before allocating, with the batch that fits.
#[test]
fn a_batch_past_the_gpu_memory_is_refused() {
    if !gpu_or_skip() {
        return;
    }
    let o = Command::new(BIN).args(["bench", "--backend", "cuda", "--batch", "1000", "--runs", "1", "--warmup", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{}", err.lines().last().unwrap_or(""));
    assert!(!o.status.success() && err.contains("needs") && err.contains("or fewer"), "{err}");
}
