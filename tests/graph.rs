//! The network as one graph: a changed block is one edit of the network description (here a
//! bottleneck with a second 3x3x3 conv), and the reference interpreter and the fused CPU plan
//! both run the variant unchanged and agree (float32: max|a-e| / max(1, max|e|) <= 1e-4).
use deepis::config::Config;
use deepis::cpu::CpuBackend;
use deepis::graph::{self, Arch, Builder, Graph, Mode, NodeId, Op, ParamKind};
use deepis::model::Network;
use deepis::graph::passes::Passes;
use deepis::plan::{Plan, PlanOptions};
use deepis::rng::Rng;
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::weights::Weights;

/// The published bottleneck with one more Sequential(conv 3x3x3, BN, ReLU), `conv3b`, after conv3.
fn bottleneck_two_3x3(b: &mut Builder, name: &str, x: NodeId, mid: usize, cout: usize, stride: usize, project: bool) -> NodeId {
    let h = b.conv_bn(&format!("{name}.reduce"), x, mid, [1, 1, 1], 1, true);
    let h = b.conv_bn(&format!("{name}.conv3"), h, mid, [3, 3, 3], stride, true);
    let h = b.conv_bn(&format!("{name}.conv3b"), h, mid, [3, 3, 3], 1, true);
    let h = b.conv_bn(&format!("{name}.increase"), h, cout, [1, 1, 1], 1, false);
    let s = if project { b.conv_bn(&format!("{name}.proj"), x, cout, [1, 1, 1], stride, false) } else { x };
    let y = b.add(&format!("{name}.add"), h, s);
    let y = b.relu(&format!("{name}.relu"), y, false);
    b.module(y, name)
}

fn tiny_config() -> Config {
    Config { widths: [4, 8, 8, 16, 16], trans_feature: 4, blocks: [1, 2, 1, 1], gcn_kernels: [3, 3, 3, 3], ..Config::default() }
}

/// Random tensors for every parameter of `g` (the scheme of `Weights::random`).
fn random_weights(cfg: &Config, g: &Graph, seed: u64) -> Weights {
    Weights::random_for(cfg, g.params(), seed)
}

#[test]
fn a_variant_block_runs_on_the_reference_and_the_plan_alike() {
    let cfg = tiny_config();
    let d = [9, 12, 7];
    let arch = Arch { bottleneck: bottleneck_two_3x3, ..Arch::DEEPIS };
    let g = Graph::with_arch(&cfg, Mode::Eval, d, &arch);
    let std = Graph::new(&cfg, Mode::Eval, d);
    // the edit shows in the graph: 5 bottlenecks, each with one more conv and batch norm
    let count = |g: &Graph, f: fn(&Op) -> bool| g.nodes.iter().filter(|n| f(&n.op)).count();
    assert_eq!(count(&g, |o| matches!(o, Op::Conv { .. })), count(&std, |o| matches!(o, Op::Conv { .. })) + 5);
    assert_eq!(count(&g, |o| *o == Op::BatchNorm), count(&std, |o| *o == Op::BatchNorm) + 5);
    assert!(g.flops() > std.flops());
    let extra: Vec<String> = g.params().iter().filter(|p| !std.params().contains(p)).map(|p| p.name.clone()).collect();
    assert_eq!(extra.len(), 5 * 6, "{extra:?}");
    assert!(extra.iter().all(|n| n.contains(".conv3b.")), "{extra:?}");

    let w = random_weights(&cfg, &g, 7);
    let mut rng = Rng::new(3);
    let x = Tensor::new(Shape::new(1, d, 1), (0..d.iter().product::<usize>()).map(|_| rng.normal() as f32).collect()).unwrap();
    let reference = Network::with_arch(CpuBackend::new(), &w, arch).unwrap().forward(&x).unwrap();
    for (label, opt) in [("fused", PlanOptions::default()), ("unfused", PlanOptions::unfused())] {
        let plan = Plan::from_graph(&g, &w, opt).unwrap();
        let y = plan.run(&x).unwrap();
        let e = rel_err(&y.data, &reference.data, 1.0);
        println!("variant {label:<8} plan vs reference rel err {e:.3e} ({})", plan.summary());
        assert!(e <= 1e-4, "{label}: rel err {e:.3e}");
    }
    // the published network on the same weights (conv3b ignored) gives another output
    let published = Network::new(CpuBackend::new(), &w).unwrap().forward(&x).unwrap();
    let e = rel_err(&published.data, &reference.data, 1.0);
    println!("published vs variant rel err {e:.3e}");
    assert!(e > 1e-3, "the variant's extra convs changed nothing ({e:.3e})");
}

