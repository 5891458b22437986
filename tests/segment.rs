//! `segment`: tiled prediction equals untiled prediction, masks and component filtering, the file
//! front end and its errors.
mod common;
use deepis::config::{Config, Head};
use deepis::cpu::CpuBackend;
use deepis::model::Network;
use deepis::segment::{self, expand_inputs, labels_from_output, masks, predict_tiled, tile_starts, SegmentArgs};
use deepis::tensor::{Shape, Tensor};
use deepis::weights::Weights;

fn small_config() -> Config {
    Config { widths: [4, 8, 8, 8, 8], trans_feature: 4, blocks: [1; 4], gcn_kernels: [3; 4], ..Config::default() }
}

fn random_volume(d: [usize; 3], seed: u64) -> Tensor {
    let mut r = deepis::rng::Rng::new(seed);
    Tensor::new(Shape::new(1, d, 1), (0..d[0] * d[1] * d[2]).map(|_| r.normal() as f32).collect()).unwrap()
}

/// Random weights with every path below full resolution zeroed (gcn2..5, ConBR2..4): the output
/// is final(ConBR1(gcn1(conv1(x)))), whose receptive field reaches 4 voxels, so a tile whose
/// window ignores its outer 4 voxels must reproduce the whole-volume prediction.
fn local_weights(seed: u64) -> Weights {
    let cfg = small_config();
    let w = Weights::random(&cfg, seed);
    let deep = ["gcn2.", "gcn3.", "gcn4.", "gcn5.", "ConBR2.", "ConBR3.", "ConBR4."];
    let t: Vec<_> = w
        .to_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, s, d)| if deep.iter().any(|p| n.starts_with(p)) { (n, s, vec![0.0; d.len()]) } else { (n, s, d) })
        .collect();
    Weights::from_tensors(&cfg, &t).unwrap()
}

#[test]
fn tile_starts_cover_the_axis_on_the_grid() {
    for (n, t, o) in [(100, 32, 16), (64, 64, 16), (50, 64, 8), (129, 48, 8), (70, 20, 4)] {
        let s = tile_starts(n, t, o);
        let len = t.min(n);
        assert_eq!(s[0], 0);
        assert_eq!(*s.last().unwrap() + len, n);
        for w in s.windows(2) {
            assert!(w[1] > w[0] && w[1] - w[0] <= len - o, "{n} {t} {o}: {s:?}");
        }
        if t - o >= 16 {
            assert!(s[..s.len() - 1].iter().all(|x| x % 16 == 0), "{s:?}");
        }
    }
}

#[test]
fn blending_reproduces_a_pointwise_predictor_exactly() {
    let x = random_volume([37, 29, 21], 1);
    let mut f = |t: &Tensor| -> deepis::Result<Tensor> {
        let data = t.data.iter().flat_map(|&v| [2.0 * v + 1.0, -v]).collect();
        Tensor::new(t.shape.with_c(2), data)
    };
    let whole = f(&x).unwrap();
    for (tile, overlap) in [([16, 16, 16], 8), ([20, 12, 40], 4), ([17, 17, 9], 0), ([64, 64, 64], 16)] {
        let y = predict_tiled(&x, tile, overlap, &mut f).unwrap();
        let e = deepis::tensor::rel_err(&y.data, &whole.data, 1.0);
        assert!(e < 1e-6, "tile {tile:?} overlap {overlap}: {e}");
    }
}

