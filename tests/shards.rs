//! Sharded `segment` runs as a cluster runs them: N processes over one folder label every input
//! exactly once; a killed shard's re-run finishes the rest and redoes nothing complete; a second
//! full run does nothing; failures with --keep-going; unique names; Slurm and Kubernetes indices.
use deepis::batch::{parse_shard, select, shard_from, unique_stems, Shard};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const W: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tiny/weights.safetensors");

fn volume(path: &Path, d: [usize; 3], seed: u64) {
    let mut r = deepis::rng::Rng::new(seed);
    let v: Vec<f32> = (0..d.iter().product::<usize>()).map(|_| r.normal() as f32).collect();
    deepis::io::write_npy(path, &d, &v).unwrap();
}

fn segment(args: &[&str], env: &[(&str, &str)]) -> Command {
    segment_on("cpu", args, env)
}

fn segment_on(backend: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepis"));
    c.arg("segment").args(["--weights", W, "--tile", "32,32,32", "--min-size", "1", "--backend", backend]).args(args);
    for k in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "JOB_COMPLETION_INDEX"] {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Inputs named in "INPUT -> OUT: ..." lines (written) and "...: done before ..." lines (skipped).
fn lines_with<'a>(err: &'a str, pat: &str) -> Vec<&'a str> {
    err.lines().filter(|l| l.contains(pat)).collect()
}

fn mtimes(dir: &Path) -> BTreeMap<PathBuf, std::time::SystemTime> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), std::fs::metadata(&p).unwrap().modified().unwrap())).collect()
}

#[test]
fn shards_label_everything_once_resume_after_a_kill_and_rerun_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in");
    let out = dir.path().join("out");
    std::fs::create_dir(&inp).unwrap();
    let k = 11;
    for i in 0..k {
        volume(&inp.join(format!("cell{i:02}.npy")), [32, 32, 32], i as u64);
    }
    let (n, inp_s, out_s) = (3, inp.to_str().unwrap(), out.to_str().unwrap());
    // N shard processes at once.
    let kids: Vec<_> = (0..n).map(|i| segment(&[inp_s, "-o", out_s, "--shard", &format!("{i}/{n}")], &[]).output_lazy()).collect();
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for (i, kid) in kids.into_iter().enumerate() {
        let o = kid.wait_with_output().unwrap();
        let e = stderr(&o);
        assert!(o.status.success(), "shard {i}: {e}");
        let written = lines_with(&e, "_labels.npy: ");
        for l in &written {
            let input = l.split(" -> ").next().unwrap().to_string();
            assert!(seen.insert(input.clone()), "{input} labelled twice");
        }
        total += written.len();
        assert_eq!(written.len(), select(&vec![PathBuf::new(); k], Shard { index: i, count: n }).len());
    }
    assert_eq!((total, seen.len()), (k, k), "every input exactly once");
    for i in 0..k {
        assert!(out.join(format!("cell{i:02}_labels.npy")).is_file());
        assert!(out.join(format!("cell{i:02}_labels.npy.json")).is_file());
    }

    // A second full run (all shards) does nothing.
    let before = mtimes(&out);
    for i in 0..n {
        let o = segment(&[inp_s, "-o", out_s, "--shard", &format!("{i}/{n}")], &[]).output().unwrap();
        let e = stderr(&o);
        assert!(o.status.success(), "{e}");
        assert!(e.contains("0 written"), "{e}");
    }
    assert_eq!(mtimes(&out), before, "nothing rewritten");

    // Changing an option makes the outputs stale: they are redone.
    let o = segment(&[inp_s, "-o", out_s, "--shard", "0/3", "--tau", "0.6"], &[]).output().unwrap();
    assert!(stderr(&o).contains("4 written"), "{}", stderr(&o));
}

trait Lazy {
    fn output_lazy(self) -> std::process::Child;
}
impl Lazy for Command {
    fn output_lazy(mut self) -> std::process::Child {
        self.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap()
    }
}

#[test]
fn a_killed_shard_is_finished_by_its_rerun_without_redoing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in");
    let out = dir.path().join("out");
    std::fs::create_dir(&inp).unwrap();
    let k = 8;
    for i in 0..k {
        volume(&inp.join(format!("t{i}.npy")), [64, 64, 32], 50 + i as u64);
    }
    let (inp_s, out_s) = (inp.to_str().unwrap(), out.to_str().unwrap());
    // The slow op-by-op backend, so the kill lands mid-run; killed as soon as one input is done.
    let mut kid = segment_on("cpu-ref", &[inp_s, "-o", out_s], &[]).output_lazy();
    let first = out.join("t0_labels.npy.json");
    let t0 = std::time::Instant::now();
    while !first.is_file() {
        assert!(t0.elapsed().as_secs() < 120, "no output after 120 s");
        if let Some(status) = kid.try_wait().unwrap() {
            panic!("the shard ended ({status}) before its first output: {}", std::io::read_to_string(kid.stderr.take().unwrap()).unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    kid.kill().unwrap();
    kid.wait().unwrap();
    let done: Vec<PathBuf> = (0..k).map(|i| out.join(format!("t{i}_labels.npy"))).filter(|p| deepis::sidecar::path_for(p).is_file()).collect();
    let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".tmp")).collect();
    println!("killed after {} of {k} inputs; temp files left by the kill: {leftovers:?}", done.len());
    assert!(done.len() < k, "the kill came after the whole run: make the inputs larger");
    let before: Vec<_> = done.iter().map(|p| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    let o = segment(&[inp_s, "-o", out_s], &[]).output().unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains(&format!("{} written, {} skipped", k - done.len(), done.len())), "{e}");
    let after: Vec<_> = done.iter().map(|p| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    assert_eq!(before, after, "complete outputs are not redone");
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".tmp")).collect();
    assert!(left.is_empty(), "the killed run's temporaries outlived the rerun: {left:?}");
    for i in 0..k {
        assert!(deepis::sidecar::path_for(&out.join(format!("t{i}_labels.npy"))).is_file());
    }
}

