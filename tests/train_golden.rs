//! Training-mode parity with the PyTorch oracle (float64 golden cases, stored float32): the
//! training-mode output, the edge weight map, the aux labels, the loss and every parameter's
//! gradient of one `train_loss` step (dropout off; epoch 0, and for tiny epoch 150), the loss at
//! epochs 0, 50, 100 and 150, on the CPU backend, and for tiny and readme
//! through the CUDA kernels on the emulator (`GpuBackend<EmuDevice>`).
//! Metric: max|a-e| / max(1e-3, max|e|) <= 1e-3 (the issue's), or per gradient no further than
//! PyTorch float32 on the same stored numbers (DESIGN.md's fair peer); weight map and labels exactly.
//!
//! ReLU kinks: where a pre-activation lies within float32 rounding of 0 (|v| < 1e-7 max|v|), the
//! float32 engine and the float64 oracle may take different sides, and that voxel's whole
//! gradient goes one way or the other (small: one voxel of layer2.blocks.0.conv3 at 1.2e-7 moves
//! its BN bias gradient by 14%). Such voxels are listed; when there are any, every combination of
//! their decisions (at most 2^12) is scored and the test passes when one matches the oracle.
//! `Kinks` (below) wraps the engine's backend to find those voxels in the forward pass and to
//! invert chosen ReLU decisions in the backward pass, so the engine needs no hook for it.
mod common;
use common::*;
use deepis::config::Head;
use deepis::cpu::CpuBackend;
use deepis::gpu::emu::EmuDevice;
use deepis::gpu::ops::GpuBackend;
use deepis::tensor::{rel_err, Tensor};
use deepis::train::loss::{aux_labels, edge_weight, loss_weights, train_loss, EdgeWeight, LossWeights};
use deepis::backend::{Backend, ConvSpec, DevTensor};
use deepis::train::backend::{BnBackward, BnForward, BnSaved};
use deepis::Result;
use std::cell::RefCell;
use deepis::train::{finish_step, forward_train, Params, Step, TrainBackend};
use deepis::weights::Weights;
use std::time::Instant;

const TOL: f32 = 1e-3;

fn check_case<B: TrainBackend>(case: &str, b: B) {
    check_step(case, &Kinks::new(b), "train_step.safetensors", loss_weights(0));
}

