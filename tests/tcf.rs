//! Tomocube TCF input (files written by tests/data/tcf/make_tcf.py with h5py + hdf5plugin):
//! values, orientation and voxel size; predict on a frame equals predict on the issue's .npy;
//! OME-TIFF labels carry the physical size; segment then analyze gives um^3 from the file.
use deepis::tcf;
use deepis::voxel::voxel_size_of;
use std::path::{Path, PathBuf};
use std::process::Command;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tcf").join(name)
}

const FILES: [&str; 3] = ["float_deflate.TCF", "uint16_lz4.TCF", "uint16_shuffle_deflate.TCF"];

#[test]
fn every_layout_reads_to_the_same_values_and_voxel_size() {
    let exp = deepis::io::read_volume(&data("expected_ri.npy")).unwrap();
    assert_eq!((exp.tensor.shape.n, exp.tensor.shape.d), (2, [24, 20, 16]));
    for f in FILES {
        let (dims, v, info) = tcf::read_tcf(&data(f)).unwrap();
        assert_eq!(dims, vec![2, 24, 20, 16], "{f}: T, X, Y, Z");
        assert_eq!(info.frames, 2);
        assert_eq!(info.size_xyz, [24, 20, 16]);
        assert_eq!(info.voxel_size_xyz, [0.4, 0.45, 0.8]);
        assert_eq!(info.time_interval_s, Some(30.0));
        let max = v.iter().zip(&exp.tensor.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let differ = v.iter().zip(&exp.tensor.data).filter(|(a, b)| a != b).count();
        println!("{f} (FormatVersion {}): max |RI - expected| = {max:e}, {differ} of {} values differ", info.format_version, v.len());
        if f.starts_with("uint16") {
            // uint16 / 1e4 in float64, then float32: numpy's values exactly.
            assert_eq!(differ, 0, "{f}");
        } else {
            // Stored as float32(u) / float32(1e4): at most one float32 step from float64 rounding.
            assert!(max <= 1.2e-7, "{f}: {max}");
        }
        let vs = voxel_size_of(&data(f)).unwrap().unwrap();
        assert_eq!(vs.um, [0.4, 0.45, 0.8]);
        let vol = deepis::io::read_volume(&data(f)).unwrap();
        assert_eq!((vol.rank, vol.tensor.shape.n, vol.tensor.shape.d), (4, 2, [24, 20, 16]));
    }
}

#[test]
fn unsupported_tcf_layouts_get_clear_errors() {
    let e = deepis::io::read_volume(&data("ldm.TCF")).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("ldm.TCF") && e.contains("LDM") && e.contains("/Data/3D/000000"), "{e}");
    let e = deepis::io::read_volume(&data("no3d.TCF")).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("no3d.TCF") && e.contains("no 3D") && e.contains("2DMIP"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake.tcf");
    std::fs::write(&fake, b"not an HDF5 file at all").unwrap();
    let e = deepis::io::read_volume(&fake).unwrap_err().to_string();
    println!("{e}");
    assert!(e.contains("fake.tcf") && e.contains("HDF5"), "{e}");
    let e = deepis::io::read_volume(&dir.path().join("missing.TCF")).unwrap_err().to_string();
    assert!(e.contains("missing.TCF") && e.contains("no such file"), "{e}");
}

fn deepis(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_deepis")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn predict_on_a_tcf_frame_equals_predict_on_the_transposed_npy() {
    // frame1.npy = np.transpose(f['/Data/3D/000001'][()] / 1e4, (2, 1, 0)), float64, Fortran order.
    let dir = tempfile::tempdir().unwrap();
    let w = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tiny/weights.safetensors");
    for backend in ["cpu", "cpu-ref"] {
        let a = dir.path().join(format!("tcf_{backend}.npy"));
        let b = dir.path().join(format!("npy_{backend}.npy"));
        let (ok, e) = deepis(&["predict", "--weights", w, &s(&data("uint16_lz4.TCF")), "-o", &s(&a), "--backend", backend]);
        assert!(ok, "{e}");
        let (ok, e) = deepis(&["predict", "--weights", w, &s(&data("frame1.npy")), "-o", &s(&b), "--backend", backend]);
        assert!(ok, "{e}");
        let ya = deepis::io::read_volume(&a).unwrap(); // N x C x D0 x D1 x D2, C = 1: rank 5
        let yb = deepis::io::read_volume(&b).unwrap(); // C x D0 x D1 x D2: rank 4, C = 1 as N
        assert_eq!((ya.tensor.shape.n, ya.tensor.shape.d), (2, [24, 20, 16]));
        let n = 24 * 20 * 16;
        assert_eq!(&ya.tensor.data[n..2 * n], &yb.tensor.data[..], "{backend}: frame 1 of the TCF vs the .npy");
        assert_ne!(&ya.tensor.data[..n], &yb.tensor.data[..], "frame 0 differs from frame 1");
        // The output's sidecar carries the TCF's voxel size.
        assert_eq!(voxel_size_of(&a).unwrap().unwrap().um, [0.4, 0.45, 0.8]);
        assert!(voxel_size_of(&b).unwrap().is_none(), "a bare .npy records no voxel size");
    }
}

/// ImageDescription of page 0 of a TIFF.
fn description(p: &Path) -> String {
    let mut d = tiff::decoder::Decoder::new(std::fs::File::open(p).unwrap()).unwrap();
    d.get_tag_ascii_string(tiff::tags::Tag::ImageDescription).unwrap()
}

#[test]
fn segment_tcf_to_ome_tiff_then_analyze_in_um3_without_voxel_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/deepis-synth-w16.safetensors");
    let (ok, e) = deepis(&["segment", "--weights", w, &s(&data("uint16_lz4.TCF")), "-o", &s(&d.join("seg")), "--format", "tif", "--min-size", "1", "--backend", "cpu", "--save-probabilities"]);
    assert!(ok, "{e}");
    let labels = d.join("seg/uint16_lz4_labels.tif");
    let xml = description(&labels);
    println!("{xml}");
    // pages = D0 = the microscope's X (0.4 um), rows = D1 = Y (0.45), columns = D2 = Z (0.8).
    for attr in [r#"PhysicalSizeX="0.8""#, r#"PhysicalSizeY="0.45""#, r#"PhysicalSizeZ="0.4""#, r#"SizeX="16""#, r#"SizeY="20""#, r#"SizeZ="24""#, r#"SizeT="2""#, r#"Type="uint8""#, r#"TimeIncrement="30" TimeIncrementUnit="s""#] {
        assert!(xml.contains(attr), "{attr} missing from {xml}");
    }
    // Read back from the TIFF alone (sidecar removed).
    std::fs::remove_file(deepis::sidecar::path_for(&labels)).unwrap();
    let vs = voxel_size_of(&labels).unwrap().unwrap();
    assert_eq!(vs.um, [0.4, 0.45, 0.8], "{}", vs.from);
    let lv = deepis::io::read_volume(&labels).unwrap();
    assert_eq!(lv.tensor.shape.n * lv.tensor.shape.d[0], 48, "2 frames x 24 pages");

    // .npy labels + sidecar, then analyze with no --voxel-size.
    let (ok, e) = deepis(&["segment", "--weights", w, &s(&data("uint16_lz4.TCF")), "-o", &s(&d.join("npy")), "--min-size", "1", "--backend", "cpu", "--save-probabilities"]);
    assert!(ok, "{e}");
    let labels = d.join("npy/uint16_lz4_labels.npy");
    let csv = d.join("m.csv");
    let (ok, e) = deepis(&["analyze", &s(&labels), "--ri", &s(&data("uint16_lz4.TCF")), "-o", &s(&csv)]);
    assert!(ok, "{e}");
    assert!(e.contains("[0.4, 0.45, 0.8]"), "{e}");
    let l = deepis::io::read_volume(&labels).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let vv = 0.4 * 0.45 * 0.8;
    let n = 24 * 20 * 16;
    for (t, line) in text.lines().skip(1).enumerate() {
        let c: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let count = |k: f32| l.tensor.data[t * n..(t + 1) * n].iter().filter(|&&v| v == k).count() as f64;
        println!("frame {t}: effector {} voxels -> {} um3, target {} voxels -> {} um3", count(1.0), c[1], count(2.0), c[2]);
        assert!(count(1.0) > 0.0, "the shipped network finds the effector-like ball");
        assert!((c[1] - count(1.0) * vv).abs() <= 1e-5 * c[1], "{line}");
        assert!((c[2] - count(2.0) * vv).abs() <= 1e-5 * c[2].max(1.0), "{line}");
        assert!(c[7].is_finite(), "dry mass from the TCF's RI");
        assert_eq!(c[12], 30.0 * t as f64, "time_s: frame x the TCF's TimeInterval (30 s), carried by the labels' sidecar");
    }
    // Surfaces from the probability maps beside the labels (.npy, and the OME-TIFF pair of the
    // first run, whose sidecar was removed above: its voxel size comes from the TIFF's tags).
    let (pcsv, tcsv) = (d.join("p.csv"), d.join("t.csv"));
    let (ok, e) = deepis(&["analyze", &s(&labels), "--probabilities", "-o", &s(&pcsv)]);
    assert!(ok && e.contains("uint16_lz4_probabilities.npy"), "{e}");
    let (ok, e) = deepis(&["analyze", &s(&d.join("seg/uint16_lz4_labels.tif")), "--probabilities", "-o", &s(&tcsv)]);
    assert!(ok && e.contains("uint16_lz4_probabilities.tif"), "{e}");
    let ptext = std::fs::read_to_string(&pcsv).unwrap();
    assert_eq!(ptext, std::fs::read_to_string(&tcsv).unwrap(), "the same maps as .npy and as OME-TIFF");
    for (line, pline) in text.lines().zip(ptext.lines()).skip(1) {
        let (c, p): (Vec<f64>, Vec<f64>) = (line.split(',').map(|x| x.parse().unwrap()).collect(), pline.split(',').map(|x| x.parse().unwrap()).collect());
        println!("effector area: labels {} um2, maps {} um2; sphericity {} / {}", c[3], p[3], c[5], p[5]);
        assert_eq!(c[1..3], p[1..3], "volumes are the voxel counts either way");
        // This network is sure of itself (its maps are 0 or 1 but at a few voxels of the
        // boundary), so the maps move the surface little: two estimates of one surface.
        assert!(p[3] > 0.0 && p[3] != c[3] && (p[3] / c[3] - 1.0).abs() < 0.01, "{line} / {pline}");
        assert!(p[5] <= 1.0 + 1e-9, "sphericity of a closed surface: {pline}");
    }
    // --voxel-size (and --time-interval) override.
    let (ok, e) = deepis(&["analyze", &s(&labels), "--voxel-size", "1,1,1", "--time-interval", "7.5", "-o", &s(&csv)]);
    assert!(ok && e.contains("--voxel-size"), "{e}");
    let last = std::fs::read_to_string(&csv).unwrap().lines().nth(2).unwrap().rsplit(',').next().unwrap().to_string();
    assert_eq!(last, "7.500000", "frame 1 at 7.5 s");
    // A bare .npy with no sidecar: a clear error.
    std::fs::remove_file(deepis::sidecar::path_for(&labels)).unwrap();
    let (ok, e) = deepis(&["analyze", &s(&labels), "-o", &s(&csv)]);
    assert!(!ok && e.contains("no voxel size") && e.contains("--voxel-size"), "{e}");
}

