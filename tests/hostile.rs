//! Every reproduction of issue 13 (hostile files and careless commands), through the binary as a
//! user runs it: each ends with exit 1, one clear `error:` line naming what is wrong, no panic,
//! no abort, and no file written. The child runs under a 4 GiB address-space limit, so a memory
//! bomb that slipped past the checks would abort it (and fail the test) instead of swapping.
mod common;
use common::corpus::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_deepis");

fn deepis(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).envs(env.iter().copied());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 4 << 30, rlim_max: 4 << 30 };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            libc::umask(0o022);
            Ok(())
        });
    }
    c.output().expect("the deepis binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `args`, expecting exit 1 and an `error:` line holding every `want`.
fn fails(what: &str, args: &[&str], env: &[(&str, &str)], wants: &[&str]) -> String {
    fails_with(1, what, args, env, wants)
}

/// `fails` with another exit code: 2 is clap's, for an option refused while parsing.
fn fails_with(code: i32, what: &str, args: &[&str], env: &[(&str, &str)], wants: &[&str]) -> String {
    let o = deepis(args, env);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("").to_string();
    println!("{what:<34} exit {:?} signal {:?}: {line}", o.status.code(), o.status.signal());
    assert!(!err.contains("panicked"), "{what}: panicked:\n{err}");
    assert_eq!(o.status.code(), Some(code), "{what}: exit code {code} expected (signal {:?}); stderr:\n{err}", o.status.signal());
    assert!(!line.is_empty(), "{what}: no `error:` line in\n{err}");
    for w in wants {
        assert!(line.contains(w), "{what}: `{w}` expected in: {line}");
    }
    line
}

fn tiny(file: &str) -> PathBuf {
    common::data("tiny", file)
}

#[test]
fn hostile_volumes_are_refused_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = tiny("weights.safetensors");
    let out = d.join("out.npy");
    let write = |name: &str, b: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let big = "(4611686018427387905, 4, 1)";
    let p = write("overflow.npy", &overflow_npy(big, false));
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 144, "the issue's 144-byte file");
    fails("npy shape overflows u64: predict", &["predict", "-w", s(&w), s(&p), "-o", s(&out)], &[], &["overflow.npy", "more than 2^64 elements"]);
    let csv = d.join("m.csv");
    fails("npy shape overflows: analyze", &["analyze", s(&p), "--voxel-size", "1,1,1", "-o", s(&csv)], &[], &["more than 2^64"]);
    assert!(!csv.exists(), "analyze wrote a CSV for a corrupt file");
    let p4 = write("overflow4d.npy", &overflow_npy("(4611686018427387905, 4, 1, 1)", false));
    fails("npy 4-D shape overflows", &["predict", "-w", s(&w), s(&p4), "-o", s(&out)], &[], &["more than 2^64"]);
    let pf = write("overflow_f.npy", &overflow_npy(big, true));
    fails("npy overflow, fortran_order", &["predict", "-w", s(&w), s(&pf), "-o", s(&out)], &[], &["more than 2^64"]);
    fails(
        "npy overflow as train-step input",
        &["train-step", "-w", s(&w), "--input", s(&p), "--target", s(&tiny("target.npy")), "-o", s(&d.join("g.safetensors"))],
        &[],
        &["more than 2^64"],
    );
    // a product that fits u64 but not the machine, and one the file cannot hold
    let huge = write("huge.npy", &npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100), }", &[0u8; 64]));
    fails("npy shape larger than its file", &["predict", "-w", s(&w), s(&huge), "-o", s(&out)], &[], &["truncated", "[100000, 100000, 100]"]);
    // header length 0xFFFFFFF0 (format 2.0): was a 4 GB allocation
    let mut hb = npy_bytes(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 2), }", &[0u8; 32]);
    hb[8..12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let hp = write("header_len.npy", &hb);
    fails("npy header length 0xFFFFFFF0", &["predict", "-w", s(&w), s(&hp), "-o", s(&out)], &[], &["header claims 4294967280 bytes"]);
    // found by cargo fuzz: each nested `[` of a header doubled the time of npyz's parser (18 of them: 38 s in the fuzz build)
    let deep = write("deep.npy", &npy_bytes(1, &format!("{{'descr': '<f4', 'fortran_order': False,{} 'shape': (2, 2, 2), }}", "[".repeat(150)), &[0u8; 32]));
    let t0 = std::time::Instant::now();
    fails("npy header nested 152 deep", &["predict", "-w", s(&w), s(&deep), "-o", s(&out)], &[], &["deep.npy", "nests brackets 152 deep"]);
    assert!(t0.elapsed().as_secs() < 10, "the nested header took {:?} to refuse", t0.elapsed());

    // TIFF of 1.1 KB claiming 100000 x 100000 float32 pixels (a 40 GB page)
    let mut t = float_tiff(1, None);
    for tag in [256, 257, 278] {
        patch_tiff_tag(&mut t, tag, 100_000);
    }
    let tp = write("bomb.tif", &t);
    fails("TIFF claims 100000 x 100000 float32", &["predict", "-w", s(&w), s(&tp), "-o", s(&out)], &[], &["bomb.tif", "100000 x 100000"]);
    // compressed (deflate) claim: bounded by the memory budget, with the number in the message
    patch_tiff_tag(&mut t, 259, 8);
    let tz = write("bomb_z.tif", &t);
    fails("TIFF deflate page of 40 GB", &["predict", "-w", s(&w), s(&tz), "-o", s(&out)], &[("DEEPIS_MAX_MEMORY", "1G")], &["bomb_z.tif", "100000 x 100000 pixels", "needs 74.5 GiB, more than DEEPIS_MAX_MEMORY=1.0 GiB"]);
    fails("TIFF deflate page, machine budget", &["predict", "-w", s(&w), s(&tz), "-o", s(&out)], &[], &["needs 74.5 GiB, this machine has"]);
    let mixed = write("mixed.tif", &float_tiff(4, Some(2)));
    fails("TIFF with one uint16 page", &["predict", "-w", s(&w), s(&mixed), "-o", s(&out)], &[], &["page 2 is uint16 but page 0 is float32"]);
    assert!(!out.exists());
}

