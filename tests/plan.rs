//! The fused CPU plan (`deepis::plan`): the buffer planner, the whole plan against the golden cases
//! and the unfused CPU reference, and every fusion switched off and on (its microkernels, every
//! ISA and epilogue, are rows of tests/ops_table.rs).
//! Tolerances: golden max|a-e| / max(1, max|e|) <= 1e-4; against the reference and between
//! fusion settings, relative to max |output|, <= 1e-4.
mod common;
use common::*;
use deepis::config::{Config, Downsample, Head};
use deepis::cpu::CpuBackend;
use deepis::model::Network;
use deepis::plan::kernel::Isa;
use deepis::plan::memory::{disjoint, place, Life};
use deepis::graph::passes::Passes;
use deepis::plan::{Plan, PlanOptions};
use deepis::rng::Rng;
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::weights::Weights;

const TOL: f32 = 1e-4;

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn buffer_planner_never_overlaps_live_values() {
    let mut rng = Rng::new(3);
    for _ in 0..50 {
        let lives: Vec<Life> = (0..40)
            .map(|_| {
                let first = (rng.uniform() * 30.0) as usize;
                Life { len: 1 + (rng.uniform() * 1000.0) as usize, first, last: first + (rng.uniform() * 8.0) as usize }
            })
            .collect();
        for reuse in [false, true] {
            let (off, top) = place(&lives, reuse);
            assert!(disjoint(&lives, &off), "overlap (reuse {reuse})");
            assert!(lives.iter().zip(&off).all(|(l, &o)| o + l.len <= top));
        }
    }
}

fn reference(w: &Weights, x: &Tensor) -> Tensor {
    Network::new(CpuBackend::new(), w).unwrap().forward(x).unwrap()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
}

#[test]
fn fused_plan_matches_golden_cases_and_the_reference() {
    println!("{:<8} {:>12} {:>12} {:>10}  plan", "case", "vs golden", "vs cpu ref", "peak MiB");
    for case in CASES {
        let w = Weights::load(&data(case, "weights.safetensors")).unwrap();
        let x = read_5d(&data(case, "input.npy"));
        let want = read_5d(&data(case, "expected.npy"));
        let plan = Plan::new(&w, x.shape.d, PlanOptions::default()).unwrap();
        let got = plan.run(&x).unwrap();
        assert_eq!(got.shape, want.shape, "{case}");
        let eg = rel_err(&got.data, &want.data, 1.0);
        let r = reference(&w, &x);
        let er = rel_err(&got.data, &r.data, max_abs(&r.data).max(f32::MIN_POSITIVE));
        println!("{case:<8} {eg:>12.3e} {er:>12.3e} {:>10.2}  {}", plan.peak_bytes() as f64 / 1048576.0, plan.summary());
        assert!(eg <= TOL, "{case}: vs golden {eg:e}");
        assert!(er <= TOL, "{case}: vs reference {er:e}");
        // a second run reuses the arena and gives the same output
        assert_eq!(plan.run(&x).unwrap(), got, "{case}: second run differs");
    }
}

/// Every fusion switched off alone, all off, and every ISA, against the default plan.
#[test]
fn each_fusion_switches_off_and_on_with_the_same_result() {
    let variants: Vec<(&str, PlanOptions)> = {
        let d = PlanOptions::default();
        let on = Passes::default();
        let off = |passes| PlanOptions { passes, ..d };
        let mut v = vec![
            ("fold_bn off", off(Passes { fold_bn: false, ..on })),
            ("fuse_epilogue off", off(Passes { fuse_epilogue: false, ..on })),
            ("move_conv1_low off", off(Passes { move_conv1_low: false, ..on })),
            ("merge_1x1 off", off(Passes { merge_1x1: false, ..on })),
            ("fuse_gcn_planes off", off(Passes { fuse_gcn_planes: false, ..on })),
            ("reuse_buffers off", PlanOptions { reuse_buffers: false, ..d }),
            ("all off", PlanOptions::unfused()),
        ];
        for isa in Isa::all_available() {
            v.push((match isa {
                Isa::Avx512 => "isa avx512",
                Isa::Avx2Fma => "isa avx2+fma",
                Isa::Portable => "isa portable",
            }, PlanOptions { isa: Some(isa), ..d }));
        }
        v
    };
    for case in ["tiny", "readme", "mid"] {
        let w = Weights::load(&data(case, "weights.safetensors")).unwrap();
        let x = read_5d(&data(case, "input.npy"));
        let on = Plan::new(&w, x.shape.d, PlanOptions::default()).unwrap();
        let base = on.run(&x).unwrap();
        let scale = max_abs(&base.data).max(f32::MIN_POSITIVE);
        for (name, opt) in &variants {
            let p = Plan::new(&w, x.shape.d, *opt).unwrap();
            let y = p.run(&x).unwrap();
            let e = rel_err(&y.data, &base.data, scale);
            println!("{case:<8} {name:<22} {e:.3e}  {} steps, arena {:.2} MiB", p.steps().len(), p.arena_bytes() as f64 / 1048576.0);
            assert!(e <= TOL, "{case} {name}: {e:e}");
        }
        // the fusions do remove work and memory
        let off = Plan::new(&w, x.shape.d, PlanOptions::unfused()).unwrap();
        assert!(on.steps().len() < off.steps().len());
        assert!(on.arena_bytes() < off.arena_bytes());
    }
}