fn check_step<B: TrainBackend>(case: &str, b: &Kinks<B>, golden_file: &str, lw: LossWeights) {
    let t0 = Instant::now();
    let w = Weights::load(&data(case, "weights.safetensors")).unwrap();
    let (p, fresh) = Params::from_weights(&w, 0).unwrap();
    assert!(fresh.is_empty(), "{case}: golden weights lack {fresh:?}");
    let x = read_5d(&data(case, "input.npy"));
    let target = read_5d(&data(case, "target.npy"));
    let dev = p.upload(b).unwrap();
    let run = |flips: &[(usize, usize)]| -> Step {
        b.start(flips);
        let f = forward_train(b, &p, &dev, &x, None).unwrap();
        let st = finish_step(b, &p, f, &target, None, lw).unwrap();
        b.finish(case);
        st
    };
    // ReLU inputs within float32 rounding of the kink: (ReLU number in forward order, element, value)
    let step = run(&[]);
    let kinks = b.kinks();
    let secs = t0.elapsed().as_secs_f64();
    println!("{case:<7} {} ReLU pre-activation(s) within 1e-7 max|v| of 0: {:?}", kinks.len(), kinks.iter().map(|k| k.2).collect::<Vec<_>>());
    assert!(kinks.len() <= 12, "{case}: too many ambiguous ReLU decisions to try");

    // eval mode through the same graph code (validation uses it)
    let ev = deepis::train::forward_eval(b, &p, &x).unwrap();
    let e_ev = rel_err(&ev.data, &read_5d(&data(case, "expected.npy")).data, 1.0);
    println!("{case:<7} eval-mode output    rel err {e_ev:.3e}");
    assert!(e_ev <= 1e-4, "{case}: eval-mode output rel err {e_ev:.3e}");
    let want_out = read_5d(&data(case, "train_output.npy"));
    let e_out = rel_err(&step.out.data, &want_out.data, 1e-3);
    println!("{case:<7} train_output       rel err {e_out:.3e}");
    assert!(e_out <= TOL, "{case}: training-mode output rel err {e_out:.3e}");

    // the weight map (pw = 10, as the published trainer trains): computed by deepis from its own
    // output, and from the golden output
    let want_w = read_5d(&data(case, "weight.npy"));
    if p.cfg.head == Head::Distance {
        let mine = step.weight.as_ref().unwrap();
        let diff = mine.data.iter().zip(&want_w.data).filter(|(a, b)| a != b).count();
        let from_golden = edge_weight(&want_out, &target, EdgeWeight::TRAIN).unwrap();
        let diff_g = from_golden.data.iter().zip(&want_w.data).filter(|(a, b)| a != b).count();
        println!("{case:<7} weight.npy         {diff} voxels differ (from the golden output: {diff_g})");
        assert_eq!(diff_g, 0, "{case}: edge_weight of the golden output differs from weight.npy");
        assert_eq!(diff, 0, "{case}: weight map from the engine's output differs in {diff} voxels");
        assert!(want_w.data.contains(&11.0), "{case}: weight.npy has no 1 + pw = 11 voxels: not the training map");
    } else {
        assert!(want_w.data.iter().all(|&v| v == 1.0));
    }
    // the deep-supervision labels at each head's own size
    for (file, head) in [("aux3.npy", &step.c3), ("aux4.npy", &step.c4)] {
        let (dims, want) = read_npy(&data(case, file));
        let (ld, lab) = aux_labels(&target, p.cfg.head, head.shape.d);
        assert_eq!(dims, ld, "{case}: {file} dims");
        let diff = lab.iter().zip(&want).filter(|(&a, &b)| a as f32 != b).count();
        println!("{case:<7} {file:<18} {dims:?}, {diff} labels differ");
        assert_eq!(diff, 0, "{case}: {file}");
    }

    let golden = read_safetensors(&data(case, golden_file));
    // Backward is linear in the ReLU decisions' effects (to first order: a flip upstream of another
    // kink changes what the second one routes), so each flip's gradient change is measured once
    // and every combination is scored from those; the best is then run for real.
    let deltas: Vec<Vec<Option<Vec<f32>>>> = kinks
        .iter()
        .map(|kk| {
            let s1 = run(&[(kk.0, kk.1)]);
            s1.grads.iter().zip(&step.grads).map(|(a, b)| a.as_ref().zip(b.as_ref()).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).collect())).collect()
        })
        .collect();
    let mut best: Option<(usize, f32, u32)> = None;
    for mask in 0..(1u32 << kinks.len()) {
        let mut grads = step.grads.clone();
        for (_, d) in deltas.iter().enumerate().filter(|(k, _)| mask >> k & 1 == 1) {
            for (g, dd) in grads.iter_mut().zip(d) {
                if let (Some(g), Some(dd)) = (g.as_mut(), dd.as_ref()) {
                    g.iter_mut().zip(dd).for_each(|(a, b)| *a += b);
                }
            }
        }
        let (bad, worst) = compare(case, &p, step.loss, &grads, &golden, false);
        if best.is_none_or(|b| (bad, worst) < (b.0, b.1)) {
            best = Some((bad, worst, mask));
        }
    }
    let (_, _, mask) = best.unwrap();
    let flips: Vec<(usize, usize)> = kinks.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, k)| (k.0, k.1)).collect();
    let st = if mask == 0 { None } else { Some(run(&flips)) };
    if mask != 0 {
        println!("{case:<7} matching the oracle takes the other side at {} ReLU kink(s): {:?}", flips.len(), kinks.iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, k)| k.2).collect::<Vec<_>>());
    }
    let st = st.as_ref().unwrap_or(&step);
    let (bad, worst) = compare(case, &p, st.loss, &st.grads, &golden, true);
    println!("{case:<7} worst gradient rel err {worst:.3e}; one step {secs:.2} s");
    assert_eq!(bad, 0, "{case}: {bad} gradients over the tolerance");
}

