//! The GPU inference plan (`gpu::plan`) on the kernel emulator, against the golden cases.
//!
//! fp32: within 1e-4 of the float64 oracle (max|a-e| / max(1, max|e|), as every engine), and
//! within 1e-5 of the CPU plan (both lower the same passed graph; they differ by f32 summation order).
//!
//! fp16 / bf16: the plan rounds at documented points (gpu/plan.rs): every conv's input and residual,
//! every conv weight (the folded f32 weight rounded once), every conv output but the head's and a
//! sigmoid's, every up-sample + add; everything else is f32. `rounded_run` below is an f64 interpreter of the same passed
//! graph that rounds to the half type at exactly those points and nowhere else (an independent CPU
//! run with the same rounding points). gpu and sim are the same rounding process at the same
//! points (and up-sample + add, which the plan runs as one kernel, rounds its sum); they differ only in the arithmetic between them (f32 with the kernels' summation order
//! vs f64: the fp32 engines' whole-network error, <= 1e-4 relative). Where that moves a value
//! across a rounding boundary, one half rounding lands the other way; the half-ulp step it makes
//! then reaches the next layer's roundings, which flip in turn, so past a few layers gpu and sim
//! carry independent rounding errors of the same distribution (measured: |gpu - sim| is 0.7-1.2
//! e_sim). The claim tested is that the GPU's error is the size of the sim's:
//!   e_gpu <= 2 e_sim + 1e-4
//! (e = max|a - oracle| / max(1, max|oracle|); measured e_gpu / e_sim 0.9-1.3). A layout or
//! epilogue bug is O(1): the planted fault below (one residual add skipped) is far above it.
//!
//! tf32: the same claim and bound, with the tf32 plan's rounding points (gpu/plan.rs): the input
//! and the weights of every conv rounded to tf32 (10 mantissa bits, to nearest, ties away);
//! activations, residuals, outputs and up-sample + adds stay f32. `rounded_run` rounds its f64
//! values there to tf32 directly (`tf32`), the GPU its f32 values (cvt.rna).
//!
//! Emulator time: tiny, small (batch 2) and readme (max-pool, sigmoid head, input scaling); mid
//! (64x64x32, widths 16..256) is left to the GPU (minutes on the emulator).
mod common;
use common::*;
use deepis::backend::ConvSpec;
use deepis::gpu::emu::{EmuDevice, Schedule};
use deepis::gpu::plan::{GpuPlan, MmaTile, Precision};
use deepis::graph::passes::{Act, Lin, Passes, WOp, Weighted};
use deepis::graph::{Graph, Mode};
use deepis::plan::{Plan, PlanOptions};
use deepis::tensor::{rel_err, Shape, Tensor};
use deepis::weights::Weights;
use std::time::Instant;

const CASES: [&str; 3] = ["tiny", "small", "readme"];
const ORACLE_TOL: f32 = 1e-4;
const CPU_PLAN_TOL: f32 = 1e-5;

fn passed(w: &Weights, d: [usize; 3]) -> Weighted {
    let g = Graph::new(&w.config, Mode::Eval, d);
    let mut wg = Weighted::new(&g, &|n| w.get(n)).unwrap();
    wg.optimise(Passes::default());
    wg
}

fn case(name: &str) -> (Weights, Tensor, Tensor) {
    (Weights::load(&data(name, "weights.safetensors")).unwrap(), read_5d(&data(name, "input.npy")), read_5d(&data(name, "expected.npy")))
}

fn run(w: &Weighted, x: &Tensor, p: Precision, schedule: Schedule) -> Tensor {
    GpuPlan::from_weighted(EmuDevice::with_schedule(schedule), w, x.shape.n, p).unwrap().run(x).unwrap()
}

#[test]
fn fp32_plan_matches_the_oracle_and_the_cpu_plan() {
    println!("{:<8} {:>10} {:>12} {:>12} {:>8}", "case", "precision", "vs oracle", "vs cpu plan", "emu s");
    for name in CASES {
        let (w, x, want) = case(name);
        let t0 = Instant::now();
        let plan = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, x.shape.n, Precision::Fp32).unwrap();
        let got = plan.run(&x).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let cpu = Plan::new(&w, x.shape.d, PlanOptions::default()).unwrap().run(&x).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        let (e, ec) = (rel_err(&got.data, &want.data, 1.0), rel_err(&got.data, &cpu.data, 1.0));
        println!("{name:<8} {:>10} {e:>12.3e} {ec:>12.3e} {secs:>8.1}   {}", "fp32", plan.summary());
        assert!(e <= ORACLE_TOL, "{name}: rel err {e:.3e} > {ORACLE_TOL:e} against the oracle");
        assert!(ec <= CPU_PLAN_TOL, "{name}: rel err {ec:.3e} > {CPU_PLAN_TOL:e} against the CPU plan");
    }
}