#[test]
fn keep_going_lists_failures_and_exits_3_and_names_stay_unique() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in ["a", "b"] {
        std::fs::create_dir(d.join(f)).unwrap();
        volume(&d.join(f).join("cell.npy"), [32, 32, 32], 1);
    }
    volume(&d.join("a/other.npy"), [32, 32, 32], 2);
    std::fs::write(d.join("a/broken.npy"), b"\x93NUMPY broken").unwrap();
    let out = d.join("out");
    let (a, b, o_s) = (d.join("a"), d.join("b"), out.to_str().unwrap().to_string());
    let o = segment(&[a.to_str().unwrap(), b.to_str().unwrap(), "-o", &o_s], &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "without --keep-going the first failure stops the run: {}", stderr(&o));
    // a/broken.npy is the first input in the run's order: the reader has read the next one, but
    // nothing after the failure is predicted or written
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "written after the failure: {}", stderr(&o));
    let o = segment(&[a.to_str().unwrap(), b.to_str().unwrap(), "-o", &o_s, "--keep-going"], &[]).output().unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{e}");
    // the stages overlap, but each reports its inputs in the run's order
    let at = |name: &str| e.find(name).unwrap_or_else(|| panic!("{name} not reported: {e}"));
    assert!(at("broken.npy: FAILED") < at("a__cell_labels.npy") && at("a__cell_labels.npy") < at("other_labels.npy") && at("other_labels.npy") < at("b__cell_labels.npy"), "{e}");
    let list = std::fs::read_to_string(out.join("failed-0.txt")).unwrap();
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(list.starts_with(d.join("a/broken.npy").to_str().unwrap()), "{list}");
    for name in ["a__cell_labels.npy", "b__cell_labels.npy", "other_labels.npy"] {
        assert!(out.join(name).is_file(), "{name}: {e}");
    }
    // Fixing the input and re-running clears the list.
    volume(&d.join("a/broken.npy"), [32, 32, 32], 3);
    let o = segment(&[a.to_str().unwrap(), b.to_str().unwrap(), "-o", &o_s, "--keep-going"], &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 written, 3 skipped"), "{}", stderr(&o));
    assert!(!out.join("failed-0.txt").exists());
}

#[test]
fn shard_indices_from_slurm_kubernetes_and_a_manifest() {
    let env = |v: &'static [(&'static str, &'static str)]| move |k: &str| v.iter().find(|(a, _)| *a == k).map(|(_, b)| b.to_string());
    assert_eq!(shard_from(None, None, &env(&[])).unwrap().0, Shard { index: 0, count: 1 });
    assert_eq!(shard_from(None, None, &env(&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "4")])).unwrap().0, Shard { index: 3, count: 4 });
    // --array=1-4: ids 1..4, min 1.
    let e = env(&[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_MIN", "1")]);
    assert_eq!(shard_from(None, None, &e).unwrap().0, Shard { index: 3, count: 4 });
    assert_eq!(shard_from(None, Some(5), &env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap().0, Shard { index: 2, count: 5 });
    assert_eq!(shard_from(Some(Shard { index: 1, count: 2 }), Some(5), &env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap().0, Shard { index: 1, count: 2 });
    let err = shard_from(None, Some(5), &env(&[])).unwrap_err().to_string();
    assert!(err.contains("JOB_COMPLETION_INDEX") && err.contains("SLURM_ARRAY_TASK_ID"), "{err}");
    let err = shard_from(None, Some(2), &env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
    assert!(parse_shard("2/2").is_err() && parse_shard("x").is_err() && parse_shard("0/0").is_err());
    assert_eq!(parse_shard("1/3").unwrap(), Shard { index: 1, count: 3 });
    let v: Vec<PathBuf> = ["x/a.npy", "y/a.npy", "y/a.tif", "z/b.npy"].iter().map(PathBuf::from).collect();
    assert_eq!(unique_stems(&v), vec!["x__a", "y__a_npy", "y__a_tif", "b"]);

    // The environment drives a real run; a manifest replaces the folder.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for i in 0..4 {
        volume(&d.join(format!("v{i}.npy")), [32, 32, 32], 9 + i as u64);
    }
    std::fs::write(d.join("list.txt"), "# inputs\nv0.npy\nv1.npy\n\nv3.npy\n").unwrap();
    let out = d.join("out");
    let m = d.join("list.txt");
    let o = segment(&["--manifest", m.to_str().unwrap(), "-o", out.to_str().unwrap()], &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "2")]).output().unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("shard 1/2 (SLURM_ARRAY_TASK_ID): 1 of 3"), "{e}");
    let names: BTreeSet<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["v1_labels.npy", "v1_labels.npy.json"].iter().map(|s| s.to_string()).collect());
    let o = segment(&["--manifest", m.to_str().unwrap(), "-o", out.to_str().unwrap(), "--shards", "3"], &[("JOB_COMPLETION_INDEX", "2")]).output().unwrap();
    assert!(stderr(&o).contains("shard 2/3 (JOB_COMPLETION_INDEX and --shards): 1 of 3"), "{}", stderr(&o));
    assert!(out.join("v3_labels.npy").is_file());
}