/// Tiles of up to `batch` frames given to the predictor at once give every frame, bit for bit, what
/// it gets one frame at a time (same tiles, same blending order), for a 5-frame time-lapse in
/// batches of 3 (a full and a partial batch), whole-volume and tiled; the predictor sees the batches.
#[test]
fn batched_tiles_give_each_frame_what_it_gets_alone() {
    let w = local_weights(4);
    let d = [40, 36, 20];
    let frames: Vec<f32> = (0..5).flat_map(|k| random_volume(d, 10 + k).data).collect();
    let x = Tensor::new(Shape::new(5, d, 1), frames).unwrap();
    let plan = deepis::plan::Plan::new(&w, [24, 24, 20], deepis::plan::PlanOptions::default()).unwrap();
    for (tile, overlap) in [([64, 64, 64], 8), ([24, 24, 20], 8)] {
        let whole = tile == [64, 64, 64];
        let seen = std::cell::RefCell::new(Vec::new());
        let mut net = |t: &Tensor| {
            seen.borrow_mut().push(t.shape.n);
            if whole { Network::new(CpuBackend::new(), &w)?.forward(t) } else { deepis::model::run_plan(&plan, &w, t) }
        };
        let alone = segment::predict_tiled_batched(&x, tile, overlap, segment::Blend::Window, 1, &mut net).unwrap();
        let tiles = seen.borrow().len() / 5;
        seen.borrow_mut().clear();
        let batched = segment::predict_tiled_batched(&x, tile, overlap, segment::Blend::Window, 3, &mut net).unwrap();
        let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&alone), bits(&batched), "tile {tile:?}: batched frames differ from frames alone");
        // the 5 x tiles tiles go 3 at a time, frame by frame, tile by tile: full batches across frames
        let items = 5 * tiles;
        let want: Vec<usize> = [3].repeat(items / 3).into_iter().chain((items % 3 > 0).then_some(items % 3)).collect();
        assert_eq!(*seen.borrow(), want, "tile {tile:?}: the predictor's batches ({tiles} tile(s) per frame)");
    }
}

#[test]
fn tiled_network_prediction_equals_untiled() {
    let w = local_weights(3);
    let net = Network::new(CpuBackend::new(), &w).unwrap();
    let x = random_volume([56, 44, 40], 2);
    let t0 = std::time::Instant::now();
    let whole = net.forward(&x).unwrap();
    let t_whole = t0.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    let tiled = predict_tiled(&x, [32, 32, 24], 16, &mut |t| net.forward(t)).unwrap();
    let t_tiled = t0.elapsed().as_secs_f64();
    let max = whole.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let e = deepis::tensor::rel_err(&tiled.data, &whole.data, 1e-3);
    println!("local network: tiled vs whole max rel err {e:.2e} (max |y| {max:.3}); whole {t_whole:.2} s, 3x3x3 tiles {t_tiled:.2} s");
    assert!(e <= 1e-4, "{e}");

    // The full network sees the whole volume (global convolutions, align_corners up-sampling):
    // tiles then differ near their seams; what must hold is that one tile is the untiled run.
    let full = Weights::random(&small_config(), 4);
    let net = Network::new(CpuBackend::new(), &full).unwrap();
    let whole = net.forward(&x).unwrap();
    let one = predict_tiled(&x, [64, 64, 64], 16, &mut |t| net.forward(t)).unwrap();
    assert_eq!(one.data, whole.data);
    let tile = [32, 32, 24];
    let tiled = predict_tiled(&x, tile, 16, &mut |t| net.forward(t)).unwrap();
    let e = deepis::tensor::rel_err(&tiled.data, &whole.data, 1e-3);
    // Tiles cannot reproduce a global receptive field, so the blend differs from the whole run;
    // what the blend must be is, at every voxel, a weighted mean of the predictions of the tiles
    // covering it: inside their [min, max] (checked here tile by tile, independently).
    let d = x.shape.d;
    let (mut lo, mut hi) = (vec![f32::INFINITY; tiled.data.len()], vec![f32::NEG_INFINITY; tiled.data.len()]);
    let starts: Vec<Vec<usize>> = (0..3).map(|k| tile_starts(d[k], tile[k].min(d[k]), 16)).collect();
    for &a in &starts[0] {
        for &b in &starts[1] {
            for &c in &starts[2] {
                let len = [tile[0].min(d[0]), tile[1].min(d[1]), tile[2].min(d[2])];
                let crop: Vec<f32> = (0..len[0] * len[1] * len[2])
                    .map(|p| x.data[((a + p / (len[1] * len[2])) * d[1] + b + p / len[2] % len[1]) * d[2] + c + p % len[2]])
                    .collect();
                let y = net.forward(&Tensor::new(Shape::new(1, len, 1), crop).unwrap()).unwrap();
                for (p, v) in y.data.iter().enumerate() {
                    let q = ((a + p / (len[1] * len[2])) * d[1] + b + p / len[2] % len[1]) * d[2] + c + p % len[2];
                    lo[q] = lo[q].min(*v);
                    hi[q] = hi[q].max(*v);
                }
            }
        }
    }
    let outside = tiled.data.iter().enumerate().filter(|&(q, v)| *v < lo[q] - 1e-5 || *v > hi[q] + 1e-5).count();
    println!("full random network: tiled vs whole max rel err {e:.3}; blend outside its tiles' range at {outside} voxels");
    assert_eq!(outside, 0, "the blend is not a weighted mean of the tiles' predictions");
    assert!(e > 0.0 && e.is_finite(), "a global network cannot be tiled exactly: {e}");
}