#[test]
fn hostile_mat_files_inflate_no_further_than_they_promise() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let run = dir.path().join("run");
    let cfg = dir.path().join("c.json");
    std::fs::write(&cfg, r#"{"widths": [4, 8, 8, 16, 16], "trans_feature": 4}"#).unwrap();
    let train = |what: &str, env: &[(&str, &str)], wants: &[&str]| {
        fails(what, &["train", "--data", s(&data), "-o", s(&run), "--config", s(&cfg), "--epochs", "1"], env, wants);
    };
    // 4 MB of deflate that inflates to 2.1 GB of zeros behind a tag promising 64 bytes
    let t0 = std::time::Instant::now();
    let stream = zlib(std::iter::once(mi_matrix_tag(64)).chain((0..2100).map(|_| vec![0u8; 1 << 20])));
    println!("made a {:.1} MB stream of 2.1 GB in {:.1} s", stream.len() as f64 / 1e6, t0.elapsed().as_secs_f64());
    std::fs::write(data.join("bomb.mat"), mat_bytes(&stream)).unwrap();
    train("MAT inflating past its tag", &[], &["bomb.mat", "inflates past the 64 bytes its header promises"]);
    // a tag that promises 2.1 GB: refused against the budget before inflating
    std::fs::write(data.join("bomb.mat"), mat_bytes(&zlib(std::iter::once(mi_matrix_tag(2_100_000_000))))).unwrap();
    train("MAT promising 2.1 GB", &[("DEEPIS_MAX_MEMORY", "1G")], &["bomb.mat", "promises 2.0 GiB once inflated"]);
    // found by cargo fuzz: a size whose product overflows matfile's i32 (a panic in a debug build)
    let dims = [4, 0x4000_0003, 5];
    std::fs::write(data.join("bomb.mat"), mat_bytes(&zlib(std::iter::once(mi_single_array("input", &dims, &[1.0; 60]))))).unwrap();
    train("MAT size over 2^31 elements", &[], &["bomb.mat", "has size [4, 1073741827, 5]: negative, or more than 2^31 - 1 elements"]);
    // a compressed element inside a compressed one: matfile would inflate the inner one unbounded
    // (here 300 MB of zeros behind a 256 MiB budget)
    let nested = mi_compressed(std::iter::once(mi_matrix_tag(64)).chain((0..300).map(|_| vec![0u8; 1 << 20])));
    std::fs::write(data.join("bomb.mat"), mat_bytes(&zlib(std::iter::once(nested)))).unwrap();
    train("MAT compressed inside compressed", &[("DEEPIS_MAX_MEMORY", "256M")], &["bomb.mat", "holds another compressed element"]);
}

