//! The whole network on the CPU against the PyTorch oracle's golden cases (float64, stored float32).
//! Tolerance: max|a-e| / max(1, max|e|) <= 1e-4.
mod common;
use common::*;
use deepis::config::Config;
use deepis::cpu::CpuBackend;
use deepis::model::{flops, Network};
use deepis::tensor::{rel_err, Tensor};
use deepis::weights::{param_count, Weights};
use std::collections::BTreeMap;

const TOL: f32 = 1e-4;

#[test]
fn every_golden_case_matches_on_cpu() {
    println!("{:<8} {:>22} {:>12}", "case", "output (NCDHW)", "rel err");
    for case in CASES {
        let w = Weights::load(&data(case, "weights.safetensors")).unwrap();
        let x = read_5d(&data(case, "input.npy"));
        let want = read_5d(&data(case, "expected.npy"));
        let net = Network::new(CpuBackend::new(), &w).unwrap();
        let got = net.forward(&x).unwrap();
        assert_eq!(got.shape, want.shape, "{case}");
        let e = rel_err(&got.data, &want.data, 1.0);
        println!("{:<8} {:>22} {:>12.3e}", case, format!("{:?}", want.shape.ncdhw()), e);
        assert!(e <= TOL, "{case}: rel err {e:.3e} > {TOL:e}");
    }
}

/// The whole network on a real GPU (CUDA kernels) against every golden case, when there is one.
#[test]
fn every_golden_case_matches_on_cuda() {
    for case in CASES {
        let Some(dev) = cuda_device_or_skip() else { return };
        let w = Weights::load(&data(case, "weights.safetensors")).unwrap();
        let x = read_5d(&data(case, "input.npy"));
        let want = read_5d(&data(case, "expected.npy"));
        let got = Network::new(deepis::gpu::ops::GpuBackend::new(dev), &w).unwrap().forward(&x).unwrap();
        assert_eq!(got.shape, want.shape, "{case}");
        let e = rel_err(&got.data, &want.data, 1.0);
        println!("{case:<8} on cuda: rel err {e:.3e}");
        assert!(e <= TOL, "{case} on cuda: rel err {e:.3e} > {TOL:e}");
    }
}

#[test]
fn every_module_of_tiny_matches_its_activation() {
    let w = Weights::load(&data("tiny", "weights.safetensors")).unwrap();
    let x = read_5d(&data("tiny", "input.npy"));
    let acts: BTreeMap<String, Tensor> = read_safetensors(&data("tiny", "activations.safetensors"))
        .into_iter()
        .map(|(n, d, v)| (n, Tensor::from_ncdhw([d[0], d[1], d[2], d[3], d[4]], &v).unwrap()))
        .collect();
    let net = Network::new(CpuBackend::new(), &w).unwrap();
    let mut seen = BTreeMap::new();
    let mut hook = |name: &str, t: &deepis::backend::DevTensor<Vec<f32>>| {
        let want = acts.get(name).unwrap_or_else(|| panic!("{name}: no activation in the golden file"));
        assert_eq!(t.shape, want.shape, "{name}");
        seen.insert(name.to_string(), rel_err(&t.data, &want.data, 1.0));
        Ok(())
    };
    net.forward_hooked(&x, Some(&mut hook)).unwrap();
    let mut worst = 0.0f32;
    for (name, e) in &seen {
        println!("{name:<36} {e:.3e}");
        worst = worst.max(*e);
        assert!(*e <= TOL, "{name}: rel err {e:.3e}");
    }
    let missing: Vec<_> = acts.keys().filter(|k| !seen.contains_key(*k)).collect();
    assert!(missing.is_empty(), "modules never compared: {missing:?}");
    println!("{} modules, worst rel err {worst:.3e}", seen.len());
}

#[test]
fn module_prefix_of_data_parallel_is_accepted() {
    let w = Weights::load(&data("tiny", "weights.safetensors")).unwrap();
    let prefixed: Vec<_> = w.to_tensors().unwrap().into_iter().map(|(n, s, d)| (format!("module.{n}"), s, d)).collect();
    let w2 = Weights::from_tensors(&w.config, &prefixed).unwrap();
    let x = read_5d(&data("tiny", "input.npy"));
    let a = Network::new(CpuBackend::new(), &w).unwrap().forward(&x).unwrap();
    let b = Network::new(CpuBackend::new(), &w2).unwrap().forward(&x).unwrap();
    assert_eq!(a, b);
}

#[test]
fn published_model_size_and_flops() {
    let published = Config::default();
    let p = param_count(&published);
    let g = flops(&published, [128, 128, 64]) / 1e9;
    let readme = Config::readme_widths();
    let gr = flops(&readme, [128, 128, 64]) / 1e9;
    println!("published: {:.2} M parameters, {g:.1} GFLOP/volume; README widths: {gr:.1} GFLOP", p as f64 / 1e6);
    assert!((p as f64 / 1e6 - 9.6).abs() < 0.1, "{p}");
    assert!((g - 903.0).abs() < 5.0, "{g}");
    assert!((gr - 670.0).abs() < 5.0, "{gr}");
}

#[test]
fn odd_sizes_follow_pytorch_rules() {
    // stride-2 convs give ceil(s/2); max-pool floor(s/2); the decoder up-samples to each skip's size.
    let mut cfg = Config { widths: [4, 8, 8, 8, 8], trans_feature: 4, ..Config::default() };
    let w = Weights::random(&cfg, 7);
    let x = Tensor::new(deepis::tensor::Shape::new(2, [9, 5, 3], 1), (0..270).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
    let y = Network::new(CpuBackend::new(), &w).unwrap().forward(&x).unwrap();
    assert_eq!(y.shape, deepis::tensor::Shape::new(2, [9, 5, 3], 1));
    assert!(y.data.iter().all(|v| v.is_finite()));
    assert_eq!(cfg.level_sizes([9, 5, 3])[4], [1, 1, 1]);
    cfg.downsample = deepis::config::Downsample::Maxpool;
    assert_eq!(cfg.level_sizes([33, 17, 16])[4], [2, 1, 1]);
}

#[test]
fn float16_weights_load_and_run() {
    // A float16 file must give exactly what float32 weights rounded to float16 give.
    let w = Weights::load(&data("tiny", "weights.safetensors")).unwrap();
    let tensors = w.to_tensors().unwrap();
    let halves: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()))
        .collect();
    let views: Vec<_> = halves
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, Some(deepis::weights::metadata(&w.config))).unwrap();
    let w16 = Weights::from_bytes(bytes, "tiny-f16").unwrap();
    let rounded: Vec<_> = tensors
        .into_iter()
        .map(|(n, s, d)| (n, s, d.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect::<Vec<f32>>()))
        .collect();
    let w32 = Weights::from_tensors(&w.config, &rounded).unwrap();
    let x = read_5d(&data("tiny", "input.npy"));
    let a = Network::new(CpuBackend::new(), &w16).unwrap().forward(&x).unwrap();
    let b = Network::new(CpuBackend::new(), &w32).unwrap().forward(&x).unwrap();
    assert_eq!(a, b);
    let want = read_5d(&data("tiny", "expected.npy"));
    let e = rel_err(&a.data, &want.data, 1.0);
    println!("tiny with float16 weights: rel err {e:.3e} against the float32 golden output");
    assert!(e < 1e-2, "{e}");
}