#[test]
fn masks_follow_the_head() {
    let y = Tensor::new(Shape::new(1, [1, 1, 5], 1), vec![0.7, 0.5, 0.0, -0.6, -0.4]).unwrap();
    assert_eq!(masks(&y, Head::Distance, 0.5).unwrap(), vec![1, 0, 0, 2, 0]);
    assert_eq!(masks(&y, Head::Distance, 0.3).unwrap(), vec![1, 1, 0, 2, 2]);
    let s = Tensor::new(Shape::new(1, [1, 1, 4], 2), vec![0.9, 0.9, 0.2, 0.8, 0.4, 0.3, 0.6, 0.1]).unwrap();
    assert_eq!(masks(&s, Head::Sigmoid, 0.5).unwrap(), vec![1, 2, 0, 1]);
    assert!(masks(&s, Head::Distance, 0.5).is_err());
}

#[test]
fn small_components_are_removed_but_the_largest_is_kept() {
    let d = [20, 20, 20];
    let mut y = Tensor::zeros(Shape::new(1, d, 1));
    let mut put = |lo: [usize; 3], hi: [usize; 3], v: f32| {
        for i in lo[0]..hi[0] {
            for j in lo[1]..hi[1] {
                for k in lo[2]..hi[2] {
                    y.data[(i * d[1] + j) * d[2] + k] = v;
                }
            }
        }
    };
    put([1, 1, 1], [9, 9, 9], 2.0); // effector, 512 voxels
    put([12, 12, 12], [14, 14, 14], 2.0); // effector debris, 8 voxels
    put([15, 1, 1], [16, 2, 2], 2.0); // effector debris, 1 voxel
    put([1, 12, 1], [4, 15, 4], -2.0); // target, 27 voxels only: the largest target, kept
    put([10, 1, 10], [11, 2, 11], -2.0); // target debris, 1 voxel
    put([10, 10, 1], [11, 11, 2], 2.0); // 26-connected to nothing
    let (l, removed) = labels_from_output(&y, Head::Distance, 0.5, false, 100).unwrap();
    assert_eq!(removed, 8 + 1 + 1 + 1);
    assert_eq!(l.iter().filter(|&&v| v == 1).count(), 512);
    assert_eq!(l.iter().filter(|&&v| v == 2).count(), 27);
    // Diagonal neighbours are connected (26-connectivity).
    let mut y2 = Tensor::zeros(Shape::new(1, [3, 3, 3], 1));
    y2.data[0] = 1.0;
    y2.data[13] = 1.0;
    y2.data[26] = 1.0;
    let (l2, removed2) = labels_from_output(&y2, Head::Distance, 0.5, false, 3).unwrap();
    assert_eq!((removed2, l2.iter().filter(|&&v| v == 1).count()), (0, 3));
}

