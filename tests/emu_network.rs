//! The whole network on the kernel emulator under both thread schedules: `deepis predict --backend
//! emu` on golden cases with DEEPIS_EMU_SCHEDULE=forward and =reverse. Each must match the float64
//! oracle (max|a-e| / max(1, max|e|) <= 1e-4), and the two schedules must agree bit for bit (the
//! kernels use fixed-order reductions, so a difference is a race). A bad value is refused.
mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_deepis");
const TOL: f64 = 1e-4;

fn predict(case: &str, schedule: &str, out: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .env("DEEPIS_EMU_SCHEDULE", schedule)
        .args(["predict", "--backend", "emu", "--weights"])
        .arg(common::data(case, "weights.safetensors"))
        .arg(common::data(case, "input.npy"))
        .arg("-o")
        .arg(out)
        .output()
        .expect("the deepis binary runs")
}

#[test]
fn golden_cases_on_the_emulator_under_both_schedules() {
    let dir = tempfile::tempdir().unwrap();
    for case in ["tiny", "readme"] {
        let (_, want) = common::read_npy(&common::data(case, "expected.npy"));
        let mut outs = Vec::new();
        for schedule in ["forward", "reverse"] {
            let out = dir.path().join(format!("{case}_{schedule}.npy"));
            let o = predict(case, schedule, &out);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{case} {schedule}: {err}");
            assert!(err.contains("backend: emu"), "{err}");
            let (_, got) = common::read_npy(&out);
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs() as f64));
            let e = got.iter().zip(&want).fold(0.0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs())) / scale;
            println!("{case} on emu, {schedule} schedule: rel err {e:.2e} (tol {TOL:.0e})");
            assert!(e <= TOL, "{case} {schedule}: rel err {e}");
            outs.push(got);
        }
        assert!(common::same_bits(&outs[0], &outs[1]), "{case}: forward and reverse schedules differ");
    }
}

#[test]
fn a_bad_schedule_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    let o = predict("tiny", "sideways", &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("DEEPIS_EMU_SCHEDULE=\"sideways\": expected `forward` or `reverse`"), "{err}");
    assert!(!err.contains("panicked") && !out.exists(), "{err}");
}