#[test]
fn reduced_precision_plans_are_within_the_bound_of_the_same_rounding_on_the_cpu() {
    println!("{:<8} {:>6} {:>11} {:>11} {:>11} {:>11} {:>8}", "case", "prec", "e_gpu", "e_sim", "|gpu-sim|", "bound", "emu s");
    for name in CASES {
        let (w, x, want) = case(name);
        let wg = passed(&w, x.shape.d);
        let exact = rounded_run(&wg, &x, None);
        let e0 = rel_err(&exact.data, &want.data, 1.0);
        println!("{name:<8} {:>6} {:>11} {e0:>11.3e}   (the interpreter unrounded, a check of it)", "f64", "");
        assert!(e0 <= 1e-5, "{name}: the f64 interpreter is {e0:.3e} from the oracle");
        for p in [Precision::Tf32, Precision::Fp16, Precision::Bf16] {
            let t0 = Instant::now();
            let got = run(&wg, &x, p, Schedule::Forward);
            let secs = t0.elapsed().as_secs_f64();
            let sim = rounded_run(&wg, &x, Some(p));
            let (eg, es, d) = (rel_err(&got.data, &want.data, 1.0), rel_err(&sim.data, &want.data, 1.0), rel_err(&got.data, &sim.data, 1.0));
            let bound = 2.0 * es + ORACLE_TOL;
            println!("{name:<8} {:>6} {eg:>11.3e} {es:>11.3e} {d:>11.3e} {bound:>11.3e} {secs:>8.1}", p.name());
            assert!(eg <= bound, "{name} {}: e_gpu {eg:.3e} > bound {bound:.3e}", p.name());
        }
    }
}

#[test]
fn both_schedules_agree_bit_for_bit_in_every_precision() {
    let (w, x, _) = case("tiny");
    let wg = passed(&w, x.shape.d);
    for p in Precision::ALL {
        let (a, b) = (run(&wg, &x, p, Schedule::Forward), run(&wg, &x, p, Schedule::Reverse));
        assert!(same_bits(&a.data, &b.data), "{}: forward and reverse schedules differ", p.name());
    }
}

#[test]
fn a_skipped_residual_add_fails_every_precision() {
    let (w, x, want) = case("tiny");
    let mut wg = passed(&w, x.shape.d);
    let sim = |p| rel_err(&rounded_run(&wg, &x, Some(p)).data, &want.data, 1.0);
    let bounds: Vec<f32> = [Precision::Tf32, Precision::Fp16, Precision::Bf16].into_iter().map(|p| 2.0 * sim(p) + ORACLE_TOL).collect();
    // the first conv that adds a residual in its epilogue (a bottleneck's increase conv) loses it
    let i = wg.order().into_iter().find(|&i| matches!(wg.nodes[i].op, WOp::Conv { .. }) && wg.nodes[i].inputs.len() == 2).expect("a fused residual");
    println!("planted: {} without its residual add", wg.nodes[i].name);
    wg.nodes[i].inputs.truncate(1);
    for (p, bound) in [(Precision::Fp32, ORACLE_TOL), (Precision::Tf32, bounds[0]), (Precision::Fp16, bounds[1]), (Precision::Bf16, bounds[2])] {
        let e = rel_err(&run(&wg, &x, p, Schedule::Forward).data, &want.data, 1.0);
        println!("{}: rel err {e:.3e}, bound {bound:.3e}, {:.0}x", p.name(), e / bound);
        assert!(e > bound, "{}: the planted fault went unnoticed ({e:.3e} <= {bound:.3e})", p.name());
    }
}

/// The plan with its stride-1, 64k-channel convolutions on wgmma gives, on the emulator, the
/// mma.sync plan's output bit for bit (both kernels round their sums at the same points there: per
/// chunk, tap and 16 halves or 8 tf32 channels), in tf32, fp16 and bf16, on every golden case; an
/// fp32 plan refuses it.
#[test]
fn wgmma_plans_equal_the_mma_sync_plans_bit_for_bit() {
    let mut total = 0;
    for name in CASES {
        let (w, x, _) = case(name);
        let wg = passed(&w, x.shape.d);
        for p in [Precision::Tf32, Precision::Fp16, Precision::Bf16] {
            let mut plan = GpuPlan::from_weighted(EmuDevice::new(), &wg, x.shape.n, p).unwrap();
            let mma = plan.run(&x).unwrap();
            let n = plan.set_wgmma(true).unwrap();
            assert_eq!(n, plan.wgmma_convs());
            let wgmma = plan.run(&x).unwrap();
            assert_eq!(launched(&plan, "conv3d_wgmma_") > 0, n > 0, "{name} {}: {n} convs on wgmma, launches {:?}", p.name(), plan.device().launch_counts());
            assert!(same_bits(&mma.data, &wgmma.data), "{name} {}: the wgmma plan differs from the mma.sync plan", p.name());
            println!("{name:<8} {}: {n} of the plan's convs on wgmma, output bit for bit the mma.sync plan's ({})", p.name(), plan.summary());
            total += n;
        }
        let mut plan = GpuPlan::from_weighted(EmuDevice::new(), &wg, x.shape.n, Precision::Fp32).unwrap();
        let err = plan.set_wgmma(true).expect_err("wgmma in fp32").to_string();
        assert!(err.contains("not fp32"), "{err}");
    }
    assert!(total > 0, "no golden case has a conv the wgmma kernel takes: the test checked nothing");
}

/// Launches so far of the kernels whose names start with `prefix`, on the plan's emulator.
fn launched(plan: &GpuPlan<EmuDevice>, prefix: &str) -> usize {
    plan.device().launch_counts().iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, n)| n).sum()
}