fn args(inputs: Vec<String>, out: &std::path::Path, w: &std::path::Path) -> SegmentArgs {
    common::segment_args(inputs, out, w)
}

#[test]
fn files_folders_globs_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::create_dir(p("in")).unwrap();
    std::fs::create_dir(p("empty")).unwrap();
    let cfg = small_config();
    let w = Weights::random(&cfg, 9);
    w.save(&p("w.safetensors")).unwrap();
    let x = random_volume([40, 36, 20], 5);
    deepis::io::write_npy(&p("in/a.npy"), &[40, 36, 20], &x.data).unwrap();
    let x2 = random_volume([20, 20, 20], 6);
    let two: Vec<f32> = x2.data.iter().chain(&x2.data).copied().collect();
    deepis::io::write_npy(&p("in/b.npy"), &[2, 20, 20, 20], &two).unwrap();
    std::fs::write(p("in/notes.txt"), "not a volume").unwrap();

    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let folder = p("in").display().to_string();
    let pattern = format!("{}/*.npy", folder);
    assert_eq!(expand_inputs(&s(&[&folder])).unwrap().len(), 2);
    assert_eq!(expand_inputs(&s(&[&pattern])).unwrap().len(), 2);

    let net = Network::new(CpuBackend::new(), &w).unwrap();
    let a = args(s(&[&pattern]), &p("out"), &p("w.safetensors"));
    let written = segment::run(&a, &w, &mut |t| net.forward(t)).unwrap().written;
    assert_eq!(written, vec![p("out/a_labels.npy"), p("out/b_labels.npy")]);
    let la = deepis::io::read_volume(&written[0]).unwrap();
    assert_eq!((la.rank, la.tensor.shape.d), (3, [40, 36, 20]));
    assert!(la.tensor.data.iter().all(|&v| v == 0.0 || v == 1.0 || v == 2.0));
    let lb = deepis::io::read_volume(&written[1]).unwrap();
    assert_eq!((lb.rank, lb.tensor.shape.n), (4, 2));

    let err = |a: &SegmentArgs| segment::run(a, &w, &mut |t| net.forward(t)).unwrap_err().to_string();
    let e = err(&args(s(&[p("nope.npy").to_str().unwrap()]), &p("out"), &p("w.safetensors")));
    assert!(e.contains("nope.npy") && e.contains("no such file"), "{e}");
    let e = err(&args(s(&[p("empty").to_str().unwrap()]), &p("out"), &p("w.safetensors")));
    assert!(e.contains("no .npy, .tif or .tiff"), "{e}");
    let e = err(&SegmentArgs { overlap: 24, ..args(s(&[&folder]), &p("out"), &p("w.safetensors")) });
    assert!(e.contains("--overlap 24"), "{e}");
    let e = err(&SegmentArgs { tau: -1.0, ..args(s(&[&folder]), &p("out"), &p("w.safetensors")) });
    assert!(e.contains("--tau"), "{e}");
}

#[test]
fn cores_regrow_to_the_exact_masks_from_the_true_distance() {
    // The synthetic distance targets are what a perfect distance head would output: thresholding
    // them at tau = 0.5 um loses a rim; regrowing the cores gives the labels back exactly.
    let o = deepis::synth::SynthOptions { frames: 1, size: [64, 64, 32], voxel_size: [0.2, 0.2, 0.4], seed: 2 };
    let f = deepis::synth::synthesize_frame(&o, 0).unwrap();
    let y = Tensor::new(Shape::new(1, o.size, 1), f.distance.clone()).unwrap();
    let dice = |l: &[u8], c: u8| {
        let (mut i, mut a, mut b) = (0, 0, 0);
        for (&p, &g) in l.iter().zip(&f.labels) {
            i += (p == c && g == c) as usize;
            a += (p == c) as usize;
            b += (g == c) as usize;
        }
        2.0 * i as f64 / (a + b) as f64
    };
    let (cores, _) = labels_from_output(&y, Head::Distance, 0.5, false, 10).unwrap();
    let (grown, _) = labels_from_output(&y, Head::Distance, 0.5, true, 10).unwrap();
    println!("Dice from the exact distance at tau 0.5: cores {:.3} / {:.3}, regrown {:.3} / {:.3}", dice(&cores, 1), dice(&cores, 2), dice(&grown, 1), dice(&grown, 2));
    assert!(dice(&cores, 1) < 0.95);
    assert_eq!(grown, f.labels);
}

