//! `segment`'s network stage (`segment::Streamer`): tiles of consecutive inputs share batches,
//! two batches stay in flight on a stream of depth 2 (the next is queued before the last is
//! collected), a failed batch fails the inputs it holds and no others, and on the GPU plan the
//! outputs are bit for bit what each input's plan gives it alone (the emulator checking every
//! order between the queues; on CUDA where one is lent).
mod common;
use common::*;
use deepis::config::Head;
use deepis::error::{Error, Result};
use deepis::gpu::emu::EmuDevice;
use deepis::gpu::plan::{GpuOptions, GpuPlan, Precision};
use deepis::gpu::Device;
use deepis::segment::{self, SegmentArgs, Stream};
use deepis::tensor::{Shape, Tensor};
use deepis::weights::Weights;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A pointwise network of depth 2 that logs its calls: "S<n>" for a batch of n submitted, "C"
/// for one collected; the `fail`-th submission (from 1) fails.
struct Logged {
    log: Rc<RefCell<Vec<String>>>,
    queued: VecDeque<Tensor>,
    head: Head,
    fail: Option<usize>,
    submitted: usize,
}

/// The pointwise network: 2v + 1 (distance head), or [2v + 1, -v] (sigmoid head).
fn pointwise(x: &Tensor, head: Head) -> Tensor {
    match head {
        Head::Distance => Tensor { shape: x.shape, data: x.data.iter().map(|&v| 2.0 * v + 1.0).collect() },
        Head::Sigmoid => Tensor { shape: x.shape.with_c(2), data: x.data.iter().flat_map(|&v| [2.0 * v + 1.0, -v]).collect() },
    }
}

impl Stream for Logged {
    fn depth(&self) -> usize {
        2
    }

    fn submit_with(&mut self, shape: Shape, fill: &mut dyn FnMut(&mut [f32])) -> Result<()> {
        self.log.borrow_mut().push(format!("S{}", shape.n));
        self.submitted += 1;
        if self.fail == Some(self.submitted) {
            return Err(Error::Other("planted failure".into()));
        }
        assert!(self.queued.len() < 2, "more than two batches queued");
        // NaN where fill writes nothing
        let mut x = Tensor { shape, data: vec![f32::NAN; shape.len()] };
        fill(&mut x.data);
        self.queued.push_back(pointwise(&x, self.head));
        Ok(())
    }

    fn collect_with(&mut self, take: &mut dyn FnMut(Shape, &[f32]) -> Result<()>) -> Result<()> {
        self.log.borrow_mut().push("C".into());
        let y = self.queued.pop_front().expect("a batch to collect");
        take(y.shape, &y.data)
    }
}

/// segment over dir/in into dir/out, tiles of 32^3, probabilities saved.
fn args(dir: &Path, batch: u32) -> SegmentArgs {
    let inputs = vec![dir.join("in").display().to_string()];
    SegmentArgs { tile: [32, 32, 32], save_probabilities: true, batch, ..segment_args(inputs, &dir.join("out"), &dir.join("w.safetensors")) }
}

/// Volumes of the given sizes written as dir/in/v<k>.npy (in that order); returns them.
fn inputs(dir: &Path, sizes: &[[usize; 3]]) -> Vec<Tensor> {
    std::fs::create_dir_all(dir.join("in")).unwrap();
    sizes
        .iter()
        .enumerate()
        .map(|(k, &d)| {
            let x = Tensor::new(Shape::new(1, d, 1), values(d.iter().product(), 40 + k as u64)).unwrap();
            deepis::io::write_npy(&dir.join(format!("in/v{k}.npy")), &d, &x.data).unwrap();
            x
        })
        .collect()
}

/// The probability map segment wrote for input k, as a head output (N = 1, channels-last).
fn probabilities(dir: &Path, k: usize, like: &Tensor) -> Tensor {
    let v = deepis::io::read_volume(&dir.join(format!("out/v{k}_probabilities.npy"))).unwrap();
    let s = like.shape;
    Tensor::from_ncdhw([1, s.c, s.d[0], s.d[1], s.d[2]], &v.tensor.data).unwrap()
}

fn weights(dir: &Path, head: Head) -> Weights {
    let cfg = deepis::config::Config { widths: [4, 8, 8, 8, 8], trans_feature: 4, blocks: [1; 4], gcn_kernels: [3; 4], head, ..Default::default() };
    let w = Weights::random(&cfg, 3);
    w.save(&dir.join("w.safetensors")).unwrap();
    w
}

