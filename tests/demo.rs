//! The shipped weights (weights/, trained by `deepis train` on synthetic time-lapses of seeds 1-10)
//! segment held-out synthetic frames with Dice >= 0.9 per class, and `deepis demo` runs end to end.
use deepis::analysis::{EFFECTOR, TARGET};
use deepis::demo::{self, dice, segment_volume, shipped_weights, SHIPPED_MIN_SIZE, SHIPPED_REGROW, SHIPPED_SIZE, SHIPPED_TAU, SHIPPED_VOXEL_SIZE};
use deepis::synth::{synthesize, SynthOptions};

/// (effector, target) Dice of every frame of held-out time-lapses: seeds never used for training
/// (1-10), 6 frames each (approach, contact, spreading).
fn held_out_dice(w: &deepis::weights::Weights) -> Vec<(f64, f64)> {
    let mut predict = deepis::segment::plan_predictor(w);
    let mut all = Vec::new();
    for seed in [100u64, 101, 102] {
        let o = SynthOptions { frames: 6, size: SHIPPED_SIZE, voxel_size: SHIPPED_VOXEL_SIZE, seed };
        for f in synthesize(&o).unwrap() {
            let l = segment_volume(&mut predict, w, &f.ri, SHIPPED_SIZE, SHIPPED_TAU, SHIPPED_REGROW, SHIPPED_MIN_SIZE).unwrap();
            all.push((dice(&l, &f.labels, EFFECTOR), dice(&l, &f.labels, TARGET)));
        }
    }
    all
}

fn mean_min(v: &[(f64, f64)]) -> ((f64, f64), (f64, f64)) {
    let n = v.len() as f64;
    let mean = (v.iter().map(|x| x.0).sum::<f64>() / n, v.iter().map(|x| x.1).sum::<f64>() / n);
    let min = (v.iter().map(|x| x.0).fold(1.0, f64::min), v.iter().map(|x| x.1).fold(1.0, f64::min));
    (mean, min)
}

#[test]
fn shipped_weights_segment_held_out_frames_with_dice_above_0_9() {
    let w = shipped_weights().unwrap();
    assert_eq!(w.config.head, deepis::config::Head::Sigmoid);
    assert_eq!(w.config.out_channels, 2);
    let all = held_out_dice(&w);
    for (i, (e, t)) in all.iter().enumerate() {
        println!("held-out seed {} frame {}: Dice effector {e:.3}, target {t:.3}", 100 + i / 6, i % 6);
    }
    let ((mean_e, mean_t), (min_e, min_t)) = mean_min(&all);
    println!("mean Dice effector {mean_e:.4} (min {min_e:.4}), target {mean_t:.4} (min {min_t:.4})");
    assert!(mean_e >= 0.9, "mean effector Dice {mean_e:.3} < 0.9");
    assert!(mean_t >= 0.9, "mean target Dice {mean_t:.3} < 0.9");
    assert!(min_e >= 0.9 && min_t >= 0.9, "a frame below Dice 0.9: effector {min_e:.3}, target {min_t:.3}");
}

/// The Dice check can fail: untrained weights of the same config are far below it.
#[test]
fn untrained_weights_fail_the_dice_check() {
    let cfg = shipped_weights().unwrap().config;
    let ((mean_e, mean_t), _) = mean_min(&held_out_dice(&deepis::weights::Weights::random(&cfg, 7)));
    println!("random weights: mean Dice effector {mean_e:.3}, target {mean_t:.3}");
    assert!(mean_e < 0.9 || mean_t < 0.9, "random weights pass: {mean_e:.3} {mean_t:.3}");
}