#[test]
fn cli_synth_segment_analyze() {
    let exe = env!("CARGO_BIN_EXE_deepis");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(exe).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (ok, err) = run(&["synth", "-o", &s(&d.join("syn")), "--frames", "2", "--size", "32,32,16", "--voxel-size", "0.8,0.8,1.6", "--seed", "4"]);
    assert!(ok, "{err}");
    assert!(d.join("syn/preview.png").is_file());
    let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tiny/weights.safetensors");
    let (ok, err) = run(&["segment", "--weights", weights, &s(&d.join("syn/input.npy")), "-o", &s(&d.join("seg")), "--tile", "32,32,16", "--overlap", "4", "--backend", "cpu"]);
    assert!(ok, "{err}");
    let csv = d.join("m.csv");
    let (ok, err) = run(&["analyze", &s(&d.join("seg/input_labels.npy")), "--ri", &s(&d.join("syn/input.npy")), "--voxel-size", "0.8,0.8,1.6", "-o", &s(&csv), "--plot", &s(&d.join("m.png"))]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 3);
    assert!(d.join("m.png").is_file());
    let (ok, err) = run(&["analyze", &s(&d.join("syn/labels.npy")), "--voxel-size", "0.8,0,1.6", "-o", &s(&csv)]);
    assert!(!ok && err.contains("axis D1"), "{err}");
}

#[test]
fn tta_averages_over_the_training_transforms() {
    use deepis::segment::{predict_tta, tta_transforms};
    assert_eq!(tta_transforms([8, 8, 5]).len(), 16);
    assert_eq!(tta_transforms([8, 6, 5]).len(), 8);
    // A predictor that outputs each voxel's D0 coordinate in [-1, 1]: the flips and quarter turns
    // of the D0-D1 plane average it to 0 everywhere; without TTA it is the coordinate itself.
    let coord = |t: &Tensor| -> deepis::Result<Tensor> {
        let [a, b, e] = t.shape.d;
        let data = (0..a * b * e).map(|p| 2.0 * (p / (b * e)) as f32 / (a - 1) as f32 - 1.0).collect();
        Tensor::new(t.shape, data)
    };
    for d in [[8, 8, 5], [8, 6, 5]] {
        let x = random_volume(d, 3);
        let y = predict_tta(&x, &mut |t| coord(t)).unwrap();
        let worst = y.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!("{d:?}: TTA of the D0 coordinate: max |mean| {worst:.2e}");
        assert!(worst < 1e-6, "{worst}");
        assert!(coord(&x).unwrap().data.iter().any(|v| v.abs() > 0.5));
    }
    // A pointwise predictor commutes with every transform: TTA changes nothing.
    let x = random_volume([16, 16, 9], 4);
    let mut f = |t: &Tensor| -> deepis::Result<Tensor> { Tensor::new(t.shape.with_c(2), t.data.iter().flat_map(|&v| [2.0 * v + 1.0, -v]).collect()) };
    let plain = f(&x).unwrap();
    let e = deepis::tensor::rel_err(&predict_tta(&x, &mut f).unwrap().data, &plain.data, 1.0);
    assert!(e < 1e-6, "pointwise predictor under TTA: {e}");
    // With the network: TTA makes the prediction equivariant, flipping the input flips the output.
    let w = Weights::random(&small_config(), 5);
    let net = Network::new(CpuBackend::new(), &w).unwrap();
    let x = random_volume([32, 32, 16], 6);
    let flip = deepis::train::data::Augment { flip: [true, false, false], rot: 1 };
    let a = flip.apply(&predict_tta(&x, &mut |t| net.forward(t)).unwrap());
    let b = predict_tta(&flip.apply(&x), &mut |t| net.forward(t)).unwrap();
    let plain_a = flip.apply(&net.forward(&x).unwrap());
    let plain_b = net.forward(&flip.apply(&x)).unwrap();
    let (e_tta, e_plain) = (deepis::tensor::rel_err(&a.data, &b.data, 1e-3), deepis::tensor::rel_err(&plain_a.data, &plain_b.data, 1e-3));
    println!("flip + turn of the input: TTA outputs differ by {e_tta:.2e}, plain outputs by {e_plain:.2e}");
    assert!(e_tta < 1e-5, "{e_tta}");
    assert!(e_plain > 1e-3, "a random network is not equivariant by itself: {e_plain}");
}