#[test]
fn the_parameter_list_is_the_state_dict() {
    let cfg = Config::default();
    let specs = graph::param_specs(&cfg);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    // state_dict() order of the oracle's first and last tensors, and the unused ConBR0
    assert_eq!(&names[..3], ["conv1.conv1.0.weight", "conv1.conv1.0.bias", "conv1.conv1.1.weight"]);
    assert_eq!(names[names.len() - 1], "classifier4.4.bias");
    let i0 = names.iter().position(|n| *n == "ConBR0.conv1.weight").unwrap();
    assert!(names[i0 - 1].starts_with("gcn5.") && names[i0 + 6] == "ConBR1.conv1.weight", "{:?}", &names[i0 - 1..i0 + 7]);
    assert!(specs.iter().filter(|s| s.name.starts_with("ConBR0.")).all(|s| s.used == deepis::weights::Use::Unused));
    assert!(specs.iter().filter(|s| s.name.starts_with("classifier")).all(|s| s.used == deepis::weights::Use::Training));
    assert_eq!(specs.len(), names.iter().collect::<std::collections::HashSet<_>>().len(), "a name twice");
    // published model: 4 encoder levels of 2 bottlenecks (4 convs + 4 BNs at j = 0, 3 + 3 after)
    let convs = specs.iter().filter(|s| s.kind == ParamKind::ConvWeight).count();
    assert_eq!(convs, 2 + 4 * 7 + 1 + 4 * 6 + 5 * 3 + 1 + 2 * 2);
}

#[test]
fn each_pass_alone_keeps_the_output_and_changes_the_plan() {
    let cfg = tiny_config();
    let d = [9, 12, 7];
    let w = Weights::random(&cfg, 11);
    let mut rng = Rng::new(5);
    let x = Tensor::new(Shape::new(1, d, 1), (0..d.iter().product::<usize>()).map(|_| rng.normal() as f32).collect()).unwrap();
    let reference = Network::new(CpuBackend::new(), &w).unwrap().forward(&x).unwrap();
    let none = Plan::new(&w, d, PlanOptions::unfused()).unwrap();
    let u = PlanOptions::unfused();
    let with = |passes| PlanOptions { passes, ..u };
    let no = Passes::none();
    // merge_1x1 merges what move_conv1_low moved (and gcn1 with it), so it is shown on top of that
    let mv = with(Passes { move_conv1_low: true, ..no });
    for (label, opt, base) in [
        ("fold_bn", with(Passes { fold_bn: true, ..no }), &u),
        ("fuse_epilogue", with(Passes { fuse_epilogue: true, ..no }), &u),
        ("move_conv1_low", mv, &u),
        ("merge_1x1 (+move)", with(Passes { merge_1x1: true, ..mv.passes }), &mv),
        ("fuse_gcn_planes", with(Passes { fuse_gcn_planes: true, ..no }), &u),
    ] {
        let plan = Plan::new(&w, d, opt).unwrap();
        let before = Plan::new(&w, d, *base).unwrap();
        let e = rel_err(&plan.run(&x).unwrap().data, &reference.data, 1.0);
        println!("{label:<20} rel err {e:.3e}; {} steps / {} convs (without it: {} / {})", plan.steps().len(), plan.summary(), before.steps().len(), none.steps().len());
        assert!(e <= 1e-4, "{label}: rel err {e:.3e}");
        assert_ne!(plan.summary(), before.summary(), "{label} changed nothing");
    }
}