/// Odd sizes, max-pool, sigmoid head with several channels, input scaling, batch of 2.
#[test]
fn plan_follows_the_reference_on_odd_configs() {
    let cfgs = [
        Config { widths: [4, 8, 8, 16, 16], trans_feature: 6, gcn_kernels: [3, 5, 7, 3], input_offset: 1.5, input_scale: 2.0, ..Config::default() },
        Config { widths: [6, 8, 10, 12, 16], trans_feature: 4, downsample: Downsample::Maxpool, head: Head::Sigmoid, out_channels: 3, blocks: [1, 2, 1, 1], ..Config::default() },
    ];
    let sizes = [[9, 5, 3], [17, 16, 19]];
    for (cfg, d) in cfgs.iter().zip(sizes) {
        let w = Weights::random(cfg, 5);
        let shape = Shape::new(2, d, 1);
        let mut rng = Rng::new(9);
        let x = Tensor::new(shape, randn(&mut rng, shape.len())).unwrap();
        let r = reference(&w, &x);
        for opt in [PlanOptions::default(), PlanOptions::unfused()] {
            let y = Plan::new(&w, d, opt).unwrap().run(&x).unwrap();
            assert_eq!(y.shape, r.shape);
            let e = rel_err(&y.data, &r.data, max_abs(&r.data));
            println!("{d:?} {:?} {:?}: {e:.3e}", cfg.downsample, cfg.head);
            assert!(e <= TOL, "{d:?}: {e:e}");
        }
    }
}

#[test]
fn plan_refuses_wrong_inputs() {
    let w = Weights::load(&data("tiny", "weights.safetensors")).unwrap();
    let x = read_5d(&data("tiny", "input.npy"));
    let plan = Plan::new(&w, x.shape.d, PlanOptions::default()).unwrap();
    let other = Tensor::zeros(Shape::new(1, [x.shape.d[0] + 1, x.shape.d[1], x.shape.d[2]], 1));
    assert!(plan.run(&other).is_err());
    let two = Tensor::zeros(x.shape.with_c(2));
    assert!(plan.run(&two).is_err());
}

/// Timing of the published model on a 128x128x64 volume (not a test: `cargo test --release
/// --test plan -- --ignored --nocapture time_published`); `deepis bench` is the real benchmark.
#[test]
#[ignore]
fn time_published() {
    let cfg = match std::env::var("DEEPIS_CFG").as_deref() {
        Ok("readme") => Config::readme_widths(),
        _ => Config::default(),
    };
    let d = [128, 128, 64];
    let w = Weights::random(&cfg, 1);
    let shape = Shape::new(1, d, 1);
    let mut rng = Rng::new(7);
    let x = Tensor::new(shape, randn(&mut rng, shape.len())).unwrap();
    let plan = Plan::new(&w, d, PlanOptions::default()).unwrap();
    println!("{}", plan.summary());
    let gf = deepis::model::flops(&cfg, d) / 1e9;
    for i in 0..3 {
        let t = std::time::Instant::now();
        plan.run(&x).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!("run {i}: {s:.3} s, {:.1} GFLOP/s", gf / s);
    }
}
