//! The `deepis` binary as a user runs it: predictions match the golden outputs in every input
//! layout, and every bad input ends with a non-zero exit, a clear `error:` line, no panic and no
//! output file.
mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use deepis::io::read_volume;
use deepis::tensor::rel_err;
use npyz::WriterBuilder;
use safetensors::tensor::{SafeTensors, TensorView};

const BIN: &str = env!("CARGO_BIN_EXE_deepis");
const TOL: f32 = 1e-4;

fn data(case: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(case).join(file)
}

fn deepis(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("the deepis binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (dims, values) of a float32 .npy.
fn load_npy(p: &Path) -> (Vec<usize>, Vec<f32>) {
    let f = npyz::NpyFile::new(std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap();
    let dims = f.shape().iter().map(|&d| d as usize).collect();
    (dims, f.into_vec::<f32>().unwrap())
}

fn save_npy<T: npyz::AutoSerialize + Copy>(p: &Path, dims: &[usize], v: &[T]) {
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    let f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(f).begin_nd().unwrap();
    w.extend(v.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn check_close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want, 1.0);
    println!("{what}: rel err {e:.2e} (tol {TOL:.0e})");
    assert!(e <= TOL, "{what}: rel err {e} > {TOL}");
}

fn predict_ok(weights: &Path, input: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["predict", "--weights", weights.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = deepis(&args);
    let err = stderr(&o);
    assert!(o.status.success(), "predict failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn predict_tiny_matches_the_golden_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    // cpu = the fused plan, cpu-ref = the op-by-op reference backend.
    for backend in ["cpu", "cpu-ref"] {
        let err = predict_ok(&data("tiny", "weights.safetensors"), &data("tiny", "input.npy"), &out, &["--backend", backend]);
        assert!(err.contains("backend: cpu") && err.contains("s/volume"), "backend and timing are reported: {err}");
        let (dims, got) = load_npy(&out);
        let (edims, want) = load_npy(&data("tiny", "expected.npy"));
        assert_eq!(dims, edims);
        check_close(&format!("tiny 5D on {backend}"), &got, &want);
    }
}

#[test]
fn predict_on_the_kernel_emulator_matches_the_golden_outputs() {
    // The CUDA kernels, run on the host emulator, through the same command a GPU user runs.
    let dir = tempfile::tempdir().unwrap();
    for case in ["tiny", "readme"] {
        let out = dir.path().join(format!("{case}.npy"));
        let err = predict_ok(&data(case, "weights.safetensors"), &data(case, "input.npy"), &out, &["--backend", "emu"]);
        assert!(err.contains("backend: emu"), "{err}");
        let (dims, got) = load_npy(&out);
        let (edims, want) = load_npy(&data(case, "expected.npy"));
        assert_eq!(dims, edims);
        check_close(&format!("{case} on emu"), &got, &want);
    }
}

#[test]
fn predict_auto_says_which_backend_it_uses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.npy");
    let err = predict_ok(&data("tiny", "weights.safetensors"), &data("tiny", "input.npy"), &out, &[]);
    assert!(err.contains("backend: "), "{err}");
    if !deepis::gpu::cuda::cuda_available() {
        assert!(err.contains("no GPU found: using the CPU backend"), "{err}");
    }
}

#[test]
fn predict_batches_of_a_4d_input() {
    // small: 2 volumes; as N x D0 x D1 x D2, run one volume per forward pass.
    let dir = tempfile::tempdir().unwrap();
    let (idims, x) = load_npy(&data("small", "input.npy"));
    assert_eq!(idims[..2], [2, 1]);
    let input = dir.path().join("in4.npy");
    save_npy(&input, &[idims[0], idims[2], idims[3], idims[4]], &x);
    let out = dir.path().join("out.npy");
    predict_ok(&data("small", "weights.safetensors"), &input, &out, &["--backend", "cpu", "--batch", "1"]);
    let (dims, got) = load_npy(&out);
    let (edims, want) = load_npy(&data("small", "expected.npy"));
    assert_eq!(dims, edims, "4D input gives N x C x D0 x D1 x D2");
    check_close("small 4D, batch 1", &got, &want);
}

#[test]
fn predict_3d_input_gives_c_x_d0_x_d1_x_d2() {
    // readme: max-pool network, 2-channel sigmoid head; a float64 3D volume.
    let dir = tempfile::tempdir().unwrap();
    let (idims, x) = load_npy(&data("readme", "input.npy"));
    let input = dir.path().join("in3.npy");
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    save_npy(&input, &idims[2..], &x64);
    let out = dir.path().join("out.npy");
    predict_ok(&data("readme", "weights.safetensors"), &input, &out, &["--backend", "cpu"]);
    let (dims, got) = load_npy(&out);
    let (edims, want) = load_npy(&data("readme", "expected.npy"));
    assert_eq!(dims, edims[1..].to_vec(), "3D input gives C x D0 x D1 x D2");
    check_close("readme 3D f64", &got, &want);
}

#[test]
fn predict_tif_in_and_out() {
    let dir = tempfile::tempdir().unwrap();
    // The tiny input as a float32 stack, through the engine's own writer.
    let vol = read_volume(&data("tiny", "input.npy")).unwrap();
    let input = dir.path().join("in.tif");
    deepis::io::write_output(&input, &vol.tensor, 3).unwrap();
    let out = dir.path().join("out.tif");
    predict_ok(&data("tiny", "weights.safetensors"), &input, &out, &["--backend", "cpu"]);
    let got = read_volume(&out).unwrap();
    let (edims, want) = load_npy(&data("tiny", "expected.npy"));
    assert_eq!(got.tensor.shape.d, [edims[2], edims[3], edims[4]], "one page per slice");
    check_close("tiny tif", &got.tensor.data, &want);
}

#[test]
fn info_describes_the_weights_and_the_machine() {
    let o = deepis(&["info", data("readme", "weights.safetensors").to_str().unwrap(), "--size", "32,32,32"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    println!("{out}");
    for want in ["widths", "maxpool", "sigmoid", "parameters:", "GFLOP per 32x32x32 volume", "cpu ", "cuda ", "nvrtc ", "emu "] {
        assert!(out.contains(want), "info shows `{want}`:\n{out}");
    }
    // A size the max-pool network cannot take is explained, not a failure.
    let o = deepis(&["info", data("readme", "weights.safetensors").to_str().unwrap(), "--size", "8,8,8"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("too small"));
}

#[test]
fn help_explains_input_and_output() {
    let o = deepis(&["predict", "--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for want in ["signed distance map", "effector CAR-T", "target cell", "probabilit", ".tif", "N x 1 x D0 x D1 x D2"] {
        assert!(out.contains(want), "predict --help mentions `{want}`");
    }
    for sub in ["info", "kernels", "bench"] {
        assert!(deepis(&[sub, "--help"]).status.success());
    }
}

#[test]
fn bench_reports_seconds_and_gflops() {
    let o = deepis(&["bench", "--config", "readme", "--size", "16,16,16", "--runs", "1", "--warmup", "0"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    println!("{out}");
    assert!(out.contains("s per volume") && out.contains("GFLOP/s"), "{out}");
}

#[test]
fn kernels_compile_with_nvrtc() {
    if !deepis::gpu::nvrtc::available() {
        assert!(!common::on_ci(), "CI is set: NVRTC must be installed (bash .ci/run installs it)");
        common::skip("no NVRTC on this machine (set DEEPIS_NVRTC or pip install nvidia-cuda-nvrtc-cu12)");
        return;
    }
    let o = deepis(&["kernels", "--arch", "sm_90"]);
    let out = String::from_utf8_lossy(&o.stdout);
    println!("{out}");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("sm_90") && out.contains("regs"), "{out}");
    // A bad architecture is refused by the argument parser.
    let o = deepis(&["kernels", "--arch", "volta"]);
    assert!(!o.status.success() && !stderr(&o).contains("panicked"));
}

// ---------------------------------------------------------------------------------------------
// Bad inputs

/// Re-serialises the tiny weights with `edit` applied to the metadata and the tensor list.
fn tiny_weights_with(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut HashMap<String, String>, &mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let bytes = std::fs::read(data("tiny", "weights.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st.iter().map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut md, &mut tensors);
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let out = safetensors::serialize(views, Some(md)).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, out).unwrap();
    p
}

/// Runs predict expecting a failure whose message contains every `want`.
fn predict_fails(what: &str, weights: &Path, input: &Path, dir: &Path, wants: &[&str]) {
    let out = dir.join(format!("out_{}.npy", what.replace(' ', "_")));
    let o = deepis(&["predict", "--weights", weights.to_str().unwrap(), input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let err = stderr(&o);
    println!("{what:<24} exit {:?}: {}", o.status.code(), err.lines().last().unwrap_or(""));
    assert_eq!(o.status.code(), Some(1), "{what}: exit code 1 expected; stderr: {err}");
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{what}: no `error:` line in {err}"));
    for w in wants {
        assert!(line.contains(w), "{what}: `{w}` expected in: {line}");
    }
    assert!(!out.exists(), "{what}: an output file was left");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny_w = data("tiny", "weights.safetensors");
    let tiny_x = data("tiny", "input.npy");

    // Weights files.
    predict_fails("missing weights", &d.join("nope.safetensors"), &tiny_x, d, &["nope.safetensors", "No such file"]);
    let bytes = std::fs::read(&tiny_w).unwrap();
    let trunc = d.join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    predict_fails("truncated weights", &trunc, &tiny_x, d, &["trunc.safetensors"]);
    let text = d.join("text.safetensors");
    std::fs::write(&text, "these are not weights, just a text file\n").unwrap();
    predict_fails("wrong magic", &text, &tiny_x, d, &["text.safetensors", "safetensors"]);
    let missing = tiny_weights_with(d, "missing_tensor.safetensors", |_, t| t.retain(|(n, ..)| n != "final.0.weight"));
    predict_fails("tensor missing", &missing, &tiny_x, d, &["final.0.weight", "missing"]);
    let shape = tiny_weights_with(d, "bad_shape.safetensors", |_, t| {
        let e = t.iter_mut().find(|(n, ..)| n == "final.0.weight").unwrap();
        e.2[0] *= 2;
        let b = e.3.clone();
        e.3.extend_from_slice(&b);
    });
    predict_fails("tensor wrong shape", &shape, &tiny_x, d, &["final.0.weight", "shape"]);
    let version = tiny_weights_with(d, "version.safetensors", |m, _| {
        m.insert("format_version".into(), "99".into());
    });
    predict_fails("unknown format_version", &version, &tiny_x, d, &["format_version", "99"]);
    let key = tiny_weights_with(d, "key.safetensors", |m, _| {
        let mut c: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&m["config"]).unwrap();
        c.insert("dilation".into(), serde_json::json!(2));
        m.insert("config".into(), serde_json::Value::Object(c).to_string());
    });
    predict_fails("unknown config key", &key, &tiny_x, d, &["dilation"]);

    // Volumes.
    let (dims, mut x) = load_npy(&tiny_x);
    x[1234] = f32::NAN;
    let nan = d.join("nan.npy");
    save_npy(&nan, &dims, &x);
    predict_fails("volume with NaN", &tiny_w, &nan, d, &["nan.npy", "NaN"]);
    let flat = d.join("flat.npy");
    save_npy(&flat, &[16, 16], &[0.5f32; 256]);
    predict_fails("2D volume", &tiny_w, &flat, d, &["flat.npy", "2D"]);
    let small = d.join("small8.npy");
    save_npy(&small, &[8, 8, 8], &[0.5f32; 512]);
    predict_fails("too small for maxpool", &data("readme", "weights.safetensors"), &small, d, &["small8.npy", "too small"]);
    predict_fails("missing input", &tiny_w, &d.join("absent.npy"), d, &["absent.npy", "No such file"]);

    // Outputs that cannot be written are refused before any work.
    let o = deepis(&["predict", "-w", tiny_w.to_str().unwrap(), tiny_x.to_str().unwrap(), "-o", d.join("out.raw").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unsupported file type"), "{}", stderr(&o));
    let o = deepis(&["predict", "-w", tiny_w.to_str().unwrap(), tiny_x.to_str().unwrap(), "-o", d.join("no/dir/o.npy").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));

    // Bad arguments: clap's usage error, non-zero, no panic.
    let o = deepis(&["predict", "-w", tiny_w.to_str().unwrap(), tiny_x.to_str().unwrap(), "-o", "x.npy", "--batch", "0"]);
    assert!(!o.status.success() && !stderr(&o).contains("panicked"));

    // Nothing but the inputs this test wrote is left in the folder (no temporary files).
    let mut left: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert!(left.iter().all(|n| !n.starts_with('.') && !n.starts_with("out")), "left behind: {left:?}");
}