/// The wide warp tile (m64: 4 warps of 64 voxels) sums the same products in the same order as the
/// default m32, so its plan's output is the m32 plan's bit for bit, in tf32, fp16 and bf16 (and in
/// bf16 beside wgmma on the convs it takes), and the launches show the wide kernels ran instead;
/// an fp32 plan refuses it.
#[test]
fn m64_warp_tile_plans_equal_the_m32_plans_bit_for_bit() {
    for name in CASES {
        let (w, x, _) = case(name);
        let wg = passed(&w, x.shape.d);
        for (p, wgmma) in [(Precision::Tf32, false), (Precision::Fp16, false), (Precision::Bf16, false), (Precision::Bf16, true)] {
            let mut plan = GpuPlan::from_weighted(EmuDevice::new(), &wg, x.shape.n, p).unwrap();
            let on_wgmma = plan.set_wgmma(wgmma).unwrap();
            let m32 = plan.run(&x).unwrap();
            let narrow = launched(&plan, "conv3d_tc_") - launched(&plan, "conv3d_tc_wide_");
            assert!(narrow > 0 && launched(&plan, "conv3d_tc_wide_") == 0, "{name} {}: the m32 plan's launches", p.name());
            let n = plan.set_mma_tile(MmaTile::M64).unwrap();
            assert_eq!(plan.wgmma_convs(), on_wgmma, "the m64 tile took convs off wgmma");
            assert!(plan.summary().contains("warp tile m64"), "{}", plan.summary());
            let m64 = plan.run(&x).unwrap();
            let wide = launched(&plan, "conv3d_tc_wide_");
            assert_eq!(launched(&plan, "conv3d_tc_") - wide, narrow, "{name} {}: m32 kernels in the m64 plan's run", p.name());
            assert_eq!(wide, narrow, "{name} {}: {wide} wide launches for the m32 plan's {narrow}", p.name());
            assert!(same_bits(&m32.data, &m64.data), "{name} {} (wgmma {wgmma}): the m64 plan differs from the m32 plan", p.name());
            println!("{name:<8} {} wgmma {wgmma}: {n} convs ({wide} launches) on the m64 warp tile, output bit for bit the m32 plan's", p.name());
        }
        let mut plan = GpuPlan::from_weighted(EmuDevice::new(), &wg, x.shape.n, Precision::Fp32).unwrap();
        let err = plan.set_mma_tile(MmaTile::M64).expect_err("m64 in fp32").to_string();
        assert!(err.contains("not fp32"), "{err}");
    }
}

/// The same checks on a real GPU, when there is one: fp32 against the oracle, tf32 / fp16 / bf16 within
/// the bound above (every golden case, mid included).
#[test]
fn cuda_plans_are_within_the_bounds() {
    for name in ["tiny", "small", "readme", "mid"] {
        let (w, x, want) = case(name);
        let wg = passed(&w, x.shape.d);
        for p in Precision::ALL {
            let Some(dev) = cuda_device_or_skip() else { return };
            let got = GpuPlan::from_weighted(dev, &wg, x.shape.n, p).unwrap().run(&x).unwrap();
            let e = rel_err(&got.data, &want.data, 1.0);
            let bound = match p {
                Precision::Fp32 => ORACLE_TOL,
                p => 2.0 * rel_err(&rounded_run(&wg, &x, Some(p)).data, &want.data, 1.0) + ORACLE_TOL,
            };
            println!("{name:<8} {} on cuda: rel err {e:.3e}, bound {bound:.3e}", p.name());
            assert!(e <= bound, "{name} {} on cuda: rel err {e:.3e} > {bound:.3e}", p.name());
            let Some(dev) = cuda_device_or_skip() else { return };
            if p != Precision::Fp32 && deepis::gpu::Device::has_wgmma(&dev) {
                let mut plan = GpuPlan::from_weighted(dev, &wg, x.shape.n, p).unwrap();
                let n = plan.set_wgmma(true).unwrap();
                let e = rel_err(&plan.run(&x).unwrap().data, &want.data, 1.0);
                println!("{name:<8} {} on cuda, {n} convs on wgmma: rel err {e:.3e}, bound {bound:.3e}", p.name());
                assert!(e <= bound, "{name} {} on cuda with wgmma: rel err {e:.3e} > {bound:.3e}", p.name());
            }
        }
    }
}

/// Three volumes of `x` (as given, mirrored around 1, halved): two batches of 2, the last padded.
fn three_of(x: &Tensor) -> Tensor {
    let data = [x.data.clone(), x.data.iter().map(|v| 2.0 - v).collect(), x.data.iter().map(|v| v * 0.5).collect()].concat();
    Tensor::new(Shape::new(3, x.shape.d, 1), data).unwrap()
}

/// `plan` run on `three` as one graph replayed per batch, then with its launches queued one by
/// one: the two outputs' bits, which must be equal (same plan, same kernels, same order).
fn replayed_and_queued<D: deepis::gpu::Device>(plan: &mut GpuPlan<D>, three: &Tensor) -> (Vec<u32>, Vec<u32>) {
    let bits = |t: Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    plan.set_graph(true);
    assert!(plan.summary().contains("replayed as one graph"), "{}", plan.summary());
    let replayed = bits(plan.run(three).unwrap());
    plan.set_graph(false);
    assert!(!plan.uses_graph() && plan.summary().contains("queued one by one"));
    (replayed, bits(plan.run(three).unwrap()))
}