/// A copy of `src` whose safetensors `__metadata__` also records `voxel_size_um`.
fn with_training_voxel_size(src: &Path, dst: &Path, um: &str) {
    let b = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    h["__metadata__"]["voxel_size_um"] = serde_json::Value::String(um.into());
    let mut hs = serde_json::to_vec(&h).unwrap();
    while !hs.len().is_multiple_of(8) {
        hs.push(b' ');
    }
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend(hs);
    out.extend(&b[8 + n..]);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn a_voxel_size_unlike_the_training_one_is_reported_and_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = d.join("w.safetensors");
    with_training_voxel_size(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/weights/deepis-synth-w16.safetensors")), &w, "0.4,0.4,0.8");
    assert_eq!(deepis::voxel::trained_voxel_size(&w).unwrap(), Some([0.4, 0.4, 0.8]));
    // The TCF has 0.45 um along Y: 12.5% from the training 0.4.
    let tcf = s(&data("uint16_lz4.TCF"));
    let (ok, e) = deepis(&["segment", "--weights", &s(&w), &tcf, "-o", &s(&d.join("a")), "--min-size", "1", "--backend", "cpu"]);
    assert!(ok, "{e}");
    println!("{e}");
    assert!(e.contains("warning") && e.contains("12.5%") && e.contains("--resample"), "{e}");
    let (ok, e) = deepis(&["segment", "--weights", &s(&w), &tcf, "-o", &s(&d.join("b")), "--min-size", "1", "--backend", "cpu", "--resample"]);
    assert!(ok, "{e}");
    assert!(e.contains("resampled from [24, 20, 16]") && e.contains("to [24, 23, 16]") && !e.contains("warning"), "{e}");
    let l = deepis::io::read_volume(&d.join("b/uint16_lz4_labels.npy")).unwrap();
    assert_eq!((l.tensor.shape.n, l.tensor.shape.d), (2, [24, 20, 16]), "labels on the input's grid");
    // Within 10%: no warning.
    with_training_voxel_size(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/weights/deepis-synth-w16.safetensors")), &w, "0.42,0.42,0.8");
    let (ok, e) = deepis(&["segment", "--weights", &s(&w), &tcf, "-o", &s(&d.join("c")), "--min-size", "1", "--backend", "cpu"]);
    assert!(ok && !e.contains("warning"), "{e}");
}

#[test]
fn resampling_keeps_a_linear_field_linear() {
    use deepis::tensor::{Shape, Tensor};
    let d = [10, 8, 6];
    let f = |x: f64, y: f64, z: f64| (0.5 * x - 0.25 * y + 2.0 * z) as f32;
    let data = (0..480).map(|p| f((p / 48) as f64, (p / 6 % 8) as f64, (p % 6) as f64)).collect();
    let t = Tensor::new(Shape::new(1, d, 1), data).unwrap();
    let to = [20, 4, 6];
    let r = deepis::voxel::resample(&t, to).unwrap();
    let mut worst = 0f32;
    for i in 1..19 {
        for j in 0..4 {
            for k in 0..6 {
                // Centre-aligned: new voxel i sits at old index (i + 0.5) * 10/20 - 0.5.
                let e = f((i as f64 + 0.5) * 0.5 - 0.5, (j as f64 + 0.5) * 2.0 - 0.5, k as f64);
                worst = worst.max((r.data[(i * 4 + j) * 6 + k] - e).abs());
            }
        }
    }
    assert!(worst < 1e-5, "{worst}");
    assert_eq!(deepis::voxel::resample(&t, d).unwrap().data, t.data, "to the same grid: the identity");
}
