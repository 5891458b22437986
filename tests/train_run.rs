//! `deepis train` as a library: a short run on synthetic volumes drives the loss down, and a run
//! interrupted after an epoch and resumed gives bit-for-bit the weights of an uninterrupted run.
use deepis::config::Config;
use deepis::cpu::CpuBackend;
use deepis::io::write_npy;
use deepis::rng::Rng;
use deepis::train::adam::Adam;
use deepis::train::data::{load_samples, Augment};
use deepis::train::run::{load_checkpoint, train, TrainOptions};
use deepis::train::Params;
use std::path::Path;

fn tiny() -> Config {
    Config { widths: [4, 8, 8, 16, 16], trans_feature: 4, ..Config::default() }
}

/// Two ellipsoid cells in a 16^3 volume: the RI input (pre-scaled, as the published model saw
/// it) and the signed distance-like target (+ inside the effector, - inside the target cell).
fn write_phantoms(dir: &Path, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let d = 16usize;
    for i in 0..n {
        let (ce, ct) = ([5.0 + rng.uniform() * 2.0, 8.0, 8.0], [11.0 - rng.uniform() * 2.0, 8.0 + rng.uniform(), 8.0]);
        let mut x = vec![0f32; d * d * d];
        let mut t = vec![0f32; d * d * d];
        for a in 0..d {
            for b in 0..d {
                for c in 0..d {
                    let p = [a as f64, b as f64, c as f64];
                    let r = |cen: [f64; 3], s: f64| ((p[0] - cen[0]).powi(2) + (p[1] - cen[1]).powi(2) + (p[2] - cen[2]).powi(2)).sqrt() / s;
                    let k = (a * d + b) * d + c;
                    let (re, rt) = (r(ce, 3.5), r(ct, 4.0));
                    x[k] = (rng.normal() * 0.1) as f32;
                    if re < 1.0 {
                        x[k] += 1.1;
                        t[k] = (0.35 * (1.0 - re)) as f32;
                    } else if rt < 1.0 {
                        x[k] += 0.77;
                        t[k] = (-0.4 * (1.0 - rt)) as f32;
                    }
                }
            }
        }
        write_npy(&dir.join(format!("cell{i}_input.npy")), &[d, d, d], &x).unwrap();
        write_npy(&dir.join(format!("cell{i}_target.npy")), &[d, d, d], &t).unwrap();
    }
}

fn opts(epochs: usize) -> TrainOptions {
    TrainOptions { epochs, batch: 2, lr: 3e-3, seed: 5, ..TrainOptions::default() }
}

#[test]
fn a_short_run_drives_the_loss_down() {
    let data = tempfile::tempdir().unwrap();
    write_phantoms(data.path(), 6, 1);
    let cfg = tiny();
    let samples = load_samples(data.path(), &cfg).unwrap();
    assert_eq!(samples.len(), 6);
    let run = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let rep = train(&CpuBackend::new(), Params::random(&cfg, 3), &samples, run.path(), opts(14), false, None, false).unwrap();
    let first = rep.log[0].train_loss;
    let last = rep.log[rep.log.len() - 2..].iter().map(|l| l.train_loss).sum::<f64>() / 2.0;
    let (v0, v1) = (rep.log[0].val_loss.unwrap(), rep.log.last().unwrap().val_loss.unwrap());
    println!("train loss {first:.4} -> {last:.4}, validation {v0:.4} -> {v1:.4}, {} epochs in {:.1} s", rep.log.len(), t0.elapsed().as_secs_f64());
    assert!(last < 0.7 * first, "the training loss did not go down: {first} -> {last}");
    assert!(run.path().join("best.safetensors").is_file() && run.path().join("log.csv").is_file());
    let csv = std::fs::read_to_string(run.path().join("log.csv")).unwrap();
    assert_eq!(csv.lines().count(), 15, "{csv}");
    // the checkpoint is a weights file `deepis predict` can load
    deepis::weights::Weights::load(&rep.last).unwrap();
}

