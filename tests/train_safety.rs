//! `deepis train` keeps what a user already has: a run folder is not overwritten without
//! --resume or --force, --resume needs a checkpoint and the run's options, epochs that would
//! train nothing are refused, volumes of mixed sizes are refused as the data is read, and the
//! data's voxel size is recorded in every checkpoint.
use deepis::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn write_pairs(dir: &Path, sizes: &[usize]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(1);
    for (i, &d) in sizes.iter().enumerate() {
        let n = d * d * d;
        let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let t: Vec<f32> = x.iter().map(|v| (v * 0.1).clamp(-0.3, 0.3)).collect();
        deepis::io::write_npy(&dir.join(format!("s{i}_input.npy")), &[d, d, d], &x).unwrap();
        deepis::io::write_npy(&dir.join(format!("s{i}_target.npy")), &[d, d, d], &t).unwrap();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    cfg: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    write_pairs(&data, &[16, 16, 16]);
    let cfg = root.join("tiny.json");
    std::fs::write(&cfg, r#"{"widths": [4, 8, 8, 16, 16], "trans_feature": 4}"#).unwrap();
    Setup { _dir: dir, root, data, cfg }
}

/// `deepis train` on the setup's data into `run`, with `extra` options.
fn train(s: &Setup, run: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepis"))
        .args(["train", "--data"])
        .arg(&s.data)
        .arg("-o")
        .arg(run)
        .arg("--config")
        .arg(&s.cfg)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The error line of a failed run (asserted: exit 1, no panic).
fn refused(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    e.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {e}")).to_string()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn epochs_done(run: &Path) -> usize {
    deepis::train::run::load_checkpoint(&run.join("last.safetensors")).unwrap().2.epoch
}

#[test]
fn a_run_folder_is_not_overwritten_without_resume_or_force() {
    let s = setup();
    let run = s.root.join("run");
    ok(&train(&s, &run, &["--epochs", "1", "--seed", "3"]));
    let (last, log) = (read(&run.join("last.safetensors")), read(&run.join("log.csv")));
    let e = refused(&train(&s, &run, &["--epochs", "1", "--seed", "4"]));
    println!("{e}");
    for w in [run.to_str().unwrap(), "not empty", "last.safetensors", "log.csv", "--resume", "--force"] {
        assert!(e.contains(w), "{w:?} missing: {e}");
    }
    assert!(read(&run.join("last.safetensors")) == last && read(&run.join("log.csv")) == log, "the old run was touched");
    // any file counts: the folder is someone's
    let other = s.root.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let e = refused(&train(&s, &other, &["--epochs", "1"]));
    assert!(e.contains("notes.txt"), "{e}");
    assert!(!other.join("last.safetensors").exists());
    // --force starts over: a new run of one epoch with another seed, its own log
    let o = train(&s, &run, &["--epochs", "1", "--seed", "4", "--force"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("removed the previous run's last.safetensors, best.safetensors, log.csv"));
    assert!(read(&run.join("last.safetensors")) != last, "--force did not start over");
    assert_eq!(std::fs::read_to_string(run.join("log.csv")).unwrap().lines().count(), 2);
    assert_eq!(deepis::train::run::load_checkpoint(&run.join("last.safetensors")).unwrap().2.options.seed, 4);
    // --force and --resume contradict each other
    assert_eq!(train(&s, &run, &["--epochs", "2", "--force", "--resume"]).status.code(), Some(2));
}

#[test]
fn resume_without_a_checkpoint_is_an_error() {
    let s = setup();
    let run = s.root.join("run");
    ok(&train(&s, &run, &["--epochs", "1"]));
    std::fs::remove_file(run.join("last.safetensors")).unwrap();
    let best = read(&run.join("best.safetensors"));
    let e = refused(&train(&s, &run, &["--epochs", "2", "--resume"]));
    println!("{e}");
    for w in [run.to_str().unwrap(), "no last.safetensors", "best.safetensors", "drop --resume"] {
        assert!(e.contains(w), "{w:?} missing: {e}");
    }
    assert!(read(&run.join("best.safetensors")) == best && !run.join("last.safetensors").exists());
    // a missing folder: nothing to resume, and the folder is not made
    let none = s.root.join("none");
    let e = refused(&train(&s, &none, &["--epochs", "2", "--resume"]));
    assert!(e.contains("empty or missing"), "{e}");
    assert!(!none.exists());
}

#[test]
fn resume_refuses_options_that_differ_from_the_run() {
    let s = setup();
    let run = s.root.join("run");
    ok(&train(&s, &run, &["--epochs", "1", "--lr", "0.001", "--seed", "3", "--batch", "2"]));
    let last = read(&run.join("last.safetensors"));
    let copy = s.root.join("copy");
    write_pairs(&copy, &[16, 16, 16]);
    let cases: [(&[&str], &[&str]); 7] = [
        (&["--lr", "0.002"], &["--lr is 0.002", "started with 0.001"]),
        (&["--seed", "4"], &["--seed is 4", "started with 3"]),
        (&["--batch", "1"], &["--batch is 1", "started with 2"]),
        (&["--val-fraction", "0.5"], &["--val-fraction is 0.5", "started with 0.2"]),
        (&["--weight-decay", "0.1"], &["--weight-decay is 0.1", "started with 0"]),
        (&["--no-augment"], &["augmentation is off", "started with on"]),
        (&["--data", copy.to_str().unwrap()], &["--data is", "copy", "started with", "/data"]),
    ];
    for (given, words) in cases {
        let mut args = vec!["--epochs", "2", "--resume"];
        args.extend_from_slice(given);
        // --data: another folder than the run's (same file names and sizes)
        let o = if given[0] == "--data" {
            let mut c = Command::new(env!("CARGO_BIN_EXE_deepis"));
            c.args(["train", "-o"]).arg(&run).arg("--config").arg(&s.cfg).args(&args).output().unwrap()
        } else {
            train(&s, &run, &args)
        };
        let e = refused(&o);
        println!("{e}");
        for w in words {
            assert!(e.contains(w), "{given:?}: {w:?} missing: {e}");
        }
        assert!(read(&run.join("last.safetensors")) == last, "{given:?}: the run was changed");
    }
    // the same options, or none: the run continues with its own
    ok(&train(&s, &run, &["--epochs", "2", "--resume", "--lr", "0.001"]));
    ok(&train(&s, &run, &["--epochs", "3", "--resume"]));
    let st = deepis::train::run::load_checkpoint(&run.join("last.safetensors")).unwrap().2;
    assert_eq!((st.epoch, st.options.lr, st.options.seed, st.options.batch), (3, 0.001, 3, 2));
}

#[test]
fn epochs_that_train_nothing_are_refused() {
    let s = setup();
    let run = s.root.join("run");
    let e = refused(&train(&s, &run, &["--epochs", "0"]));
    println!("{e}");
    assert!(e.contains("--epochs 0") && e.contains("nothing to train"), "{e}");
    assert!(!run.exists(), "--epochs 0 made the run folder");
    ok(&train(&s, &run, &["--epochs", "2"]));
    let (last, log) = (read(&run.join("last.safetensors")), read(&run.join("log.csv")));
    for n in ["1", "2"] {
        let e = refused(&train(&s, &run, &["--epochs", n, "--resume"]));
        println!("{e}");
        assert!(e.contains(&format!("--epochs {n}")) && e.contains("completed 2 epoch(s)"), "{e}");
    }
    assert!(read(&run.join("last.safetensors")) == last && read(&run.join("log.csv")) == log);
    assert_eq!(epochs_done(&run), 2);
}

#[test]
fn mixed_volume_sizes_are_found_when_the_data_is_read() {
    let s = setup();
    let mixed = s.root.join("mixed");
    write_pairs(&mixed, &[16, 16, 24, 16]);
    let run = s.root.join("run");
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepis"));
    let o = c.args(["train", "--epochs", "1", "-o"]).arg(&run).arg("--config").arg(&s.cfg).arg("--data").arg(&mixed).output().unwrap();
    let e = refused(&o);
    println!("{e}");
    for w in ["s2_input.npy", "24 x 24 x 24", "s0_input.npy", "16 x 16 x 16", "--batch 1"] {
        assert!(e.contains(w), "{w:?} missing: {e}");
    }
    assert!(!String::from_utf8_lossy(&o.stderr).contains("epoch 1/"), "training started before the sizes were checked");
    assert!(!run.join("last.safetensors").exists());
    // one volume a step: mixed sizes train
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepis"));
    let o = c.args(["train", "--epochs", "1", "--batch", "1", "-o"]).arg(&run).arg("--config").arg(&s.cfg).arg("--data").arg(&mixed).output().unwrap();
    ok(&o);
    assert_eq!(epochs_done(&run), 1);
}

#[test]
fn the_data_voxel_size_is_recorded_in_every_checkpoint() {
    use deepis::voxel::trained_voxel_size;
    let s = setup();
    let files = |run: &Path| [run.join("last.safetensors"), run.join("best.safetensors")];
    // The data records none and none is given: none recorded, and the run says so.
    let run = s.root.join("none");
    let o = train(&s, &run, &["--epochs", "1"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("records no voxel size"));
    for f in files(&run) {
        assert_eq!(trained_voxel_size(&f).unwrap(), None, "{}", f.display());
    }
    // Given: in every checkpoint; a resumed run keeps it and refuses another.
    let run = s.root.join("given");
    ok(&train(&s, &run, &["--epochs", "1", "--voxel-size", "0.4,0.4,0.8"]));
    let e = refused(&train(&s, &run, &["--epochs", "2", "--resume", "--voxel-size", "0.2,0.2,0.4"]));
    println!("{e}");
    assert!(e.contains("--voxel-size is [0.2, 0.2, 0.4]") && e.contains("started with [0.4, 0.4, 0.8]"), "{e}");
    ok(&train(&s, &run, &["--epochs", "2", "--resume"]));
    for f in files(&run) {
        assert_eq!(trained_voxel_size(&f).unwrap(), Some([0.4, 0.4, 0.8]), "{}", f.display());
    }
    // Read from the inputs' sidecars when not given.
    let card = |um: [f64; 3]| deepis::sidecar::Sidecar {
        shape: vec![16, 16, 16],
        axes: vec!["D0".into(), "D1".into(), "D2".into()],
        voxel_size_um: Some(um),
        ..Default::default()
    };
    for i in 0..3 {
        deepis::sidecar::write(&s.data.join(format!("s{i}_input.npy")), &card([0.3, 0.3, 0.6])).unwrap();
    }
    let run = s.root.join("sidecars");
    let o = train(&s, &run, &["--epochs", "1"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("voxel size [0.3, 0.3, 0.6] um"));
    assert_eq!(trained_voxel_size(&run.join("best.safetensors")).unwrap(), Some([0.3, 0.3, 0.6]));
    // Inputs of two scales: refused, naming both.
    deepis::sidecar::write(&s.data.join("s2_input.npy"), &card([0.3, 0.3, 0.9])).unwrap();
    let e = refused(&train(&s, &s.root.join("mixed"), &["--epochs", "1"]));
    println!("{e}");
    assert!(e.contains("different voxel sizes") && e.contains("s0_input.npy") && e.contains("s2_input.npy"), "{e}");
}