#[test]
fn tiles_of_consecutive_inputs_share_batches_and_two_stay_in_flight() {
    for head in [Head::Distance, Head::Sigmoid] {
        let dir = tempfile::tempdir().unwrap();
        let w = weights(dir.path(), head);
        // three inputs of one size (one tile each), then one of another size
        let xs = inputs(dir.path(), &[[20, 24, 16], [20, 24, 16], [20, 24, 16], [16, 16, 16]]);
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut net = Logged { log: Rc::clone(&log), queued: VecDeque::new(), head, fail: None, submitted: 0 };
        let report = segment::run_stream(&args(dir.path(), 2), &w, &mut net).unwrap();
        let want: Vec<PathBuf> = (0..4).map(|k| dir.path().join(format!("out/v{k}_labels.npy"))).collect();
        assert_eq!(report.written, want);
        // v0 + v1 fill a batch; v2 goes alone when the size changes, queued before v0 + v1 are
        // collected; v3 alone, queued before v2 is collected. One batch at a time would read
        // S2 C S1 C S1 C.
        assert_eq!(*log.borrow(), ["S2", "S1", "C", "S1", "C", "C"], "{head:?}: the order of the stream's calls");
        for (k, x) in xs.iter().enumerate() {
            let want = pointwise(x, head);
            assert!(same_bits(&probabilities(dir.path(), k, &want).data, &want.data), "{head:?}: input {k}'s output is not its own");
        }
        println!("{head:?}: 4 inputs in 3 batches (2 + 1 + 1), two in flight, each output its own input's");
    }
}

#[test]
fn tiles_of_one_input_fill_batches_across_its_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights(dir.path(), Head::Distance);
    // 48 x 24 x 16 in tiles of 32 x 32 x 32 (cut to 32 x 24 x 16): two tiles along D0, at 0 and 16
    let xs = inputs(dir.path(), &[[48, 24, 16], [48, 24, 16], [48, 24, 16]]);
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut net = Logged { log: Rc::clone(&log), queued: VecDeque::new(), head: Head::Distance, fail: None, submitted: 0 };
    segment::run_stream(&args(dir.path(), 4), &w, &mut net).unwrap();
    // 6 tiles of one size: a batch of 4 (v0, v1) and one of 2 (v2)
    assert_eq!(*log.borrow(), ["S4", "S2", "C", "C"]);
    for (k, x) in xs.iter().enumerate() {
        let want = pointwise(x, Head::Distance);
        let e = deepis::tensor::rel_err(&probabilities(dir.path(), k, &want).data, &want.data, 1.0);
        // blended tiles of a pointwise network: Σ w·y / Σ w = y to rounding
        assert!(e < 1e-6, "input {k}: {e}");
    }
}

#[test]
fn a_failed_batch_fails_the_inputs_it_holds_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights(dir.path(), Head::Distance);
    let xs = inputs(dir.path(), &[[20, 24, 16]; 5]);
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut net = Logged { log: Rc::clone(&log), queued: VecDeque::new(), head: Head::Distance, fail: Some(2), submitted: 0 };
    let a = SegmentArgs { keep_going: true, ..args(dir.path(), 2) };
    let report = segment::run_stream(&a, &w, &mut net).unwrap();
    let name = |k: usize| dir.path().join("in").join(format!("v{k}.npy"));
    assert_eq!(report.written, [0, 1, 4].map(|k| dir.path().join(format!("out/v{k}_labels.npy"))));
    let failed: Vec<(PathBuf, String)> = report.failed.clone();
    assert_eq!(failed.iter().map(|f| f.0.clone()).collect::<Vec<_>>(), [name(2), name(3)]);
    assert!(failed[0].1.contains("planted failure"), "{failed:?}");
    assert!(failed[1].1.contains("in the same batch as a failed input: planted failure"), "{failed:?}");
    let want = pointwise(&xs[4], Head::Distance);
    assert!(same_bits(&probabilities(dir.path(), 4, &want).data, &want.data), "input 4 after the failure");
    assert!(report.into_result().is_err(), "a run with failed inputs exits non-zero");

    // without --keep-going the run stops at the failure, after writing the inputs before it
    let out2 = tempfile::tempdir().unwrap();
    let mut net = Logged { log: Rc::new(RefCell::new(Vec::new())), queued: VecDeque::new(), head: Head::Distance, fail: Some(2), submitted: 0 };
    let a = SegmentArgs { out_dir: out2.path().to_path_buf(), ..args(dir.path(), 2) };
    let e = segment::run_stream(&a, &w, &mut net).unwrap_err().to_string();
    assert!(e.contains("planted failure"), "{e}");
    assert!(out2.path().join("v1_labels.npy").is_file() && !out2.path().join("v2_labels.npy").exists());
}