#[test]
fn gaussian_blending_reproduces_a_pointwise_predictor_and_a_local_network() {
    use deepis::segment::{predict_tiled_with, Blend};
    let x = random_volume([37, 29, 21], 1);
    let mut f = |t: &Tensor| -> deepis::Result<Tensor> { Tensor::new(t.shape, t.data.iter().map(|&v| 3.0 * v - 1.0).collect()) };
    let whole = f(&x).unwrap();
    for (tile, overlap) in [([16, 16, 16], 8), ([20, 12, 40], 4)] {
        let y = predict_tiled_with(&x, tile, overlap, Blend::Gaussian, &mut f).unwrap();
        let e = deepis::tensor::rel_err(&y.data, &whole.data, 1.0);
        assert!(e < 1e-5, "tile {tile:?}: {e}");
    }
    // A network that sees 4 voxels: the Gaussian weights tile edges down but not to 0, so the
    // seams keep a small error, bounded here; the window (0 at the edges) is exact.
    let w = local_weights(3);
    let net = Network::new(CpuBackend::new(), &w).unwrap();
    let x = random_volume([56, 44, 40], 2);
    let whole = net.forward(&x).unwrap();
    let mut e = [0.0; 2];
    for (k, blend) in [Blend::Window, Blend::Gaussian].into_iter().enumerate() {
        let y = predict_tiled_with(&x, [32, 32, 24], 16, blend, &mut |t| net.forward(t)).unwrap();
        e[k] = deepis::tensor::rel_err(&y.data, &whole.data, 1e-3);
    }
    println!("local network, tiled vs whole: window {:.2e}, gaussian {:.2e}", e[0], e[1]);
    assert!(e[0] <= 1e-4 && e[1] < 0.05 && e[1] > e[0], "{e:?}");
}

/// The 26-connected components of `mask` by a plain flood fill with every bound checked: ids in
/// the C order of each component's first voxel, and sizes.
fn plain_components(mask: &[bool], [n0, n1, n2]: [usize; 3]) -> (Vec<u32>, Vec<usize>) {
    let mut id = vec![0u32; mask.len()];
    let mut sizes = vec![0usize];
    for start in 0..mask.len() {
        if !mask[start] || id[start] != 0 {
            continue;
        }
        let label = sizes.len() as u32;
        let (mut stack, mut count) = (vec![start], 0);
        id[start] = label;
        while let Some(p) = stack.pop() {
            count += 1;
            let (i, j, k) = (p / (n1 * n2), p / n2 % n1, p % n2);
            for a in i.saturating_sub(1)..(i + 2).min(n0) {
                for b in j.saturating_sub(1)..(j + 2).min(n1) {
                    for c in k.saturating_sub(1)..(k + 2).min(n2) {
                        let q = (a * n1 + b) * n2 + c;
                        if mask[q] && id[q] == 0 {
                            id[q] = label;
                            stack.push(q);
                        }
                    }
                }
            }
        }
        sizes.push(count);
    }
    (id, sizes)
}