/// PyTorch float32's error on each epoch-0 gradient (tests/data/make_epochs.py): the fair peer
/// where rounding the stored inputs and weights alone moves a gradient past TOL (readme:
/// layer2.blocks.1.increase.1.bias, 1.2e-3 even in float64).
fn peer_errors(case: &str) -> std::collections::HashMap<String, f32> {
    serde_json::from_str(&std::fs::read_to_string(data(case, "peer_f32_err.json")).unwrap()).unwrap()
}

/// (gradients over the tolerance, worst rel err) of a step against the oracle's.
fn compare(case: &str, p: &Params, loss: f64, grads: &[Option<Vec<f32>>], golden: &[(String, Vec<usize>, Vec<f32>)], verbose: bool) -> (usize, f32) {
    let mut worst = (0.0f32, String::new());
    let mut bad = 0;
    let mut n = 0;
    let peer = peer_errors(case);
    for (name, dims, want) in golden {
        if name == "loss" {
            let e = ((loss - want[0] as f64).abs() / (want[0].abs() as f64).max(1e-3)) as f32;
            if verbose {
                println!("{case:<7} loss {:.6} (golden {:.6}) rel err {e:.3e}", loss, want[0]);
            }
            bad += (e > TOL) as usize;
            continue;
        }
        let pname = name.strip_prefix("grad.").unwrap();
        let i = p.idx(pname).unwrap();
        assert_eq!(&p.specs[i].shape, dims, "{case}: {name}");
        let got = grads[i].as_ref().unwrap_or_else(|| panic!("{case}: no gradient for {pname}"));
        let e = rel_err(got, want, 1e-3);
        if e > worst.0 {
            worst = (e, pname.to_string());
        }
        let tol = TOL.max(peer.get(pname).copied().unwrap_or(0.0));
        if verbose && e > TOL {
            println!("{case:<7} {name:<44} rel err {e:.3e} {}", if e <= tol { format!("within PyTorch float32's {tol:.3e}") } else { "OVER".into() });
        }
        bad += (e > tol) as usize;
        n += 1;
    }
    let extra: Vec<_> = p.specs.iter().enumerate().filter(|(i, s)| grads[*i].is_some() && !golden.iter().any(|g| g.0 == format!("grad.{}", s.name))).map(|(_, s)| s.name.clone()).collect();
    assert!(extra.is_empty(), "{case}: gradients PyTorch has not: {extra:?}");
    if verbose {
        println!("{case:<7} {n} gradients, worst rel err {:.3e} ({})", worst.0, worst.1);
    }
    (bad, worst.0)
}

/// The loss at epochs 0, 50, 100 and 150 (the oracle's `train_loss` with `loss_weights(epoch)`,
/// tests/data/make_epochs.py) from one training-mode forward: each epoch's weights and total.
fn check_epochs(case: &str) {
    let b = CpuBackend::new();
    let p = Params::from_weights(&Weights::load(&data(case, "weights.safetensors")).unwrap(), 0).unwrap().0;
    let x = read_5d(&data(case, "input.npy"));
    let target = read_5d(&data(case, "target.npy"));
    let weight = read_5d(&data(case, "weight.npy"));
    let step = deepis::train::train_step(&b, &p, &x, &target, Some(&weight), loss_weights(0), None).unwrap();
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data(case, "losses_by_epoch.json")).unwrap()).unwrap();
    for e in [0usize, 50, 100, 150] {
        let w = &want["epochs"][e.to_string()];
        let lw: Vec<f64> = w["weights"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(loss_weights(e).to_vec(), lw, "{case}: loss weights of epoch {e}");
        let lg = train_loss(&p.cfg, &step.out, &step.c3, &step.c4, &target, Some(&weight).filter(|_| p.cfg.head == Head::Distance), loss_weights(e)).unwrap();
        let gold = w["loss"].as_f64().unwrap();
        let err = (lg.loss - gold).abs() / gold.abs().max(1e-3);
        println!("{case:<7} epoch {e:>3} weights {lw:?} loss {:.6} (oracle {gold:.6}) rel err {err:.3e}", lg.loss);
        assert!(err <= TOL as f64, "{case}: epoch {e} loss rel err {err:.3e}");
    }
}

