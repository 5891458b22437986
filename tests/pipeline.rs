//! `segment`'s stages in parallel (`--readers`, `--writers`): the files are byte for byte those
//! of one reader and one writer, every input is reported in the run's order, and a failure in a
//! reader or in a writer stops the run at that input (or is listed, with --keep-going) without
//! the stages waiting on each other for ever.
mod common;
use common::*;
use deepis::config::Head;
use deepis::segment::{self, SegmentArgs};
use deepis::tensor::Tensor;
use deepis::weights::Weights;
use std::path::{Path, PathBuf};

/// The first input is large, the others small: a writer labelling the first is still at it
/// when the others' writers are done, so a report in order of completion would be out of order.
const SIZES: [[usize; 3]; 9] = [[96, 96, 64], [16, 16, 16], [16, 24, 16], [16, 16, 16], [32, 16, 16], [16, 16, 16], [16, 16, 32], [16, 16, 16], [24, 16, 16]];

/// A pointwise network: 2v + 1, as a distance map.
fn pointwise(x: &Tensor) -> deepis::error::Result<Tensor> {
    Ok(Tensor { shape: x.shape, data: x.data.iter().map(|&v| 2.0 * v + 1.0).collect() })
}

/// dir/in/v<k>.npy for every size, and the weights (a distance head) at dir/w.safetensors.
fn setup(dir: &Path) -> Weights {
    std::fs::create_dir_all(dir.join("in")).unwrap();
    for (k, d) in SIZES.iter().enumerate() {
        deepis::io::write_npy(&dir.join(format!("in/v{k}.npy")), d, &values(d.iter().product(), 70 + k as u64)).unwrap();
    }
    let cfg = deepis::config::Config { widths: [4, 8, 8, 8, 8], trans_feature: 4, blocks: [1; 4], gcn_kernels: [3; 4], head: Head::Distance, ..Default::default() };
    let w = Weights::random(&cfg, 5);
    w.save(&dir.join("w.safetensors")).unwrap();
    w
}

/// The run over dir/in into `out` with `readers` and `writers`, whole volumes as tiles,
/// probabilities saved.
fn args(dir: &Path, out: &str, readers: u32, writers: u32) -> SegmentArgs {
    let inputs = vec![dir.join("in").display().to_string()];
    let a = segment_args(inputs, &dir.join(out), &dir.join("w.safetensors"));
    SegmentArgs { tile: [128, 128, 64], save_probabilities: true, readers: Some(readers), writers: Some(writers), ..a }
}

fn labels(dir: &Path, out: &str, k: usize) -> PathBuf {
    dir.join(out).join(format!("v{k}_labels.npy"))
}

fn input(dir: &Path, k: usize) -> PathBuf {
    dir.join("in").join(format!("v{k}.npy"))
}

#[test]
fn many_readers_and_writers_write_the_same_files_and_report_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = setup(d);
    let one = segment::run(&args(d, "one", 1, 1), &w, &mut pointwise).unwrap();
    let many = segment::run(&args(d, "many", 3, 4), &w, &mut pointwise).unwrap();
    let want: Vec<PathBuf> = (0..SIZES.len()).map(|k| labels(d, "many", k)).collect();
    assert_eq!(many.written, want, "reported in the run's order");
    assert_eq!(one.written.len(), SIZES.len());
    let mut names: Vec<_> = std::fs::read_dir(d.join("one")).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names.len(), 4 * SIZES.len(), "labels, probabilities and their sidecars: {names:?}");
    for name in names {
        let (a, b) = (std::fs::read(d.join("one").join(&name)).unwrap(), std::fs::read(d.join("many").join(&name)).unwrap());
        assert!(a == b, "{name:?} differs between 1 reader + 1 writer and 3 + 4");
    }
    // the labels are the pointwise map's (spot check of the large input: d > tau somewhere, < -tau somewhere)
    let l = deepis::io::read_volume(&labels(d, "many", 0)).unwrap();
    assert!(l.tensor.data.contains(&1.0) && l.tensor.data.contains(&2.0), "both classes labelled");
    println!("{} inputs with 3 readers and 4 writers: {} files as with 1 + 1, byte for byte, reported in order", SIZES.len(), 4 * SIZES.len());
}

#[test]
fn a_failed_read_or_write_stops_the_run_there_or_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = setup(d);
    // input 4 cannot be read; input 6's labels cannot be written (a folder is in their way)
    std::fs::write(input(d, 4), b"\x93NUMPY broken").unwrap();
    for out in ["stop", "stop-w", "listed"] {
        std::fs::create_dir_all(labels(d, out, 6)).unwrap();
    }
    // stops at the read failure: everything before it written, nothing after
    let e = segment::run(&args(d, "stop", 3, 4), &w, &mut pointwise).unwrap_err().to_string();
    assert!(e.contains("v4.npy"), "{e}");
    for k in 0..SIZES.len() {
        assert_eq!(labels(d, "stop", k).is_file(), k < 4, "input {k} after a failed read at input 4: {e}");
    }
    // stops at the write failure (input 4 readable again): the inputs before it written
    deepis::io::write_npy(&input(d, 4), &SIZES[4], &values(SIZES[4].iter().product(), 74)).unwrap();
    let e = segment::run(&args(d, "stop-w", 3, 4), &w, &mut pointwise).unwrap_err().to_string();
    assert!(e.contains("v6_labels.npy"), "{e}");
    for k in 0..6 {
        assert!(labels(d, "stop-w", k).is_file(), "input {k} before a failed write at input 6: {e}");
    }
    // with --keep-going both are listed, in order, and the others written in order
    std::fs::write(input(d, 4), b"\x93NUMPY broken").unwrap();
    let a = SegmentArgs { keep_going: true, ..args(d, "listed", 3, 4) };
    let r = segment::run(&a, &w, &mut pointwise).unwrap();
    let failed: Vec<PathBuf> = r.failed.iter().map(|f| f.0.clone()).collect();
    assert_eq!(failed, [input(d, 4), input(d, 6)], "{:?}", r.failed);
    let written: Vec<PathBuf> = [0, 1, 2, 3, 5, 7, 8].map(|k| labels(d, "listed", k)).to_vec();
    assert_eq!(r.written, written);
    println!("3 readers, 4 writers: a failed read and a failed write each stop the run there; with --keep-going both listed in order");
}

#[test]
fn worker_counts_are_the_flags_or_fit_the_cores() {
    assert_eq!(segment::workers(Some(3), Some(5)), (3, 5));
    let (r, w) = segment::workers(None, None);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!((1..=4).contains(&r) && (1..=8).contains(&w), "{r} readers, {w} writers");
    assert!(cores < 3 || r + w < cores, "{r} readers + {w} writers + the network's thread on {cores} cores");
}