/// Connected components, the regrowth of cores and the removal of small components (all classes
/// at once), on the padded volume with fixed neighbour offsets, against a plain flood fill class
/// by class on random volumes of odd sizes (1-voxel sides too) and densities: the same ids,
/// sizes and labels.
#[test]
fn components_and_regrowth_equal_a_plain_flood_fill() {
    use deepis::analysis::components::label_components;
    let sizes = [[1, 1, 1], [1, 7, 5], [6, 1, 9], [7, 3, 9], [19, 17, 13], [32, 24, 20]];
    let mut cases = 0;
    for (s, &d) in sizes.iter().enumerate() {
        let n: usize = d.iter().product();
        // random values (short runs), and a smooth field (long runs, large blobs)
        for (t, (cut, smooth)) in [(-0.6f32, false), (0.0, false), (0.5, false), (0.0, true), (0.3, true)].into_iter().enumerate() {
            let v = if smooth {
                (0..n).map(|p| (((p / (d[1] * d[2])) as f32 * 0.45).sin() + ((p / d[2] % d[1]) as f32 * 0.35).cos() + ((p % d[2]) as f32 * 0.3).sin()) / 3.0).collect()
            } else {
                common::values(n, 100 + 10 * s as u64 + t as u64)
            };
            let mask: Vec<bool> = v.iter().map(|&x| x > cut).collect();
            let (id, sz) = label_components(&mask, d);
            assert_eq!((id, sz), plain_components(&mask, d), "components of {d:?} at density {cut}");
            // cores where |x| > 0.7, regrown through voxels of the same sign
            let mut l: Vec<u8> = v.iter().map(|&x| if x > 0.7 { 1 } else if x < -0.7 { 2 } else { 0 }).collect();
            let (pos, _) = plain_components(&v.iter().map(|&x| x > 0.0).collect::<Vec<_>>(), d);
            let (neg, _) = plain_components(&v.iter().map(|&x| x < 0.0).collect::<Vec<_>>(), d);
            // a voxel is effector (target) when its component of x > 0 (x < 0) holds an effector (target) core
            let holds = |ids: &[u32], c: u8| -> std::collections::HashSet<u32> { (0..n).filter(|&p| l[p] == c).map(|p| ids[p]).collect() };
            let (e, g) = (holds(&pos, 1), holds(&neg, 2));
            let want: Vec<u8> = (0..n).map(|p| if e.contains(&pos[p]) && pos[p] != 0 { 1 } else if g.contains(&neg[p]) && neg[p] != 0 { 2 } else { 0 }).collect();
            segment::regrow(&mut l, &v, d);
            assert_eq!(l, want, "regrowth in {d:?} (seed {s}/{t})");
            // small components of classes 1 and 2 removed (3 left alone), as class by class
            let three: Vec<u8> = v.iter().map(|&x| if x > cut + 0.2 { 1 } else if x < cut - 0.2 { 2 } else if x.abs() < 0.05 { 3 } else { 0 }).collect();
            let mut want = three.clone();
            let mut want_removed = 0;
            for class in [1u8, 2] {
                let (id, sz) = plain_components(&three.iter().map(|&x| x == class).collect::<Vec<_>>(), d);
                let Some(largest) = (1..sz.len()).max_by_key(|&c| (sz[c], std::cmp::Reverse(c))) else { continue };
                for p in 0..n {
                    let c = id[p] as usize;
                    if c != 0 && c != largest && sz[c] < 4 {
                        want[p] = 0;
                        want_removed += 1;
                    }
                }
            }
            let mut got = three.clone();
            let removed = deepis::analysis::components::remove_small_components(&mut got, d, &[1, 2], 4);
            assert_eq!((got, removed), (want, want_removed), "small components of {d:?} (seed {s}/{t})");
            cases += 1;
        }
    }
    println!("{cases} random volumes: components, regrowth and the removal of small components as a plain flood fill gives them");
}