#[test]
fn loss_schedule_boundaries() {
    let table = [(0, [0.2, 0.4, 0.4]), (49, [0.2, 0.4, 0.4]), (50, [0.4, 0.3, 0.3]), (99, [0.4, 0.3, 0.3]), (100, [0.6, 0.2, 0.2]), (149, [0.6, 0.2, 0.2]), (150, [0.8, 0.1, 0.1]), (10_000, [0.8, 0.1, 0.1])];
    for (e, w) in table {
        assert_eq!(loss_weights(e), w, "epoch {e}");
    }
}

#[test]
fn golden_losses_by_epoch() {
    for case in ["tiny", "small", "readme", "mid"] {
        check_epochs(case);
    }
}

/// Every gradient of an epoch-150 step (weights 0.8, 0.1, 0.1) against the oracle's.
#[test]
fn golden_train_step_tiny_epoch150() {
    check_step("tiny", &Kinks::new(CpuBackend::new()), "train_step_e150.safetensors", loss_weights(150));
}

#[test]
fn golden_train_step_tiny() {
    check_case("tiny", CpuBackend::new());
}

#[test]
fn golden_train_step_small() {
    check_case("small", CpuBackend::new());
}

#[test]
fn golden_train_step_readme() {
    check_case("readme", CpuBackend::new());
}

#[test]
fn golden_train_step_mid() {
    check_case("mid", CpuBackend::new());
}

/// The same step through the backward kernels on the emulator (slow: run on the host).
#[test]
fn golden_train_step_tiny_emu() {
    check_case("tiny", GpuBackend::new(EmuDevice::new()));
}

#[test]
fn golden_train_step_readme_emu() {
    check_case("readme", GpuBackend::new(EmuDevice::new()));
}

/// The same step on a real GPU (CUDA kernels), when there is one; skips with the reason here.
#[test]
fn golden_train_step_on_cuda() {
    for case in ["tiny", "readme"] {
        let Some(dev) = cuda_device_or_skip() else { return };
        check_case(case, GpuBackend::new(dev));
    }
}

/// A `TrainBackend` that passes every op to `inner`, except that it lists the ReLU inputs within
/// 1e-7 max|v| of 0 (ReLUs numbered in forward order) and inverts the chosen ReLU decisions in
/// `relu_backward` (which the tape calls in reverse forward order).
struct Kinks<B> {
    inner: B,
    st: RefCell<KinkState>,
}

#[derive(Default)]
struct KinkState {
    forward: usize,
    backward: usize,
    kinks: Vec<(usize, usize, f32)>,
    flips: Vec<(usize, usize)>,
}

impl<B: TrainBackend> Kinks<B> {
    fn new(inner: B) -> Self {
        Kinks { inner, st: RefCell::new(KinkState::default()) }
    }

    fn start(&self, flips: &[(usize, usize)]) {
        *self.st.borrow_mut() = KinkState { flips: flips.to_vec(), ..KinkState::default() };
    }

    /// Every ReLU of the forward pass had its backward.
    fn finish(&self, case: &str) {
        let st = self.st.borrow();
        assert_eq!(st.forward, st.backward, "{case}: ReLU forward and backward calls do not pair up");
    }

    fn kinks(&self) -> Vec<(usize, usize, f32)> {
        self.st.borrow().kinks.clone()
    }
}

impl<B: TrainBackend> Backend for Kinks<B> {
    type S = B::S;
    fn name(&self) -> String {
        self.inner.name()
    }
    fn upload(&self, t: &Tensor) -> Result<DevTensor<B::S>> {
        self.inner.upload(t)
    }
    fn download(&self, t: &DevTensor<B::S>) -> Result<Tensor> {
        self.inner.download(t)
    }
    fn upload_param(&self, d: &[f32]) -> Result<B::S> {
        self.inner.upload_param(d)
    }
    fn conv3d(&self, x: &DevTensor<B::S>, w: &B::S, b: Option<&B::S>, s: &ConvSpec) -> Result<DevTensor<B::S>> {
        self.inner.conv3d(x, w, b, s)
    }
    fn channel_affine(&self, x: &DevTensor<B::S>, a: &B::S, b: &B::S, relu: bool) -> Result<DevTensor<B::S>> {
        self.inner.channel_affine(x, a, b, relu)
    }
    fn relu(&self, x: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        let v = self.inner.download(x)?.data;
        let tau = 1e-7 * v.iter().fold(0.0f32, |m, a| m.max(a.abs()));
        let mut st = self.st.borrow_mut();
        let k = st.forward;
        st.kinks.extend(v.iter().enumerate().filter(|(_, a)| a.abs() < tau && **a != 0.0).map(|(e, a)| (k, e, *a)));
        st.forward += 1;
        self.inner.relu(x)
    }
    fn add(&self, a: &DevTensor<B::S>, b: &DevTensor<B::S>, relu: bool) -> Result<DevTensor<B::S>> {
        assert!(!relu, "a fused add + ReLU would escape the kink bookkeeping");
        self.inner.add(a, b, relu)
    }
    fn maxpool2(&self, x: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.maxpool2(x)
    }
    fn upsample(&self, x: &DevTensor<B::S>, size: [usize; 3]) -> Result<DevTensor<B::S>> {
        self.inner.upsample(x, size)
    }
    fn sigmoid(&self, x: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.sigmoid(x)
    }
    fn softmax(&self, x: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.softmax(x)
    }
}