#[test]
fn resume_after_interruption_is_bit_for_bit() {
    let data = tempfile::tempdir().unwrap();
    write_phantoms(data.path(), 5, 2);
    let cfg = tiny();
    let samples = load_samples(data.path(), &cfg).unwrap();
    let b = CpuBackend::new();
    let full = tempfile::tempdir().unwrap();
    train(&b, Params::random(&cfg, 4), &samples, full.path(), opts(3), false, None, false).unwrap();
    let part = tempfile::tempdir().unwrap();
    // interrupted after one epoch (the checkpoint of epoch 1 is what a kill leaves), then resumed
    train(&b, Params::random(&cfg, 4), &samples, part.path(), opts(3), false, Some(1), false).unwrap();
    let (_, _, st) = load_checkpoint(&part.path().join("last.safetensors")).unwrap();
    assert_eq!(st.epoch, 1);
    train(&b, Params::random(&cfg, 99), &samples, part.path(), opts(3), true, None, false).unwrap();
    let (pa, aa, sa) = load_checkpoint(&full.path().join("last.safetensors")).unwrap();
    let (pb, ab, sb) = load_checkpoint(&part.path().join("last.safetensors")).unwrap();
    assert_eq!(sa, sb);
    assert!(pa.data == pb.data, "weights differ after resuming");
    assert!(aa == ab, "Adam state differs after resuming");
    let (la, lb) = (std::fs::read_to_string(full.path().join("log.csv")).unwrap(), std::fs::read_to_string(part.path().join("log.csv")).unwrap());
    let strip = |s: &str| s.lines().map(|l| l.rsplit_once(',').unwrap().0.to_string()).collect::<Vec<_>>();
    assert_eq!(strip(&la), strip(&lb), "the logs differ (seconds aside)");
}

#[test]
fn adam_matches_torch_formula() {
    // torch.optim.Adam(lr=0.1, betas=(0.5, 0.999), weight_decay=0.01), two steps, by hand in float64
    let cfg = tiny();
    let mut p = Params::random(&cfg, 1);
    let i = p.idx("final.0.bias").unwrap();
    let w0 = p.data[i][0] as f64;
    let mut grads: Vec<Option<Vec<f32>>> = vec![None; p.specs.len()];
    let mut adam = Adam::new(p.specs.len(), 0.1, 0.01);
    let (mut m, mut v, mut w) = (0.0f64, 0.0f64, w0);
    for (t, g) in [(1, 0.3f64), (2, -0.2)] {
        grads[i] = Some(vec![g as f32]);
        adam.update(&mut p, &grads).unwrap();
        let g = g + 0.01 * w;
        m = 0.5 * m + 0.5 * g;
        v = 0.999 * v + 0.001 * g * g;
        let (bc1, bc2) = (1.0 - 0.5f64.powi(t), 1.0 - 0.999f64.powi(t));
        w -= 0.1 / bc1 * m / (v.sqrt() / bc2.sqrt() + 1e-8);
        assert!((p.data[i][0] as f64 - w).abs() < 1e-6, "step {t}: {} vs {w}", p.data[i][0]);
    }
    // parameters without a gradient do not move
    let j = p.idx("final.0.weight").unwrap();
    assert_eq!(p.data[j], Params::random(&cfg, 1).data[j]);
}

#[test]
fn augmentation_flips_and_rotates_consistently() {
    let s = deepis::tensor::Shape::new(1, [4, 4, 3], 2);
    let t = deepis::tensor::Tensor::new(s, (0..s.len()).map(|v| v as f32).collect()).unwrap();
    // four quarter turns are the identity; two flips of the same axis too
    let r1 = Augment { flip: [false; 3], rot: 1 };
    let mut u = t.clone();
    for _ in 0..4 {
        u = r1.apply(&u);
    }
    assert_eq!(u, t);
    let f = Augment { flip: [false, false, true], rot: 0 };
    assert_eq!(f.apply(&f.apply(&t)), t);
    // a quarter turn moves (i, j) to (j, A-1-i), channels together
    let y = r1.apply(&t);
    assert_eq!(y.data[y.idx(0, [1, (4 - 1), 2], 1)], t.data[t.idx(0, [0, 1, 2], 1)]);
    // non-square planes get half turns only, and keep their shape
    let mut rng = Rng::new(3);
    for _ in 0..20 {
        assert_eq!(Augment::random(&mut rng, [4, 6, 3]).rot % 2, 0);
    }
}

