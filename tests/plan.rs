//! The fused CPU plan (`deepis::plan`): microkernels against a naive loop, the whole plan against
//! the golden cases and the unfused CPU reference, and every fusion switched off and on.
//! Tolerances: golden max|a-e| / max(1, max|e|) <= 1e-4; against the reference and between
//! fusion settings, relative to max |output|, <= 1e-4.
mod common;
use common::*;
use deepis::backend::{conv_weight_layout, ConvSpec};
use deepis::config::{Config, Downsample, Head};
use deepis::cpu::CpuBackend;
use deepis::model::Network;
use deepis::plan::kernel::{conv3d, Act, Isa, PackedConv};
use deepis::plan::memory::{disjoint, place, Life};
use deepis::plan::{Plan, PlanOptions};
use deepis::rng::Rng;
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::weights::Weights;

const TOL: f32 = 1e-4;

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// out[n][o][co] = bias + sum x[n][o*s + k - p][ci] * w[co][ci][k] (PyTorch layout), then residual, act.
fn naive_conv(x: &[f32], xs: Shape, wt: &[f32], b: &[f32], spec: &ConvSpec, res: Option<&[f32]>, act: Act) -> Vec<f32> {
    let od = spec.out_dims(xs.d);
    let (ci_n, co_n) = (spec.cin, spec.cout);
    let [k0n, k1n, k2n] = spec.k;
    let mut out = vec![0.0f32; xs.n * od[0] * od[1] * od[2] * co_n];
    for n in 0..xs.n {
        for o0 in 0..od[0] {
            for o1 in 0..od[1] {
                for o2 in 0..od[2] {
                    let oi = (((n * od[0] + o0) * od[1] + o1) * od[2] + o2) * co_n;
                    for co in 0..co_n {
                        let mut acc = b[co] as f64;
                        for k0 in 0..k0n {
                            for k1 in 0..k1n {
                                for k2 in 0..k2n {
                                    let i = [o0 * spec.stride[0] + k0, o1 * spec.stride[1] + k1, o2 * spec.stride[2] + k2];
                                    if (0..3).any(|a| i[a] < spec.pad[a] || i[a] - spec.pad[a] >= xs.d[a]) {
                                        continue;
                                    }
                                    let [i0, i1, i2] = [i[0] - spec.pad[0], i[1] - spec.pad[1], i[2] - spec.pad[2]];
                                    let xi = (((n * xs.d[0] + i0) * xs.d[1] + i1) * xs.d[2] + i2) * ci_n;
                                    for ci in 0..ci_n {
                                        let wv = wt[(((co * ci_n + ci) * k0n + k0) * k1n + k1) * k2n + k2];
                                        acc += x[xi + ci] as f64 * wv as f64;
                                    }
                                }
                            }
                        }
                        let mut y = acc as f32 + res.map_or(0.0, |r| r[oi + co]);
                        y = match act {
                            Act::None => y,
                            Act::Relu => y.max(0.0),
                            Act::Sigmoid => 1.0 / (1.0 + (-y).exp()),
                        };
                        out[oi + co] = y;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn microkernels_match_a_naive_loop_on_odd_shapes() {
    // (cin, cout, k, stride, input dims): every kernel shape of the model, with channel counts that
    // are not multiples of the vector width, odd sizes, and stride 2 on odd sizes.
    let cases: &[(usize, usize, [usize; 3], usize, [usize; 3])] = &[
        (1, 19, [3, 3, 3], 1, [5, 4, 7]),
        (7, 64, [3, 3, 3], 1, [3, 5, 13]),
        (13, 37, [3, 3, 3], 2, [5, 7, 9]),
        (16, 80, [3, 3, 3], 2, [4, 3, 11]),
        (9, 70, [1, 1, 1], 1, [3, 4, 29]),
        (33, 1, [1, 1, 1], 1, [2, 3, 7]),
        (10, 48, [1, 1, 1], 2, [5, 5, 5]),
        (12, 20, [7, 1, 1], 1, [9, 3, 5]),
        (12, 20, [1, 1, 7], 1, [3, 2, 11]),
        (12, 20, [1, 7, 1], 1, [2, 9, 5]),
        (5, 17, [3, 1, 1], 1, [4, 3, 3]),
        (5, 17, [1, 1, 3], 1, [2, 2, 3]),
        (5, 130, [1, 3, 1], 1, [2, 5, 14]),
        (3, 8, [1, 1, 7], 1, [1, 1, 2]),
    ];
    let mut rng = Rng::new(11);
    println!("{:<8} {:>4} {:>4} {:<10} {:>2} {:<12} {:<8} {:>10}", "isa", "cin", "cout", "k", "s", "input", "epi", "rel err");
    for isa in Isa::all_available() {
        for &(cin, cout, k, s, d) in cases {
            let spec = ConvSpec { cin, cout, k, stride: [s; 3], pad: k.map(|k| (k - 1) / 2) };
            let xs = Shape::new(2, d, cin);
            let x = randn(&mut rng, xs.len());
            let wt = randn(&mut rng, spec.weight_len());
            let b = randn(&mut rng, cout);
            let od = spec.out_dims(d);
            let olen = 2 * od[0] * od[1] * od[2] * cout;
            let res = randn(&mut rng, olen);
            let pc = PackedConv::new(spec, &conv_weight_layout(&spec, &wt), Some(&b), isa);
            for (epi, r, act) in [("plain", None, Act::None), ("res+relu", Some(&res[..]), Act::Relu), ("sigmoid", None, Act::Sigmoid)] {
                let want = naive_conv(&x, xs, &wt, &b, &spec, r, act);
                let mut got = vec![f32::NAN; olen];
                conv3d(&pc, &x, xs, &mut got, r, act);
                let e = rel_err(&got, &want, 1.0);
                println!("{:<8} {cin:>4} {cout:>4} {:<10} {s:>2} {:<12} {epi:<8} {e:>10.2e}", format!("{isa:?}"), format!("{k:?}"), format!("{d:?}"));
                assert!(e <= 1e-5, "{isa:?} {spec:?} {d:?} {epi}: rel err {e:e}");
            }
        }
    }
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
        let mut v = vec![
            ("fold_bn off", PlanOptions { fold_bn: false, ..d }),
            ("fuse_epilogue off", PlanOptions { fuse_epilogue: false, ..d }),
            ("move_conv1_low off", PlanOptions { move_conv1_low: false, ..d }),
            ("merge_1x1 off", PlanOptions { merge_1x1: false, ..d }),
            ("fuse_gcn_planes off", PlanOptions { fuse_gcn_planes: false, ..d }),
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