#[test]
fn hostile_configs_and_options_are_refused_with_the_number() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("c.json");
    for (json, want) in [
        (r#"{"widths": [1000000, 8, 8, 16, 16]}"#, "widths must be even, from 2 to 65536"),
        (r#"{"trans_feature": 1099511627776}"#, "trans_feature must be even, from 2 to 65536"),
        (r#"{"blocks": [1000000, 1, 1, 1]}"#, "blocks must be from 1 to 64"),
        (r#"{"gcn_kernels": [1000001, 7, 7, 3]}"#, "gcn_kernels must be odd, at most 255"),
        (r#"{"widths": [65536, 65536, 65536, 65536, 65536]}"#, "needs 1488.8 GiB, this machine has"),
    ] {
        std::fs::write(&cfg, json).unwrap();
        fails(&format!("train --config {json}"), &["train", "--data", s(d), "-o", s(&d.join("run")), "--config", s(&cfg)], &[], &["c.json", want]);
    }
    fails_with(2, "synth --size 2^32,2^32,8", &["synth", "-o", s(&d.join("syn")), "--size", "4294967296,4294967296,8"], &[], &["more than 2^40 voxels"]);
    assert!(!d.join("syn").exists());
    fails("bench --batch 1000000", &["bench", "--batch", "1000000", "--config", "readme"], &[], &["--batch 1000000", "needs 3906.2 GiB, this machine has"]);
    // The GPU plan's arena on the emulator is this machine's memory: refused over the budget.
    let budget = [("DEEPIS_MAX_MEMORY", "256M")];
    let big = ["bench", "--backend", "emu", "--config", "published", "--size", "16,16,16", "--batch", "128", "--runs", "1"];
    fails("bench --backend emu --batch 128", &big, &budget, &["emulated device buffer", "needs 384.0 MiB, more than DEEPIS_MAX_MEMORY=256.0 MiB"]);
    let w = tiny("weights.safetensors");
    fails_with(2, "info --size overflowing", &["info", s(&w), "--size", "18446744073709551615,2,2"], &[], &["more than 2^40 voxels"]);
    let o = deepis(&["info", s(&w), "--size", "100000,100000,100"], &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().find(|l| l.starts_with("cost:")).unwrap_or_default();
    println!("info --size 100000,100000,100: {line}");
    assert!(o.status.success() && !line.contains(" 0.0 GFLOP") && line.contains("GFLOP"), "{line}");
    fails("RAYON_NUM_THREADS=99999999", &["info", s(&w)], &[("RAYON_NUM_THREADS", "99999999")], &["RAYON_NUM_THREADS=99999999", "more than"]);
    fails("a folder as weights", &["predict", "-w", s(d), s(&tiny("input.npy")), "-o", s(&d.join("o.npy"))], &[], &["is a folder"]);
}

/// The tiny weights with `edit` applied to one tensor's float32 values.
fn weights_with(dir: &Path, name: &str, tensor: &str, edit: impl Fn(&mut [f32])) -> PathBuf {
    use safetensors::tensor::{SafeTensors, TensorView};
    let bytes = std::fs::read(tiny("weights.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, Vec<usize>, Vec<u8>)> = st.iter().map(|(n, v)| (n.to_string(), v.shape().to_vec(), v.data().to_vec())).collect();
    let e = ts.iter_mut().find(|t| t.0 == tensor).unwrap();
    let mut f: Vec<f32> = e.2.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    edit(&mut f);
    e.2 = f.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views: Vec<(String, TensorView<'_>)> = ts.iter().map(|(n, s, b)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    let p = dir.join(name);
    std::fs::write(&p, safetensors::serialize(views, meta.metadata().clone()).unwrap()).unwrap();
    p
}

#[test]
fn no_wrong_result_is_called_success() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = tiny("input.npy");
    let out = d.join("out.npy");
    let nan = weights_with(d, "nan.safetensors", "conv1.conv2.0.weight", |v| v[5] = f32::NAN);
    fails("NaN weight", &["predict", "-w", s(&nan), s(&x), "-o", s(&out)], &[], &["nan.safetensors", "conv1.conv2.0.weight", "NaN"]);
    let inf = weights_with(d, "inf.safetensors", "final.0.bias", |v| v[0] = f32::INFINITY);
    fails("infinite weight", &["predict", "-w", s(&inf), s(&x), "-o", s(&out)], &[], &["final.0.bias", "inf"]);
    let var = weights_with(d, "var.safetensors", "conv1.conv1.1.running_var", |v| v[1] = -0.5);
    fails("negative running_var", &["predict", "-w", s(&var), s(&x), "-o", s(&out)], &[], &["conv1.conv1.1.running_var", "-0.5", "[1]", "variance cannot be negative"]);
    let seg = d.join("seg");
    fails("negative running_var: segment", &["segment", "-w", s(&var), s(&x), "-o", s(&seg)], &[], &["running_var"]);
    assert!(!seg.exists(), "segment made its output folder for a run it refused");
    // input values of 3e38: finite, but the first convolution overflows
    let (dims, _) = common::read_npy(&x);
    let n: usize = dims.iter().product();
    let hot = d.join("hot.npy");
    deepis::io::write_npy(&hot, &dims, &vec![3e38f32; n]).unwrap();
    for backend in ["cpu", "cpu-ref"] {
        fails(
            &format!("input 3e38 on {backend}"),
            &["predict", "-w", s(&tiny("weights.safetensors")), s(&hot), "-o", s(&out), "--backend", backend],
            &[],
            &["layer conv1.conv1.0 is the first", "largest magnitude is 3e38"],
        );
    }
    assert!(!out.exists());
    // train-step's --weight map of the wrong shape is called a weight map, not a target
    let wm = d.join("wm.npy");
    deepis::io::write_npy(&wm, &[2, 2, 2], &[1.0; 8]).unwrap();
    fails(
        "train-step --weight of the wrong shape",
        &["train-step", "-w", s(&tiny("weights.safetensors")), "--input", s(&x), "--target", s(&tiny("target.npy")), "--weight", s(&wm), "-o", s(&d.join("g.safetensors"))],
        &[],
        &["wm.npy", "the --weight map is"],
    );
}

#[test]
fn no_command_overwrites_its_input_or_another_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = d.join("x.npy");
    std::fs::copy(tiny("input.npy"), &x).unwrap();
    let before = std::fs::read(&x).unwrap();
    let w = tiny("weights.safetensors");
    fails("predict X -o X", &["predict", "-w", s(&w), s(&x), "-o", s(&x)], &[], &["the same file as the input"]);
    // the same file by another name
    let alias = d.join("sub/../x.npy");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    fails("predict X -o sub/../X", &["predict", "-w", s(&w), s(&x), "-o", s(&alias)], &[], &["the same file as the input"]);
    assert_eq!(std::fs::read(&x).unwrap(), before, "the input is intact");
    let l = d.join("labels.npy");
    deepis::io::write_npy(&l, &[8, 8, 8], &[1.0; 512]).unwrap();
    let lb = std::fs::read(&l).unwrap();
    fails("analyze L -o L", &["analyze", s(&l), "--voxel-size", "1,1,1", "-o", s(&l)], &[], &["the same file as LABELS"]);
    assert_eq!(std::fs::read(&l).unwrap(), lb, "the labels are intact");
    let csv = d.join("m.csv");
    fails("analyze -o m.csv --plot m.csv", &["analyze", s(&l), "--voxel-size", "1,1,1", "-o", s(&csv), "--plot", s(&csv)], &[], &["--plot and -o name the same file"]);
    fails("analyze --plot into a missing folder", &["analyze", s(&l), "--voxel-size", "1,1,1", "-o", s(&csv), "--plot", s(&d.join("nope/p.png"))], &[], &["does not exist"]);
    assert!(!csv.exists(), "the CSV was written before the plot failed");
    fails(
        "train-step -o its --target",
        &["train-step", "-w", s(&w), "--input", s(&tiny("input.npy")), "--target", s(&x), "-o", s(&x)],
        &[],
        &["the same file as --target"],
    );
}

#[test]
fn outputs_get_the_usual_mode_and_stale_temporaries_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.npy");
    // the temporary of a killed run (a process that no longer exists)
    let mut dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let stale = d.join(format!(".out.npy.{pid}.AbC123.tmp"));
    std::fs::write(&stale, b"partial").unwrap();
    // another output's, and files that only look like temporaries (kept)
    let other = d.join(format!(".other.v1.npy.{pid}.XyZ789.tmp"));
    std::fs::write(&other, b"partial").unwrap();
    let keep = [".notes.tmp".to_string(), format!(".out.npy.{pid}.toolong1.tmp"), format!("out.npy.{pid}.AbC123.tmp")].map(|n| d.join(n));
    keep.iter().for_each(|k| std::fs::write(k, b"mine").unwrap());
    let o = deepis(&["predict", "-w", s(&tiny("weights.safetensors")), s(&tiny("input.npy")), "-o", s(&out), "--backend", "cpu"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    println!("output mode {mode:o} under umask 022; stale temporary removed: {}", !stale.exists());
    assert_eq!(mode, 0o644);
    assert!(!stale.exists(), "the stale temporary is still there");
    assert!(!other.exists(), "another output's stale temporary is still there");
    for k in &keep {
        assert!(k.exists(), "{} is not a temporary of deepis's, but was removed", k.display());
    }
}

/// The child half of `a_signal_during_a_write_leaves_no_temporary`: installs the handler, starts
/// an atomic write, and raises SIGTERM inside it.
#[test]
#[ignore]
fn child_raises_sigterm_inside_a_write() {
    let Ok(dir) = std::env::var("DEEPIS_TEST_SIGNAL_DIR") else { return };
    deepis::io::clean_up_on_signals().unwrap();
    let _ = deepis::io::write_atomic(&Path::new(&dir).join("out.bin"), |w| {
        use std::io::Write;
        w.write_all(&[1u8; 1 << 16])?;
        w.flush()?;
        unsafe { libc::raise(libc::SIGTERM) };
        std::thread::sleep(std::time::Duration::from_secs(20));
        Ok(())
    });
    panic!("the signal did not end the process");
}

#[test]
fn a_signal_during_a_write_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_raises_sigterm_inside_a_write", "--ignored", "--nocapture"])
        .env("DEEPIS_TEST_SIGNAL_DIR", dir.path())
        .output()
        .unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    println!("child ended by signal {:?} after {:.2} s; left in the folder: {left:?}", o.status.signal(), t0.elapsed().as_secs_f64());
    assert_eq!(o.status.signal(), Some(libc::SIGTERM), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(t0.elapsed().as_secs() < 15, "the handler did not end the write");
    assert!(left.is_empty(), "left behind: {left:?}");
}