/// Seconds per training step on the CPU (not a CI test):
/// `cargo test --release --test train_run bench_train_step -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_train_step() {
    use deepis::tensor::{Shape, Tensor};
    let b = CpuBackend::new();
    let mid = Config { widths: [16, 32, 64, 128, 256], trans_feature: 32, ..Config::default() };
    for (name, cfg, n, d) in [("mid (golden 'mid' config)", mid, 1, [64, 64, 32]), ("README widths 32..512", Config::readme_widths(), 2, [64, 64, 32])] {
        let p = Params::random(&cfg, 1);
        let mut rng = Rng::new(2);
        let s = Shape::new(n, d, 1);
        let x = Tensor::new(s, (0..s.len()).map(|_| rng.normal() as f32).collect()).unwrap();
        let t = Tensor::new(s, (0..s.len()).map(|_| (rng.normal() * 0.3) as f32).collect()).unwrap();
        let mut times = Vec::new();
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            deepis::train::train_step(&b, &p, &x, &t, None, deepis::train::loss::loss_weights(0), None).unwrap();
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let gflop = deepis::model::flops(&cfg, d) * n as f64 / 1e9;
        println!("{name}: batch {n} x {d:?}: median {:.2} s per training step ({} threads; forward convs {gflop:.1} GFLOP)", times[1], b.threads());
    }
}

#[test]
fn sigmoid_head_trains_from_input_and_target_folders() {
    // the README variant: max-pool down-sampling, two sigmoid masks (C x D0 x D1 x D2 targets)
    let data = tempfile::tempdir().unwrap();
    let (ip, tp) = (data.path().join("input"), data.path().join("target"));
    std::fs::create_dir_all(&ip).unwrap();
    std::fs::create_dir_all(&tp).unwrap();
    let d = 16usize;
    let mut rng = Rng::new(4);
    for i in 0..4 {
        let shift = rng.uniform() * 2.0;
        let mut x = vec![0f32; d * d * d];
        let mut t = vec![0f32; 2 * d * d * d];
        for k in 0..d * d * d {
            let p = [(k / (d * d)) as f64, (k / d % d) as f64, (k % d) as f64];
            let r = |c: f64, s: f64| ((p[0] - c).powi(2) + (p[1] - 8.0).powi(2) + (p[2] - 8.0).powi(2)).sqrt() / s;
            x[k] = 1.337 + (rng.normal() * 0.003) as f32;
            if r(5.0 + shift, 3.5) < 1.0 {
                x[k] += 0.035;
                t[k] = 1.0;
            } else if r(11.0, 4.0) < 1.0 {
                x[k] += 0.025;
                t[d * d * d + k] = 1.0;
            }
        }
        write_npy(&ip.join(format!("s{i}.npy")), &[d, d, d], &x).unwrap();
        write_npy(&tp.join(format!("s{i}.npy")), &[2, d, d, d], &t).unwrap();
    }
    let cfg = Config {
        widths: [4, 8, 8, 16, 16],
        trans_feature: 4,
        downsample: deepis::config::Downsample::Maxpool,
        head: deepis::config::Head::Sigmoid,
        out_channels: 2,
        input_offset: 1.337,
        input_scale: 0.03,
        ..Config::default()
    };
    let samples = load_samples(data.path(), &cfg).unwrap();
    assert_eq!(samples.len(), 4);
    assert_eq!(samples[0].target.shape.c, 2);
    let run = tempfile::tempdir().unwrap();
    let rep = train(&CpuBackend::new(), Params::random(&cfg, 3), &samples, run.path(), opts(8), false, None, false).unwrap();
    let (first, last) = (rep.log[0].train_loss, rep.log.last().unwrap().train_loss);
    println!("sigmoid head: train loss {first:.4} -> {last:.4}, validation Dice {:?}", rep.log.last().unwrap().val_dice);
    assert!(last < first, "{first} -> {last}");
    let csv = std::fs::read_to_string(run.path().join("log.csv")).unwrap();
    assert!(csv.starts_with("epoch,steps,train_loss,train_main,train_aux,val_loss,val_dice,seconds"), "{csv}");
}
