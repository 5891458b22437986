//! `deepis train-step` and `deepis train` through the binary: the gradients file matches the
//! golden case, and a training run killed mid-way then `--resume`d ends with the same weights,
//! Adam state and log as an uninterrupted run.
mod common;
use common::*;
use deepis::rng::Rng;
use deepis::tensor::rel_err;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn deepis() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deepis"))
}

#[test]
fn train_step_writes_the_golden_gradients() {
    let out = tempfile::tempdir().unwrap();
    let g = out.path().join("grads.safetensors");
    let st = deepis()
        .args(["train-step", "--weights"])
        .arg(data("tiny", "weights.safetensors"))
        .arg("--input")
        .arg(data("tiny", "input.npy"))
        .arg("--target")
        .arg(data("tiny", "target.npy"))
        .arg("-o")
        .arg(&g)
        .status()
        .unwrap();
    assert!(st.success());
    let got = read_safetensors(&g);
    let want = read_safetensors(&data("tiny", "train_step.safetensors"));
    assert_eq!(got.iter().map(|t| &t.0).collect::<Vec<_>>(), want.iter().map(|t| &t.0).collect::<Vec<_>>());
    let worst = got.iter().zip(&want).map(|(a, b)| rel_err(&a.2, &b.2, 1e-3)).fold(0.0f32, f32::max);
    println!("tiny via the CLI: {} tensors, worst rel err {worst:.2e}", got.len());
    assert!(worst <= 1e-3);
    // through the backward kernels on the emulator
    let ge = out.path().join("grads_emu.safetensors");
    let st = deepis().args(["train-step", "--backend", "emu", "--weights"]).arg(data("tiny", "weights.safetensors")).arg("--input").arg(data("tiny", "input.npy")).arg("--target").arg(data("tiny", "target.npy")).arg("-o").arg(&ge).status().unwrap();
    assert!(st.success());
    let emu = read_safetensors(&ge);
    let worst_emu = emu.iter().zip(&want).map(|(a, b)| rel_err(&a.2, &b.2, 1e-3)).fold(0.0f32, f32::max);
    println!("tiny via the CLI on emu: worst rel err {worst_emu:.2e}");
    assert!(worst_emu <= 1e-3);
    // --epoch 150: the loss weights (0.8, 0.1, 0.1), against the oracle's epoch-150 step
    let g150 = out.path().join("grads_150.safetensors");
    let st = deepis().args(["train-step", "--epoch", "150", "--weights"]).arg(data("tiny", "weights.safetensors")).arg("--input").arg(data("tiny", "input.npy")).arg("--target").arg(data("tiny", "target.npy")).arg("-o").arg(&g150).status().unwrap();
    assert!(st.success());
    let want150 = read_safetensors(&data("tiny", "train_step_e150.safetensors"));
    let worst150 = read_safetensors(&g150).iter().zip(&want150).map(|(a, b)| rel_err(&a.2, &b.2, 1e-3)).fold(0.0f32, f32::max);
    println!("tiny via the CLI at --epoch 150: worst rel err {worst150:.2e}");
    assert!(worst150 <= 1e-3);
    // the golden weight map given explicitly gives the same gradients
    let g2 = out.path().join("grads_w.safetensors");
    let st = deepis().args(["train-step", "--weights"]).arg(data("tiny", "weights.safetensors")).arg("--input").arg(data("tiny", "input.npy")).arg("--target").arg(data("tiny", "target.npy")).arg("--weight").arg(data("tiny", "weight.npy")).arg("-o").arg(&g2).status().unwrap();
    assert!(st.success());
    assert!(read_safetensors(&g2) == got);
    // a sigmoid-head target with two channels, and a missing target file
    let st = deepis().args(["train-step", "--weights"]).arg(data("readme", "weights.safetensors")).arg("--input").arg(data("readme", "input.npy")).arg("--target").arg(data("readme", "target.npy")).arg("-o").arg(out.path().join("r.safetensors")).status().unwrap();
    assert!(st.success());
    let o = deepis().args(["train-step", "--weights"]).arg(data("tiny", "weights.safetensors")).arg("--input").arg(data("tiny", "input.npy")).args(["--target", "/nonexistent.npy", "-o"]).arg(out.path().join("x.safetensors")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("error: /nonexistent.npy"), "{}", String::from_utf8_lossy(&o.stderr));
}

fn write_data(dir: &Path, n: usize, d: usize) {
    let mut rng = Rng::new(9);
    let (ip, tp) = (dir.join("input"), dir.join("target"));
    std::fs::create_dir_all(&ip).unwrap();
    std::fs::create_dir_all(&tp).unwrap();
    for i in 0..n {
        let c = d as f64 / 2.0;
        let off = rng.uniform() * 3.0;
        let mut x = vec![0f32; d * d * d];
        let mut t = vec![0f32; d * d * d];
        for (k, (xv, tv)) in x.iter_mut().zip(t.iter_mut()).enumerate() {
            let p = [(k / (d * d)) as f64, (k / d % d) as f64, (k % d) as f64];
            let r = ((p[0] - c + 4.0 + off).powi(2) + (p[1] - c).powi(2) + (p[2] - c).powi(2)).sqrt() / 5.0;
            *xv = (rng.normal() * 0.1) as f32 + if r < 1.0 { 1.0 } else { 0.0 };
            *tv = if r < 1.0 { (1.0 - r) as f32 } else { 0.0 };
        }
        deepis::io::write_npy(&ip.join(format!("v{i}.npy")), &[d, d, d], &x).unwrap();
        deepis::io::write_npy(&tp.join(format!("v{i}.npy")), &[d, d, d], &t).unwrap();
    }
}

fn train_cmd(data: &Path, run: &Path, cfg: &Path, resume: bool) -> Command {
    let mut c = deepis();
    c.args(["train", "--data"]).arg(data).arg("-o").arg(run).arg("--config").arg(cfg).args(["--epochs", "4", "--lr", "1e-3", "--seed", "3"]);
    if resume {
        c.arg("--resume");
    }
    c
}

fn tensors(p: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    read_safetensors(p)
}

#[test]
fn train_killed_and_resumed_equals_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_data(&data, 5, 24);
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, r#"{"widths": [4, 8, 8, 16, 16], "trans_feature": 4}"#).unwrap();
    let (full, part) = (dir.path().join("full"), dir.path().join("part"));
    let o = train_cmd(&data, &full, &cfg, false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // kill the second run as soon as its first checkpoint exists (mid-way through epoch 2 or later)
    let mut child = train_cmd(&data, &part, &cfg, false).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !part.join("last.safetensors").is_file() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let epochs_done = deepis::train::run::load_checkpoint(&part.join("last.safetensors")).unwrap().2.epoch;
    println!("killed ({status}) after {epochs_done} epoch(s) of 4");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "the run was killed, not finished");
    assert!((1..4).contains(&epochs_done), "the kill came mid-run: {epochs_done} of 4 epochs done");
    let o = train_cmd(&data, &part, &cfg, true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (tensors(&full.join("last.safetensors")), tensors(&part.join("last.safetensors")));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!(x.2 == y.2, "{} differs after kill + resume", x.0);
    }
    let strip = |s: String| s.lines().map(|l| l.rsplit_once(',').unwrap().0.to_string()).collect::<Vec<_>>();
    assert_eq!(strip(std::fs::read_to_string(full.join("log.csv")).unwrap()), strip(std::fs::read_to_string(part.join("log.csv")).unwrap()));
    assert!(full.join("best.safetensors").is_file());
}