/// The forward pass recorded once as a graph and replayed per batch gives, bit for bit, what the
/// same launches queued one by one give: three volumes in batches of 2 are two replays with
/// different inputs (and a padded last batch), so a graph that baked in its first input, or lost
/// a launch, differs.
#[test]
fn graph_replay_is_bit_identical_to_launches_one_by_one() {
    let (w, x, _) = case("tiny");
    let three = three_of(&x);
    for p in [Precision::Fp32, Precision::Fp16] {
        let mut plan = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 2, p).unwrap();
        let (replayed, queued) = replayed_and_queued(&mut plan, &three);
        assert_eq!(replayed, queued, "{p:?}: graph replay vs launches one by one");
        let per = replayed.len() / 3;
        assert_ne!(replayed[..per], replayed[per..2 * per], "{p:?}: two inputs gave one output");
        println!("{p:?}: 3 volumes in 2 replays, bit-identical to {} launches per batch queued one by one", plan.launches());
    }
}

/// The same on a real GPU (a CUDA graph), in every precision, on the readme case.
#[test]
fn cuda_graph_replay_is_bit_identical_to_launches_one_by_one() {
    let (w, x, _) = case("readme");
    let three = three_of(&x);
    for p in Precision::ALL {
        let Some(dev) = cuda_device_or_skip() else { return };
        let mut plan = GpuPlan::new(dev, &w, x.shape.d, 2, p).unwrap();
        let (replayed, queued) = replayed_and_queued(&mut plan, &three);
        assert_eq!(replayed, queued, "{p:?} on cuda: CUDA graph replay vs launches one by one");
        println!("{p:?} on cuda: CUDA graph replay equal bit for bit to {} launches queued one by one", plan.launches());
    }
}

/// Five different volumes: each a function of `x`.
fn five_of(x: &Tensor) -> Tensor {
    let f: [fn(f32) -> f32; 5] = [|v| v, |v| 2.0 - v, |v| 0.5 * v, |v| -v, |v| v + 1.0];
    let data: Vec<f32> = f.iter().flat_map(|f| x.data.iter().map(|&v| f(v))).collect();
    Tensor::new(Shape::new(5, x.shape.d, 1), data).unwrap()
}

/// `plan` on `five` in one run (batches pipelined through the two slots: slot 0 serves batches
/// 0, 2, 4) and volume by volume in runs of their own (one batch in flight): the bits of both,
/// which must be equal. A batch collected from the wrong slot, or a forward pass on a slot's old
/// input, differs; an order the pipeline misses is an emulator error.
fn pipelined_and_alone<D: deepis::gpu::Device>(plan: &GpuPlan<D>, five: &Tensor) -> (Vec<u32>, Vec<u32>) {
    let bits = |t: &[f32]| t.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    let per = five.data.len() / 5;
    let piped = bits(&plan.run(five).unwrap().data);
    let alone = (0..5)
        .flat_map(|i| {
            let one = Tensor::new(Shape::new(1, five.shape.d, 1), five.data[i * per..(i + 1) * per].to_vec()).unwrap();
            bits(&plan.run(&one).unwrap().data)
        })
        .collect();
    (piped, alone)
}

/// Batches in flight two at a time give what each gives alone, in every precision, replayed as
/// a graph per slot and queued one by one.
#[test]
fn pipelined_batches_equal_each_batch_run_alone() {
    let (w, x, _) = case("tiny");
    let five = five_of(&x);
    for p in [Precision::Fp32, Precision::Bf16] {
        for graph in [true, false] {
            let mut plan = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, p).unwrap();
            plan.set_graph(graph);
            let (piped, alone) = pipelined_and_alone(&plan, &five);
            assert_eq!(piped, alone, "{p:?}, graph {graph}: pipelined vs alone");
            let per = piped.len() / 5;
            for i in 1..5 {
                assert_ne!(piped[..per], piped[i * per..(i + 1) * per], "{p:?}: volumes 0 and {i} gave one output");
            }
            println!("{p:?}, graph {graph}: 5 volumes pipelined in batches of 1 = each alone, bit for bit, every order checked");
        }
    }
}

/// `submit` / `collect`: two batches in flight and no third, a batch given back only to the plan
/// that queued it, a batch no larger than the plan's; each refusal says why and leaves the plan
/// as it was.
#[test]
fn a_third_batch_in_flight_and_a_ticket_of_another_plan_are_refused() {
    let (w, x, _) = case("tiny");
    let five = five_of(&x);
    let per = x.data.len();
    let one = |i: usize| Tensor::new(Shape::new(1, x.shape.d, 1), five.data[i * per..(i + 1) * per].to_vec()).unwrap();
    let plan = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, Precision::Fp32).unwrap();
    let other = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, Precision::Fp32).unwrap();
    let (a, b) = (plan.submit(&one(0)).unwrap(), plan.submit(&one(1)).unwrap());
    let e = plan.submit(&one(2)).unwrap_err().to_string();
    assert!(e.contains("two batches are in flight already"), "{e}");
    let e = other.collect(a).unwrap_err().to_string();
    assert!(e.contains("another plan"), "{e}");
    let e = plan.submit(&five).unwrap_err().to_string();
    assert!(e.contains("batches of 1 to 1 volumes, got 5"), "{e}");
    // b came through the refusals with its own input's output
    let yb = plan.collect(b).unwrap();
    let alone = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, Precision::Fp32).unwrap().run(&one(1)).unwrap();
    assert!(same_bits(&yb.data, &alone.data), "the batch in flight through the refusals");
    println!("a third batch, another plan's ticket and an oversized batch refused, each saying why");
}