/// Labels as the demo makes them (shipped weights, size and post-processing) with the GPU plan in
/// tf32 / fp16 / bf16 (on the emulator, through `segment`'s GPU predictor) against fp32 (the CPU plan),
/// on held-out frames (seed 100: approach and spreading).
/// The bound is a requirement, not a fit: a reduced precision may change at most a tenth as many
/// voxels as the fp32 network already gets wrong against the synthetic truth, so that the
/// precision is a small part of the error a user sees. Labels can differ only where fp32's
/// probability lies within the precision's output error of 0.5, plus what the small-component
/// removal does with them; a layout or epilogue bug
/// changes the probabilities by O(1) and the labels wholesale.
#[test]
fn demo_labels_in_tf32_fp16_and_bf16_agree_with_fp32() {
    use deepis::gpu::emu::EmuDevice;
    use deepis::gpu::plan::{GpuOptions, Precision};
    let w = shipped_weights().unwrap();
    let o = SynthOptions { frames: 6, size: SHIPPED_SIZE, voxel_size: SHIPPED_VOXEL_SIZE, seed: 100 };
    let frames = synthesize(&o).unwrap();
    let frames = [&frames[0], &frames[5]];
    let segment = |predict: &mut deepis::segment::Predictor<'_>, ri: &[f32]| segment_volume(predict, &w, ri, SHIPPED_SIZE, SHIPPED_TAU, SHIPPED_REGROW, SHIPPED_MIN_SIZE).unwrap();
    let mut cpu = deepis::segment::plan_predictor(&w);
    let fp32: Vec<Vec<u8>> = frames.iter().map(|f| segment(&mut cpu, &f.ri)).collect();
    let voxels = (frames.len() * fp32[0].len()) as f64;
    let wrong32 = frames.iter().zip(&fp32).map(|(f, l)| l.iter().zip(&f.labels).filter(|(a, b)| a != b).count()).sum::<usize>() as f64 / voxels;
    println!("fp32 (cpu plan) labels differ from the truth at {:.3}% of voxels", 100.0 * wrong32);
    for p in [Precision::Tf32, Precision::Fp16, Precision::Bf16] {
        let mut gpu = deepis::segment::gpu_predictor(EmuDevice::new(), &w, GpuOptions { precision: p, ..GpuOptions::default() }, 1);
        let half: Vec<Vec<u8>> = frames.iter().map(|f| segment(&mut gpu, &f.ri)).collect();
        let differ = half.iter().zip(&fp32).map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count()).sum::<usize>() as f64 / voxels;
        let d = |c: u8| frames.iter().zip(&half).map(|(f, l)| dice(l, &f.labels, c)).fold(1.0, f64::min);
        println!(
            "{}: labels differ from fp32 at {:.4}% of voxels (bound {:.4}%: a tenth of fp32's error); min Dice vs truth effector {:.4}, target {:.4}",
            p.name(),
            100.0 * differ,
            10.0 * wrong32,
            d(EFFECTOR),
            d(TARGET)
        );
        assert!(differ <= wrong32 / 10.0, "{}: {:.4}% of labels differ from fp32 (bound {:.4}%)", p.name(), 100.0 * differ, 10.0 * wrong32);
    }
}

#[test]
fn dice_counts_overlap() {
    assert_eq!(dice(&[1, 1, 0, 2], &[1, 0, 0, 2], 1), 2.0 / 3.0);
    assert_eq!(dice(&[1, 1, 0, 2], &[1, 0, 0, 2], 2), 1.0);
    assert_eq!(dice(&[0, 0], &[0, 0], 1), 1.0);
    assert_eq!(dice(&[1, 0], &[0, 1], 1), 0.0);
}

#[test]
fn demo_runs_end_to_end_and_writes_its_files() {
    let dir = std::env::temp_dir().join(format!("deepis_demo_test_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deepis"))
        .args(["demo", "--frames", "4", "-o"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    println!("{stdout}{stderr}");
    assert!(stdout.contains("IS_area") && stdout.contains("Dice against the synthetic truth"), "{stdout}");
    for f in demo::expected_files(&dir, 4) {
        let len = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{} missing or empty", f.display());
    }
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("frame,effector_volume_um3,target_volume_um3,"), "{csv}");
    assert_eq!(csv.lines().count(), 5, "{csv}");
    let dice_csv = std::fs::read_to_string(dir.join("dice.csv")).unwrap();
    for line in dice_csv.lines().skip(1) {
        let v: Vec<f64> = line.split(',').skip(1).map(|x| x.parse().unwrap()).collect();
        assert!(v.iter().all(|&d| d >= 0.8), "demo Dice below 0.8: {line}");
    }
    // Predicted labels: a 4 x 64 x 64 x 32 uint8 stack with both cells.
    let l = deepis::io::read_volume(&dir.join("labels.npy")).unwrap();
    assert_eq!(l.tensor.data.len(), 4 * SHIPPED_SIZE.iter().product::<usize>());
    assert!(l.tensor.data.contains(&1.0) && l.tensor.data.contains(&2.0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_refuses_bad_options() {
    let dir = std::env::temp_dir().join(format!("deepis_demo_bad_{}", std::process::id()));
    let a = demo::DemoArgs { out_dir: dir.clone(), frames: 0, seed: 1, tau: 0.5, no_regrow: false, weights: None };
    let e = demo::run(&a).err().expect("0 frames is an error").to_string();
    assert!(e.contains("--frames"), "{e}");
    let a = demo::DemoArgs { frames: 2, tau: f64::NAN, ..a };
    let e = demo::run(&a).err().expect("NaN tau is an error").to_string();
    assert!(e.contains("--tau"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
