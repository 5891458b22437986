//! `synth`: determinism, value ranges, label / distance consistency and the course of the contact.
use deepis::analysis::{analyze_frame, Options};
use deepis::synth::{synthesize, write_time_lapse, Frame, SynthOptions};
use std::sync::OnceLock;

/// A small, coarse time-lapse (the same field of view in um as the default, 1/8 of the voxels).
fn small(seed: u64) -> SynthOptions {
    SynthOptions { frames: 5, size: [64, 64, 32], voxel_size: [0.4, 0.4, 0.8], seed }
}

fn frames() -> &'static Vec<Frame> {
    static F: OnceLock<Vec<Frame>> = OnceLock::new();
    F.get_or_init(|| {
        let t = std::time::Instant::now();
        let f = synthesize(&small(7)).unwrap();
        println!("5 frames of 64x64x32 in {:.2} s", t.elapsed().as_secs_f64());
        f
    })
}

#[test]
fn seeded_runs_are_bit_identical() {
    let a = frames();
    let b = synthesize(&small(7)).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.labels, y.labels);
        assert!(x.ri.iter().zip(&y.ri).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(x.distance.iter().zip(&y.distance).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    let c = synthesize(&SynthOptions { frames: 1, ..small(8) }).unwrap();
    assert_ne!(c[0].ri, a[0].ri, "another seed gives another scene");
}

#[test]
fn values_are_in_physical_ranges() {
    let o = small(7);
    for f in frames() {
        let mean = |class: u8| {
            let v: Vec<f64> = f.labels.iter().zip(&f.ri).filter(|(&l, _)| l == class).map(|(_, &r)| r as f64).collect();
            (v.iter().sum::<f64>() / v.len() as f64, v.len())
        };
        let ((me, ne), (mt, nt), (mb, _)) = (mean(1), mean(2), mean(0));
        println!("frame {}: RI effector {me:.4} target {mt:.4} background {mb:.4}; truth {:?}", f.truth.frame, f.truth);
        assert!(ne > 0 && nt > 0);
        assert!((1.367..1.385).contains(&me), "effector mean RI {me}");
        assert!((1.355..1.366).contains(&mt), "target mean RI {mt}");
        assert!((mb - 1.337).abs() < 0.003, "background mean RI {mb}");
        assert!(f.ri.iter().all(|r| r.is_finite() && (1.32..1.41).contains(r)));
        // Sizes: effector 8-10 um across, target 14-18 um.
        let vv = o.voxel_size.iter().product::<f64>();
        let ball = |d: f64| std::f64::consts::PI / 6.0 * d * d * d;
        let (ve, vt) = (ne as f64 * vv, nt as f64 * vv);
        assert!(ve > 0.75 * ball(8.0) && ve < 1.25 * ball(10.0), "effector volume {ve}");
        assert!(vt > 0.7 * ball(14.0) && vt < 1.2 * ball(18.0), "target volume {vt}");
    }
}

#[test]
fn distance_sign_matches_labels() {
    let o = small(7);
    let vmin = o.voxel_size.iter().cloned().fold(f64::MAX, f64::min) as f32;
    for f in frames() {
        for (&l, &d) in f.labels.iter().zip(&f.distance) {
            match l {
                1 => assert!(d >= vmin - 1e-6, "effector voxel with distance {d}"),
                2 => assert!(d <= -vmin + 1e-6, "target voxel with distance {d}"),
                _ => assert_eq!(d, 0.0),
            }
        }
        let max = f.distance.iter().cloned().fold(0.0f32, f32::max);
        let min = f.distance.iter().cloned().fold(0.0f32, f32::min);
        let ne = f.labels.iter().filter(|&&l| l == 1).count();
        println!("frame {}: deepest effector voxel {max:.2} um, target {min:.2} um, {ne} effector voxels", f.truth.frame);
        assert!((2.8..6.0).contains(&max), "the effector's deepest voxel is {max} um inside");
    }
}

#[test]
fn the_effector_approaches_touches_and_spreads() {
    let o = small(7);
    let opt = Options { voxel_size: o.voxel_size, ..Options::default() };
    let m: Vec<_> = frames().iter().map(|f| analyze_frame(f.truth.frame, &f.labels, Some(&f.ri), o.size, &opt)).collect();
    for (f, r) in frames().iter().zip(&m) {
        println!("frame {}: gap {:.2} um, contact radius {:.2} um, IS area {:.2} um2, centroid distance {:.2} um, effector sphericity {:.3}", r.frame, f.truth.gap_um, f.truth.contact_radius_um, r.is_area_um2, r.centroid_distance_um, r.effector_sphericity);
    }
    let first = &frames()[0].truth;
    let last = &frames()[4].truth;
    assert!(first.gap_um > 1.0 && first.contact_radius_um == 0.0);
    assert!(last.gap_um == 0.0 && last.contact_radius_um > 3.0, "{last:?}");
    assert_eq!(m[0].is_area_um2, 0.0, "no synapse before contact (gap > --is-distance)");
    assert!(m[4].is_area_um2 > 20.0, "a broad synapse at the end: {}", m[4].is_area_um2);
    assert!(m.windows(2).skip(1).all(|w| w[1].is_area_um2 >= w[0].is_area_um2 * 0.95), "the synapse grows");
    assert!(m.windows(2).all(|w| w[1].centroid_distance_um < w[0].centroid_distance_um + 0.2), "the cells come closer");
    assert!(m[4].effector_sphericity < m[0].effector_sphericity - 0.02, "the effector flattens");
}

#[test]
fn writes_the_dataset_layout() {
    let dir = tempfile::tempdir().unwrap();
    let o = SynthOptions { frames: 2, size: [32, 32, 16], voxel_size: [0.8, 0.8, 1.6], seed: 3 };
    let truth = write_time_lapse(dir.path(), &o, |_| {}).unwrap();
    assert_eq!(truth.len(), 2);
    for sub in ["input/t000.npy", "input/t001.npy", "labels/t001.npy", "target/t001.npy", "input.npy", "labels.npy", "synth.json"] {
        assert!(dir.path().join(sub).is_file(), "{sub}");
    }
    let v = deepis::io::read_volume(&dir.path().join("input.npy")).unwrap();
    assert_eq!((v.rank, v.tensor.shape.n, v.tensor.shape.d), (4, 2, [32, 32, 16]));
    let l = deepis::io::read_volume(&dir.path().join("labels/t001.npy")).unwrap();
    assert_eq!((l.rank, l.tensor.shape.d), (3, [32, 32, 16]));
    let rows = deepis::analysis::analyze_files(&dir.path().join("labels.npy"), Some(&dir.path().join("input.npy")), &Options { voxel_size: o.voxel_size, ..Options::default() }).unwrap();
    assert_eq!(rows.len(), 2);
    let e = deepis::synth::synthesize(&SynthOptions { voxel_size: [0.2, 0.0, 0.4], ..o.clone() }).unwrap_err().to_string();
    assert!(e.contains("axis D1"), "{e}");
}

/// Time per frame at the default size (`cargo test --test synth -- --ignored --nocapture`).
#[test]
#[ignore]
fn default_size_timing() {
    let o = SynthOptions { frames: 3, ..SynthOptions::default() };
    let t = std::time::Instant::now();
    let f = synthesize(&o).unwrap();
    let s = t.elapsed().as_secs_f64();
    println!("{} frames of {:?} in {s:.2} s: {:.2} s per frame on {} threads", f.len(), o.size, s / 3.0, rayon::current_num_threads());
}