/// The same on a real GPU, where the copies run concurrently with the forward passes.
#[test]
fn cuda_pipelined_batches_equal_each_batch_run_alone() {
    let (w, x, _) = case("readme");
    let five = five_of(&x);
    for p in Precision::ALL {
        let Some(dev) = cuda_device_or_skip() else { return };
        let plan = GpuPlan::new(dev, &w, x.shape.d, 1, p).unwrap();
        let (piped, alone) = pipelined_and_alone(&plan, &five);
        assert_eq!(piped, alone, "{p:?} on cuda: pipelined vs alone");
        println!("{p:?} on cuda: 5 volumes pipelined = each alone, bit for bit");
    }
}

/// A plan whose arena does not fit the device's free memory is refused before it is allocated,
/// with the batch that would fit (the emulator reporting a device of a given size, as a GPU does).
#[test]
fn a_plan_larger_than_the_device_is_refused_with_the_batch_that_fits() {
    let (w, x, _) = case("small");
    let one = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, Precision::Fp32).unwrap().device_bytes();
    let headroom = 256 << 20;
    // room for the weights, the driver's headroom and three volumes' arenas and slots, not for eight
    let dev = EmuDevice::new().with_memory(headroom + 3 * one + (1 << 20));
    let msg = GpuPlan::new(dev, &w, x.shape.d, 8, Precision::Fp32).err().map(|e| e.to_string()).unwrap_or_default();
    println!("{msg}");
    assert!(msg.contains("batch of 8 needs") && msg.contains("use --batch 3 or fewer"), "{msg}");
    let dev = EmuDevice::new().with_memory(headroom + 3 * one + (1 << 20));
    assert!(GpuPlan::new(dev, &w, x.shape.d, 3, Precision::Fp32).is_ok());
}

#[test]
fn bad_inputs_are_errors() {
    let (w, x, _) = case("tiny");
    let plan = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, Precision::Fp16).unwrap();
    let wrong = Tensor::zeros(Shape::new(1, [16, 16, 16], 1));
    assert!(matches!(plan.run(&wrong), Err(deepis::Error::Shape(_))));
    let two = Tensor::zeros(Shape::new(1, x.shape.d, 2));
    assert!(matches!(plan.run(&two), Err(deepis::Error::Shape(_))));
    assert!(GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 0, Precision::Fp32).is_err());
    // a batch of 2 on 3 volumes pads the last batch, and gives what batch 1 gives to rounding
    let three = Tensor::new(Shape::new(3, x.shape.d, 1), [x.data.clone(), x.data.iter().map(|v| -v).collect(), x.data.clone()].concat()).unwrap();
    let a = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 2, Precision::Fp32).unwrap().run(&three).unwrap();
    let b = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, Precision::Fp32).unwrap().run(&three).unwrap();
    assert_eq!(a.shape, three.shape.with_c(1));
    let e = rel_err(&a.data, &b.data, 1.0);
    assert!(e <= CPU_PLAN_TOL, "batch 2 vs batch 1: {e:.3e}");
}

// ---------------------------------------------------------------------------------------------
// The f64 interpreter of a passed graph, rounding as precision `p` does at the plan's rounding points.

/// One volume's values are channels-last [d0][d1][d2][c].
struct Vol {
    d: [usize; 3],
    c: usize,
    v: Vec<f64>,
}

/// `x` rounded once to tf32 (10 mantissa bits; tf32 has f32's exponent range): to nearest, ties
/// away from zero (`f64::round`), as cvt.rna.tf32.f32.
fn tf32(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let e = (((x.to_bits() >> 52) & 0x7ff) as i32 - 1023).max(-126);
    let ulp = 2f64.powi(e - 10);
    (x / ulp).round() * ulp
}

/// How precision `p` rounds a conv's input and weights.
fn round(p: Option<Precision>) -> impl Fn(f64) -> f64 {
    move |x| match p {
        Some(Precision::Fp16) => half::f16::from_f64(x).to_f64(),
        Some(Precision::Bf16) => half::bf16::from_f64(x).to_f64(),
        Some(Precision::Tf32) => tf32(x),
        _ => x,
    }
}

/// How precision `p` rounds a stored activation (a conv output, its residual, an up-sample + add).
fn store(p: Option<Precision>) -> impl Fn(f64) -> f64 {
    round(p.filter(|&p| p != Precision::Tf32))
}

/// The conv with its input and weights rounded by `r`, its residual and output by `rout`.
fn conv(x: &Vol, l: &Lin, res: Option<&Vol>, act: Act, r: &dyn Fn(f64) -> f64, rout: &dyn Fn(f64) -> f64) -> Vol {
    let ConvSpec { cin, cout, k, stride, pad } = l.spec;
    let d = l.spec.out_dims(x.d);
    let xin: Vec<f64> = x.v.iter().map(|&v| r(v)).collect();
    let w: Vec<f64> = l.w.iter().map(|&v| r(v as f64)).collect();
    let mut y = vec![0.0f64; d[0] * d[1] * d[2] * cout];
    for o0 in 0..d[0] {
        for o1 in 0..d[1] {
            for o2 in 0..d[2] {
                let acc = &mut y[((o0 * d[1] + o1) * d[2] + o2) * cout..][..cout];
                for t0 in 0..k[0] {
                    for t1 in 0..k[1] {
                        for t2 in 0..k[2] {
                            let i = [o0 * stride[0] + t0, o1 * stride[1] + t1, o2 * stride[2] + t2];
                            if (0..3).any(|a| i[a] < pad[a] || i[a] - pad[a] >= x.d[a]) {
                                continue;
                            }
                            let at = (((i[0] - pad[0]) * x.d[1] + i[1] - pad[1]) * x.d[2] + i[2] - pad[2]) * cin;
                            let tap = (t0 * k[1] + t1) * k[2] + t2;
                            for ci in 0..cin {
                                let xv = xin[at + ci];
                                let wrow = &w[(tap * cin + ci) * cout..][..cout];
                                acc.iter_mut().zip(wrow).for_each(|(a, &wv)| *a += xv * wv);
                            }
                        }
                    }
                }
            }
        }
    }
    for (j, y) in y.iter_mut().enumerate() {
        let mut v = *y + l.b.as_ref().map_or(0.0, |b| b[j % cout] as f64) + res.map_or(0.0, |r0| rout(r0.v[j]));
        v = match act {
            Act::None => v,
            Act::Relu => v.max(0.0),
            Act::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        };
        *y = rout(v);
    }
    Vol { d, c: cout, v: y }
}