/// Under test-time augmentation the transforms of a frame share batches too; the average is the
/// one a batch of 1 gives, bit for bit (each transform's output is turned back and summed in
/// the same order whatever the batches).
#[test]
fn transforms_share_batches_and_average_as_alone() {
    let w = {
        let dir = tempfile::tempdir().unwrap();
        weights(dir.path(), Head::Sigmoid)
    };
    let plan = deepis::plan::Plan::new(&w, [16, 16, 8], deepis::plan::PlanOptions::default()).unwrap();
    let x = Tensor::new(Shape::new(2, [16, 16, 8], 1), values(2 * 16 * 16 * 8, 9)).unwrap();
    let run = |batch: usize| {
        let sizes = RefCell::new(Vec::new());
        let mut net = |t: &Tensor| {
            sizes.borrow_mut().push(t.shape.n);
            deepis::model::run_plan(&plan, &w, t)
        };
        let work = segment::Work::new(x.clone(), [16, 16, 8], 4, segment::Blend::Window, true).unwrap();
        let mut stream = segment::Immediate::new(&mut net);
        let mut s = segment::Streamer::new(&mut stream, batch);
        s.push((), Some(Ok(work)));
        let mut done = s.finish();
        let ((), y) = done.pop().unwrap();
        (y.unwrap().unwrap().1, sizes.into_inner())
    };
    let (alone, ones) = run(1);
    let (batched, sizes) = run(5);
    assert_eq!(ones.len(), 32, "2 frames x 16 transforms");
    assert_eq!(sizes, [5, 5, 5, 5, 5, 5, 2], "32 transformed frames 5 at a time");
    assert!(same_bits(&alone.data, &batched.data), "TTA in batches of 5 vs 1");
    // and the average is the TTA of each frame alone (predict_tta frame by frame)
    let per = 16 * 16 * 8;
    for f in 0..2 {
        let xf = Tensor::new(Shape::new(1, [16, 16, 8], 1), x.data[f * per..(f + 1) * per].to_vec()).unwrap();
        let one = segment::predict_tta(&xf, &mut |t| deepis::model::run_plan(&plan, &w, t)).unwrap();
        assert!(same_bits(&one.data, &alone.data[f * one.data.len()..(f + 1) * one.data.len()]), "frame {f}");
    }
}

/// `segment` on the GPU plan's stream: three inputs (two of one size, one of another) in batches
/// of 2, against each input run alone by a plan of its own, bit for bit.
fn gpu_stream_equals_each_alone<D: Device>(dev: impl Fn() -> D, precisions: &[Precision]) {
    let dir = tempfile::tempdir().unwrap();
    let w = Weights::load(&data("tiny", "weights.safetensors")).unwrap();
    w.save(&dir.path().join("w.safetensors")).unwrap();
    let xs = inputs(dir.path(), &[[16, 32, 16], [16, 32, 16], [16, 16, 16]]);
    for &p in precisions {
        let a = SegmentArgs { gpu: GpuOptions { precision: p, ..GpuOptions::default() }, out_dir: dir.path().join(format!("out-{p:?}")), ..args(dir.path(), 2) };
        let mut s = segment::GpuStream::new(dev(), &w, a.gpu);
        let report = segment::run_stream(&a, &w, &mut s).unwrap();
        assert_eq!(report.written.len(), 3);
        for (k, x) in xs.iter().enumerate() {
            let alone = GpuPlan::new(dev(), &w, x.shape.d, 1, p).unwrap().run(x).unwrap();
            let map = deepis::io::read_volume(&a.out_dir.join(format!("v{k}_probabilities.npy"))).unwrap();
            assert!(same_bits(&map.tensor.data, &alone.to_ncdhw()), "{p:?}: input {k} streamed vs alone");
        }
        println!("{p:?} on {}: 3 inputs streamed in batches of 2 (two plans, two batches in flight) = each alone, bit for bit", dev().name());
    }
}

#[test]
fn gpu_stream_gives_each_input_what_its_plan_gives_it_alone() {
    gpu_stream_equals_each_alone(EmuDevice::new, &[Precision::Fp32, Precision::Bf16]);
}

#[test]
fn cuda_gpu_stream_gives_each_input_what_its_plan_gives_it_alone() {
    if cuda_device_or_skip().is_none() {
        return;
    }
    gpu_stream_equals_each_alone(|| cuda_device_or_skip().expect("a CUDA device"), &Precision::ALL);
}