impl<B: TrainBackend> TrainBackend for Kinks<B> {
    fn download_param(&self, s: &B::S) -> Result<Vec<f32>> {
        self.inner.download_param(s)
    }
    fn duplicate(&self, t: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.duplicate(t)
    }
    fn accumulate(&self, acc: &mut DevTensor<B::S>, g: &DevTensor<B::S>) -> Result<()> {
        self.inner.accumulate(acc, g)
    }
    fn accumulate_param(&self, acc: &mut B::S, g: &B::S) -> Result<()> {
        self.inner.accumulate_param(acc, g)
    }
    fn mul(&self, a: &DevTensor<B::S>, b: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.mul(a, b)
    }
    fn conv3d_backward_input(&self, dy: &DevTensor<B::S>, w: &B::S, s: &ConvSpec, d: [usize; 3]) -> Result<DevTensor<B::S>> {
        self.inner.conv3d_backward_input(dy, w, s, d)
    }
    fn conv3d_backward_weight(&self, x: &DevTensor<B::S>, dy: &DevTensor<B::S>, s: &ConvSpec) -> Result<B::S> {
        self.inner.conv3d_backward_weight(x, dy, s)
    }
    fn conv3d_backward_bias(&self, dy: &DevTensor<B::S>) -> Result<B::S> {
        self.inner.conv3d_backward_bias(dy)
    }
    fn batch_norm_train(&self, x: &DevTensor<B::S>, g: &B::S, b: &B::S, eps: f64) -> Result<BnForward<B::S>> {
        self.inner.batch_norm_train(x, g, b, eps)
    }
    fn batch_norm_backward(&self, dy: &DevTensor<B::S>, x: &DevTensor<B::S>, g: &B::S, s: &BnSaved<B::S>) -> Result<BnBackward<B::S>> {
        self.inner.batch_norm_backward(dy, x, g, s)
    }
    fn relu_backward(&self, dy: &DevTensor<B::S>, y: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        let dx = self.inner.relu_backward(dy, y)?;
        let mut st = self.st.borrow_mut();
        st.backward += 1;
        let k = st.forward - st.backward;
        let flips: Vec<usize> = st.flips.iter().filter(|f| f.0 == k).map(|f| f.1).collect();
        if flips.is_empty() {
            return Ok(dx);
        }
        let (mut h, g) = (self.inner.download(&dx)?, self.inner.download(dy)?);
        for e in flips {
            h.data[e] = if h.data[e] == 0.0 { g.data[e] } else { 0.0 };
        }
        self.inner.upload(&h)
    }
    fn maxpool2_backward(&self, dy: &DevTensor<B::S>, x: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.maxpool2_backward(dy, x)
    }
    fn upsample_backward(&self, dy: &DevTensor<B::S>, d: [usize; 3]) -> Result<DevTensor<B::S>> {
        self.inner.upsample_backward(dy, d)
    }
    fn sigmoid_backward(&self, dy: &DevTensor<B::S>, y: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.sigmoid_backward(dy, y)
    }
    fn softmax_backward(&self, dy: &DevTensor<B::S>, y: &DevTensor<B::S>) -> Result<DevTensor<B::S>> {
        self.inner.softmax_backward(dy, y)
    }
}