/// Trilinear, align_corners=True, along one axis at a time (the product is the same).
fn upsample(x: &Vol, to: [usize; 3]) -> Vol {
    let mut cur = Vol { d: x.d, c: x.c, v: x.v.clone() };
    for a in 0..3 {
        let (n_in, n_out) = (cur.d[a], to[a]);
        let mut d = cur.d;
        d[a] = n_out;
        let inner: usize = d[a + 1..].iter().product::<usize>() * cur.c;
        let outer: usize = d[..a].iter().product();
        let mut v = vec![0.0; outer * n_out * inner];
        for o in 0..outer {
            for j in 0..n_out {
                let s = if n_out > 1 { j as f64 * (n_in - 1) as f64 / (n_out - 1) as f64 } else { 0.0 };
                let i0 = (s.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                let f = s - i0 as f64;
                for q in 0..inner {
                    let at = |i: usize| cur.v[(o * n_in + i) * inner + q];
                    v[(o * n_out + j) * inner + q] = at(i0) * (1.0 - f) + at(i1) * f;
                }
            }
        }
        cur = Vol { d, c: cur.c, v };
    }
    cur
}

fn maxpool(x: &Vol) -> Vol {
    let d = x.d.map(|v| v / 2);
    let mut v = vec![f64::NEG_INFINITY; d[0] * d[1] * d[2] * x.c];
    for (o, y) in v.iter_mut().enumerate() {
        let (ch, vox) = (o % x.c, o / x.c);
        let j = [vox / (d[1] * d[2]), vox / d[2] % d[1], vox % d[2]];
        for t in 0..8 {
            let i = [2 * j[0] + t / 4, 2 * j[1] + t / 2 % 2, 2 * j[2] + t % 2];
            *y = y.max(x.v[((i[0] * x.d[1] + i[1]) * x.d[2] + i[2]) * x.c + ch]);
        }
    }
    Vol { d, c: x.c, v }
}

/// The graph's output for every volume of `x`, in f64, rounding as the GPU plan in precision `p`
/// does (None or Fp32: no rounding at all, an f64 run of the passed graph).
fn rounded_run(g: &Weighted, x: &Tensor, p: Option<Precision>) -> Tensor {
    let (r, s) = (round(p), store(p));
    let keep = |v: f64| v;
    let per = x.shape.voxels();
    let mut out = Vec::new();
    let mut oshape = x.shape;
    for n in 0..x.shape.n {
        let mut vals: Vec<Option<Vol>> = (0..g.nodes.len()).map(|_| None).collect();
        for i in g.order() {
            let node = &g.nodes[i];
            let a = |k: usize| vals[node.inputs[k]].as_ref().expect("computed");
            let elementwise = |k: usize, f: &dyn Fn(usize, f64) -> f64| {
                let x = a(k);
                Vol { d: x.d, c: x.c, v: x.v.iter().enumerate().map(|(j, &v)| f(j, v)).collect() }
            };
            // the plan's rule: the head and a sigmoid's conv stay f32, every other conv output is stored
            let rout = |act: Act| -> &dyn Fn(f64) -> f64 { if i != g.output && act != Act::Sigmoid { &s } else { &keep } };
            let y = match &node.op {
                WOp::Input => Vol { d: x.shape.d, c: 1, v: x.data[n * per..(n + 1) * per].iter().map(|&v| v as f64).collect() },
                WOp::Conv { lin, act } => {
                    let res = if node.inputs.len() > 1 { Some(a(1)) } else { None };
                    conv(a(0), lin, res, *act, &r, rout(*act))
                }
                WOp::Pair { a: la, b: lb } => {
                    let mid = conv(a(0), la, None, Act::None, &r, &s);
                    conv(&mid, lb, None, Act::None, &r, rout(Act::None))
                }
                WOp::Affine { scale, shift } | WOp::Bn { scale, shift } => {
                    let c = a(0).c;
                    elementwise(0, &|j, v| v * scale[j % c % scale.len()] + shift[j % c % shift.len()])
                }
                WOp::Relu => elementwise(0, &|_, v| v.max(0.0)),
                WOp::Sigmoid => elementwise(0, &|_, v| 1.0 / (1.0 + (-v).exp())),
                WOp::Add => {
                    // an up-sample + add is one kernel that rounds its result once
                    let up = node.inputs.iter().any(|&j| matches!(g.nodes[j].op, WOp::Upsample));
                    let b = a(1);
                    elementwise(0, &|j, v| if up { s(v + b.v[j]) } else { v + b.v[j] })
                }
                WOp::MaxPool => maxpool(a(0)),
                WOp::Upsample => upsample(a(0), node.shape.d),
            };
            vals[i] = Some(y);
        }
        let y = vals[g.output].take().expect("output");
        oshape = Shape::new(x.shape.n, y.d, y.c);
        out.extend(y.v.iter().map(|&v| v as f32));
    }
    Tensor::new(oshape, out).unwrap()
}

/// `deepis predict --backend emu --precision P` is the GPU plan in P (bit for bit the library's
/// output), and the CPU backends refuse a reduced precision with a clear message.
#[test]
fn predict_takes_the_precision() {
    let dir = tempfile::tempdir().unwrap();
    let (w, x, _) = case("tiny");
    let predict = |backend: &str, p: &str, out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_deepis"))
            .args(["predict", "--backend", backend, "--precision", p, "--weights"])
            .arg(data("tiny", "weights.safetensors"))
            .arg(data("tiny", "input.npy"))
            .arg("-o")
            .arg(out)
            .output()
            .unwrap()
    };
    for p in [Precision::Tf32, Precision::Fp16, Precision::Bf16] {
        let out = dir.path().join(format!("{}.npy", p.name()));
        let o = predict("emu", p.name(), &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.contains(&format!("gpu plan: {}", p.name())), "{err}");
        let lib = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, 1, p).unwrap().run(&x).unwrap();
        let (_, got) = read_npy(&out);
        let lib_ncdhw = lib.to_ncdhw();
        assert!(same_bits(&got, &lib_ncdhw), "{}: the CLI's output is not the plan's", p.name());
    }
    let out = dir.path().join("cpu.npy");
    let o = predict("cpu", "fp16", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--precision fp16: the CPU backends compute in fp32"), "{err}");
    assert!(!err.contains("panicked") && !out.exists(), "{err}");
}

/// `deepis predict --wgmma` runs the wgmma plan (its summary says how many convs; on the emulator
/// bit for bit the mma.sync plan's output), `--warp-tile m64` the wide mma.sync kernels (the same
/// output again), and both are refused, before any work, where they cannot run: on a CPU backend
/// and in fp32.
#[test]
fn predict_takes_wgmma() {
    let dir = tempfile::tempdir().unwrap();
    let (w, x, _) = case("small");
    let predict = |args: &[&str], out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_deepis"))
            .arg("predict")
            .args(args)
            .arg("--weights")
            .arg(data("small", "weights.safetensors"))
            .arg(data("small", "input.npy"))
            .arg("-o")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = dir.path().join("wgmma.npy");
    let o = predict(&["--backend", "emu", "--precision", "bf16", "--wgmma"], &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("4 on wgmma"), "{err}");
    let lib = GpuPlan::new(EmuDevice::new(), &w, x.shape.d, x.shape.n, Precision::Bf16).unwrap().run(&x).unwrap();
    assert!(same_bits(&read_npy(&out).1, &lib.to_ncdhw()), "the CLI's wgmma output is not the mma.sync plan's");
    let out = dir.path().join("m64.npy");
    let o = predict(&["--backend", "emu", "--precision", "bf16", "--wgmma", "--warp-tile", "m64"], &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("4 on wgmma, the others warp tile m64"), "{err}");
    assert!(same_bits(&read_npy(&out).1, &lib.to_ncdhw()), "the CLI's m64 output is not the m32 plan's");
    for (args, want) in [
        (&["--backend", "cpu", "--wgmma"][..], "--wgmma: a GPU plan option"),
        (&["--backend", "emu", "--wgmma"][..], "--wgmma: a tensor-core option (--precision tf32, fp16 or bf16), not fp32"),
        (&["--backend", "cpu", "--warp-tile", "m64"][..], "--warp-tile: a GPU plan option"),
        (&["--backend", "emu", "--warp-tile", "m64"][..], "--warp-tile: a tensor-core option (--precision tf32, fp16 or bf16), not fp32"),
        (&["--backend", "emu", "--warp-tile", "m16"][..], "invalid value 'm16' for '--warp-tile"),
    ] {
        let out = dir.path().join("refused.npy");
        let o = predict(args, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want) && !err.contains("panicked") && !out.exists(), "{args:?}: {err}");
    }
}

/// The plan's own kernels (upsample_add_{f32,f16,bf16}, maxpool2_{f16,bf16}) on odd shapes, under
/// both schedules, against the CPU on the same stored (rounded) inputs. Max-pool is exact in every
/// type. Up-sample + add: the CPU sums in f32 too, in another order (a few f32 ulps, 1e-5 of
/// max(1, |y|) covers it), and the kernel rounds the sum once to the half type (at most u_h |y|,
/// u_h = 2^-11 f16, 2^-8 bf16; f32: 0).
#[test]
fn plan_kernels_match_the_cpu_on_both_schedules() {
    use deepis::gpu::{from_half_bits, to_half_bits, DType, Device};
    let stored = |v: Vec<f32>, t: DType| if t == DType::F32 { v } else { from_half_bits(&to_half_bits(&v, t), t) };
    let shapes = [(Shape::new(1, [3, 2, 5], 3), [5, 4, 9]), (Shape::new(2, [1, 3, 2], 5), [2, 5, 3]), (Shape::new(1, [4, 4, 4], 16), [8, 8, 7])];
    println!("{:<28} {:>5} {:>11} {:>11}", "op", "type", "max|err|", "bound");
    for (ls, hd) in shapes {
        let hs = ls.with_d(hd);
        for t in [DType::F32, DType::F16, DType::BF16] {
            let u_h = match t {
                DType::F32 => 0.0,
                DType::F16 => 2f32.powi(-11),
                DType::BF16 => 2f32.powi(-8),
            };
            let low = stored(values(ls.len(), 1).iter().map(|v| 3.0 * v).collect(), t);
            let skip = stored(values(hs.len(), 2), t);
            let mut want = skip.clone();
            deepis::plan::ops::upsample_add(&mut want, hs, &low, ls);
            let pool_x = stored(values(hs.len(), 3), t);
            let pool_os = hs.with_d(hd.map(|d| d / 2));
            let pool_want = deepis::cpu::ops::maxpool2(&pool_x, hs, pool_os);
            let mut outs = Vec::new();
            for schedule in [Schedule::Forward, Schedule::Reverse] {
                let gpu = deepis::gpu::ops::GpuBackend::new(EmuDevice::with_schedule(schedule));
                let dev = gpu.device();
                let up = |v: &[f32], s: Shape| deepis::backend::DevTensor { shape: s, data: dev.htod_as(v, t).unwrap() };
                let (sk, lo, y) = (up(&skip, hs), up(&low, ls), up(&vec![0.0; hs.len()], hs));
                gpu.upsample_add_into(&sk, &lo, &y).unwrap();
                let got = dev.dtoh(&y.data).unwrap();
                let (mut worst, mut bound_at) = (0.0f32, 0.0f32);
                for (g, w) in got.iter().zip(&want) {
                    let bound = u_h * w.abs() + 1e-5 * w.abs().max(1.0);
                    assert!((g - w).abs() <= bound, "upsample_add {} {ls} -> {hd:?}: got {g}, want {w} (bound {bound:.3e})", t.name());
                    if (g - w).abs() >= worst {
                        (worst, bound_at) = ((g - w).abs(), bound);
                    }
                }
                let (px, py) = (up(&pool_x, hs), up(&vec![0.0; pool_os.len()], pool_os));
                gpu.maxpool2_into(&px, &py).unwrap();
                let pooled = dev.dtoh(&py.data).unwrap();
                assert!(same_bits(&pooled, &pool_want), "maxpool2 {} {hs}: not the CPU's maxima", t.name());
                if schedule == Schedule::Forward {
                    println!("{:<28} {:>5} {worst:>11.3e} {bound_at:>11.3e}", format!("upsample_add {:?}->{hd:?}x{}", ls.d, ls.c), t.name());
                }
                outs.push((got, pooled));
            }
            assert!(same_bits(&outs[0].0, &outs[1].0) && same_bits(&outs[0].1, &outs[1].1), "{}: the schedules differ", t.name());
        }
    }
}

/// Arena regions are typed, aligned and bounded: a value cannot reach into its neighbour's bytes.
#[test]
fn arena_regions_are_bounded() {
    use deepis::gpu::{DType, Device};
    let dev = EmuDevice::new();
    let arena = dev.alloc_arena(256).unwrap();
    let a = dev.region(&arena, 0, 16, DType::F32).unwrap();
    let b = dev.region(&arena, 64, 32, DType::F16).unwrap();
    assert!(dev.region(&arena, 192, 17, DType::F32).is_err(), "past the end");
    assert!(dev.region(&arena, 32, 4, DType::F32).is_err(), "misaligned");
    dev.htod_into(&[1.5; 16], &a).unwrap();
    assert_eq!(dev.dtoh(&a).unwrap(), vec![1.5; 16]);
    assert_eq!(dev.dtoh(&b).unwrap(), vec![0.0; 32], "writing a changed b");
    assert!(dev.htod_into(&[1.0; 15], &a).is_err() && dev.htod_into(&[1.0; 32], &b).is_err());
    // a kernel given more elements than its region holds is refused by the emulator's bounds check
    let k = deepis::gpu::kernels::RELU;
    let r = dev.launch(k, deepis::gpu::LaunchCfg::linear(32, 256), &[deepis::gpu::KArg::Buf(&a), deepis::gpu::KArg::Buf(&a), deepis::gpu::KArg::I32(32)]);
    assert!(r.is_err(), "relu over 32 elements of a 16-element region ran");
}

/// The interpreter's f64 tf32 rounding is the host's (and the kernels') on f32 values: ties away
/// (a subnormal tie too: tf32 subnormals are 2^-136 apart).
#[test]
fn the_interpreters_tf32_rounding_is_cvt_rna() {
    let ties = [1.0 + 2f64.powi(-11), -(1.0 + 2f64.powi(-11)), 2.0 - 2f64.powi(-11), 3.0 * 2f64.powi(-137)];
    for (x, want) in ties.into_iter().zip([1.0 + 2f64.powi(-10), -(1.0 + 2f64.powi(-10)), 2.0, 2f64.powi(-135)]) {
        assert_eq!(tf32(x), want, "tf32({x:e})");
    }
    for v in values(4096, 17).iter().map(|v| v * 1e3) {
        assert_eq!(tf32(v as f64), deepis::gpu::round_tf32(v) as f64, "{v:e}");
    }
}
