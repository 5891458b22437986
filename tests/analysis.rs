//! `analyze` against analytic geometry: a voxelised ball, two boxes across a gap, a known RI field,
//! and the errors for bad inputs.
use deepis::analysis::{self, analyze_frame, marching_cubes, Options};
use std::f64::consts::PI;

fn idx(d: [usize; 3], i: usize, j: usize, k: usize) -> usize {
    (i * d[1] + j) * d[2] + k
}

/// A ball of radius r (um) centred in a grid of voxel size v, as 0/1 labels of `class`.
fn ball(d: [usize; 3], v: [f64; 3], r: f64, class: u8) -> Vec<u8> {
    let c: [f64; 3] = std::array::from_fn(|k| (d[k] as f64 - 1.0) / 2.0 * v[k]);
    let mut l = vec![0u8; d[0] * d[1] * d[2]];
    for i in 0..d[0] {
        for j in 0..d[1] {
            for k in 0..d[2] {
                let p = [i as f64 * v[0], j as f64 * v[1], k as f64 * v[2]];
                let q: f64 = (0..3).map(|a| (p[a] - c[a]).powi(2)).sum();
                if q <= r * r {
                    l[idx(d, i, j, k)] = class;
                }
            }
        }
    }
    l
}

fn opts(v: [f64; 3]) -> Options {
    Options { voxel_size: v, ..Options::default() }
}

#[test]
fn ball_volume_area_sphericity() {
    println!("{:>16} {:>6} {:>10} {:>10} {:>10} {:>10}", "voxel um", "r um", "vol err", "area err", "raw MC err", "sph");
    for (v, r, d) in [([0.2, 0.2, 0.4], 3.0, [36, 36, 20]), ([0.2, 0.2, 0.2], 2.0, [26, 26, 26]), ([0.3, 0.2, 0.5], 4.0, [32, 46, 22])] {
        let l = ball(d, v, r, 1);
        let m = analyze_frame(0, &l, None, d, &opts(v));
        let count = l.iter().filter(|&&x| x == 1).count();
        assert_eq!(m.effector_volume_um3, count as f64 * (v[0] * v[1] * v[2]), "volume is the voxel count x voxel volume");
        let (va, aa) = (4.0 / 3.0 * PI * r.powi(3), 4.0 * PI * r * r);
        let mask: Vec<bool> = l.iter().map(|&x| x == 1).collect();
        let raw = analysis::mask_surface_with(&mask, d, v, false, marching_cubes::triangle_area_ref);
        let (ev, ea, er) = (m.effector_volume_um3 / va - 1.0, m.effector_area_um2 / aa - 1.0, raw / aa - 1.0);
        println!("{:>16} {:>6.1} {:>+10.4} {:>+10.4} {:>+10.4} {:>10.4}", format!("{v:?}"), r, ev, ea, er, m.effector_sphericity);
        assert!(ev.abs() < 0.03, "volume error {ev}");
        assert!(ea.abs() < 0.03, "area error {ea}");
        assert!((m.effector_sphericity - 1.0).abs() < 0.03, "sphericity {}", m.effector_sphericity);
        assert_eq!(m.target_volume_um3, 0.0);
        assert!(m.target_sphericity.is_nan() && m.centroid_distance_um.is_nan());
        assert_eq!(m.is_area_um2, 0.0);
    }
}

/// Effector box [a0, a1] and target box [b0, b1] along D0, both over [lo, hi) in D1 and D2.
fn boxes(d: [usize; 3], a: (usize, usize), b: (usize, usize), lo: [usize; 2], hi: [usize; 2]) -> Vec<u8> {
    let mut l = vec![0u8; d[0] * d[1] * d[2]];
    for i in 0..d[0] {
        for j in lo[0]..hi[0] {
            for k in lo[1]..hi[1] {
                if (a.0..=a.1).contains(&i) {
                    l[idx(d, i, j, k)] = 1;
                } else if (b.0..=b.1).contains(&i) {
                    l[idx(d, i, j, k)] = 2;
                }
            }
        }
    }
    l
}

#[test]
fn boxes_across_a_gap_synapse_is_the_facing_area() {
    let v = [0.2, 0.2, 0.4];
    let d = [40, 28, 16];
    // Effector voxels 4..=17 and target 20..=33 along D0: two empty voxels between them, so the
    // effector's face (half a voxel past its last centre) is 2.5 voxels = 0.5 um from the target.
    let l = boxes(d, (4, 17), (20, 33), [4, 4], [24, 12]);
    let face = (20.0 * v[1]) * (8.0 * v[2]);
    // The smoothed surface rounds the box's rim over about a voxel: with --is-distance one voxel
    // (0.2 um) past the gap the synapse is the face; just below the gap it is empty.
    for (is_d, expect, tol) in [(0.7, face, 0.05), (0.45, 0.0, 0.0)] {
        let m = analyze_frame(0, &l, None, d, &Options { is_distance: is_d, ..opts(v) });
        println!("is-distance {is_d}: IS area {:.3} um2, facing area {face:.3} um2, rel err {:+.4}", m.is_area_um2, m.is_area_um2 / face - 1.0);
        assert!((m.is_area_um2 - expect).abs() <= tol * face, "IS area {} vs {expect}", m.is_area_um2);
        let centres = (20.0 + 33.0) / 2.0 - (4.0 + 17.0) / 2.0;
        assert!((m.centroid_distance_um - centres * v[0]).abs() < 1e-9);
    }
    // The box surface: 2 (ab + bc + ca) of a 14 x 20 x 8 voxel box.
    let (x, y, z) = (14.0 * v[0], 20.0 * v[1], 8.0 * v[2]);
    let m = analyze_frame(0, &l, None, d, &opts(v));
    let area = 2.0 * (x * y + y * z + z * x);
    println!("box area {:.3} vs {area:.3} ({:+.4})", m.effector_area_um2, m.effector_area_um2 / area - 1.0);
    // Smooth cells are measured to ~1 %; a box loses its sharp edges and corners to the smoothing
    // (about a voxel of rounding radius: -10 % on this 14 x 20 x 8 voxel box).
    assert!((m.effector_area_um2 / area - 1.0).abs() < 0.12);
    assert_eq!(m.effector_volume_um3, 14.0 * 20.0 * 8.0 * (v[0] * v[1] * v[2]));
}

#[test]
fn dry_mass_and_synapse_ri_of_a_known_field() {
    let v = [0.25, 0.2, 0.5];
    let d = [40, 20, 10];
    let l = boxes(d, (4, 17), (19, 33), [3, 2], [17, 8]);
    let n = l.len();
    let mut ri = vec![1.337f32; n];
    for p in 0..n {
        ri[p] = match l[p] {
            1 => 1.375,
            2 => 1.36 + 0.001 * (p % 7) as f32,
            _ => 1.337 + 0.0005 * (p % 3) as f32,
        };
    }
    let o = Options { dn_dc: 0.19, ..opts(v) };
    let m = analyze_frame(0, &l, Some(&ri), d, &o);
    let vv = v[0] * v[1] * v[2];
    let expect = |class: u8| -> f64 { (0..n).filter(|&p| l[p] == class).map(|p| ri[p] as f64 - 1.337).sum::<f64>() * vv / 0.19 };
    println!("dry mass effector {:.6} pg (expect {:.6}), target {:.6} pg (expect {:.6})", m.effector_dry_mass_pg, expect(1), m.target_dry_mass_pg, expect(2));
    assert!((m.effector_dry_mass_pg - expect(1)).abs() <= 1e-12 * expect(1));
    assert!((m.target_dry_mass_pg - expect(2)).abs() <= 1e-12 * expect(2));
    // 14 x 14 x 6 voxels of RI 1.375: (0.038 x 1176 x 0.025) / 0.19 pg.
    assert!((m.effector_dry_mass_pg - (1.375f32 as f64 - 1.337) * 1176.0 * vv / 0.19).abs() < 1e-9);
    assert_eq!(m.is_mean_ri, 1.375, "the effector's voxels at the synapse all have RI 1.375");
    assert!(m.is_area_um2 > 0.0);
    // Without RI: NaN dry masses and synapse RI, everything else unchanged.
    let m2 = analyze_frame(0, &l, None, d, &o);
    assert!(m2.effector_dry_mass_pg.is_nan() && m2.is_mean_ri.is_nan());
    assert_eq!(m2.is_area_um2, m.is_area_um2);
}

mod files {
    use super::*;
    use deepis::analysis::{analyze_files, write_labels, COLUMNS};
    use std::path::Path;

    fn err(labels: &Path, ri: Option<&Path>, v: [f64; 3]) -> String {
        analyze_files(labels, ri, &opts(v)).expect_err("must fail").to_string()
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let d = [12, 10, 8];
        let mut l = ball(d, [0.2; 3], 0.7, 1);
        write_labels(&p("ok.npy"), &d, &l).unwrap();
        l[idx(d, 1, 2, 3)] = 3;
        write_labels(&p("bad.npy"), &d, &l).unwrap();
        let e = err(&p("bad.npy"), None, [0.2; 3]);
        println!("{e}");
        assert!(e.contains("label 3 at index [1, 2, 3]") && e.contains("0 (background), 1 (effector) and 2 (target)"), "{e}");

        let e = err(&p("ok.npy"), None, [0.2, 0.0, 0.2]);
        println!("{e}");
        assert!(e.contains("axis D1") && e.contains("positive"), "{e}");
        let e = err(&p("ok.npy"), None, [0.2, -1.0, 0.2]);
        assert!(e.contains("axis D1"), "{e}");

        deepis::io::write_npy(&p("ri_small.npy"), &[12, 10, 7], &vec![1.34; 12 * 10 * 7]).unwrap();
        let e = err(&p("ok.npy"), Some(&p("ri_small.npy")), [0.2; 3]);
        println!("{e}");
        assert!(e.contains("[12, 10, 7]") && e.contains("[12, 10, 8]") && e.contains("same voxels"), "{e}");

        let mut ri = vec![1.34f32; 12 * 10 * 8];
        ri[5] = f32::NAN;
        deepis::io::write_npy(&p("ri_nan.npy"), &[12, 10, 8], &ri).unwrap();
        let e = err(&p("ok.npy"), Some(&p("ri_nan.npy")), [0.2; 3]);
        println!("{e}");
        assert!(e.contains("NaN") && e.contains("finite"), "{e}");

        let e = analyze_files(&p("ok.npy"), None, &Options { is_distance: -1.0, ..opts([0.2; 3]) }).unwrap_err().to_string();
        assert!(e.contains("--is-distance"), "{e}");
        let e = err(&p("missing.npy"), None, [0.2; 3]);
        assert!(e.contains("missing.npy"), "{e}");
    }

    #[test]
    fn time_lapse_gives_one_row_per_frame() {
        let dir = tempfile::tempdir().unwrap();
        let d = [16, 16, 12];
        let v = [0.2, 0.2, 0.4];
        let mut all = Vec::new();
        for t in 0..3 {
            all.extend(ball(d, v, 0.8 + 0.3 * t as f64, 1));
        }
        let path = dir.path().join("labels.tif");
        write_labels(&path, &[3 * 16, 16, 12], &all).unwrap(); // a .tif stack is one 3D frame
        let rows = analyze_files(&path, None, &opts(v)).unwrap();
        assert_eq!(rows.len(), 1);
        let path = dir.path().join("labels.npy");
        write_labels(&path, &[3, 16, 16, 12], &all).unwrap();
        let rows = analyze_files(&path, None, &opts(v)).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows.windows(2).all(|w| w[1].effector_volume_um3 > w[0].effector_volume_um3));
        let csv = analysis::to_csv(&rows);
        let mut lines = csv.lines();
        assert_eq!(lines.next().unwrap(), COLUMNS.join(","));
        assert_eq!(COLUMNS.join(", "), "frame, effector_volume_um3, target_volume_um3, effector_area_um2, target_area_um2, effector_sphericity, target_sphericity, effector_dry_mass_pg, target_dry_mass_pg, is_area_um2, is_mean_ri, centroid_distance_um, time_s");
        for (t, line) in lines.enumerate() {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), 13);
            assert_eq!(cells[0], t.to_string());
            assert_eq!(cells[12], "NaN", "no time interval known");
        }
    }
}

#[test]
fn edt_is_exact_against_brute_force() {
    let d = [9, 7, 11];
    let v = [0.3, 0.2, 0.5];
    let mut r = deepis::rng::Rng::new(5);
    for density in [0.02, 0.2, 0.7] {
        let site: Vec<bool> = (0..d[0] * d[1] * d[2]).map(|_| r.uniform() < density).collect();
        let got = analysis::edt::edt_sq(&site, d, v);
        for (p, &g) in got.iter().enumerate() {
            let pi = [p / (d[1] * d[2]), p / d[2] % d[1], p % d[2]];
            let mut best = f64::INFINITY;
            for q in (0..site.len()).filter(|&q| site[q]) {
                let qi = [q / (d[1] * d[2]), q / d[2] % d[1], q % d[2]];
                best = best.min((0..3).map(|k| ((pi[k] as f64 - qi[k] as f64) * v[k]).powi(2)).sum());
            }
            assert!((g - best).abs() <= 1e-9 * best.max(1.0), "voxel {pi:?}: {g} vs {best}");
        }
    }
}

#[test]
fn plots_are_written_as_png() {
    let dir = tempfile::tempdir().unwrap();
    let d = [16, 16, 12];
    let v = [0.2, 0.2, 0.4];
    let rows: Vec<_> = (0..4).map(|t| analyze_frame(t, &ball(d, v, 0.6 + 0.2 * t as f64, 1), None, d, &opts(v))).collect();
    for (name, r) in [("series.png", &rows[..]), ("one.png", &rows[..1])] {
        let p = dir.path().join(name);
        deepis::plot::plot_metrics(&p, r).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 10_000, "{name}: {} bytes", bytes.len());
        if let Ok(keep) = std::env::var("DEEPIS_KEEP_PLOTS") {
            std::fs::copy(&p, std::path::Path::new(&keep).join(name)).unwrap();
        }
    }
    let l = ball(d, v, 1.0, 1);
    let ri: Vec<f32> = l.iter().map(|&x| 1.337 + 0.03 * x as f32).collect();
    let p = dir.path().join("slices.png");
    deepis::plot::plot_slices(&p, &ri, &l, d, v, "frame 0", 4).unwrap();
    assert_eq!(&std::fs::read(&p).unwrap()[..4], b"\x89PNG");
}

/// `analyze --probabilities`: surfaces from a sigmoid head's maps, as `segment
/// --save-probabilities` writes them, on two balls at the shipped model's 0.4 x 0.4 x 0.8 um.
mod probabilities {
    use deepis::analysis::{write_labels, COLUMNS};
    use std::f64::consts::PI;
    use std::path::Path;
    use std::process::Command;

    const VOX: [f64; 3] = [0.4, 0.4, 0.8];
    /// Effector (r 3 um) and target (r 4 um) balls, 2 um apart along D0.
    const CELLS: [([f64; 3], f64); 2] = [([4.3, 6.1, 6.2], 3.0), ([13.3, 5.9, 5.7], 4.0)];
    const DIMS: [usize; 3] = [46, 30, 15];

    /// The maps (2 x D0 x D1 x D2): p_c = sigmoid((r - |x - c|) / 0.3 um), and labels by
    /// segment's rule (effector where p0 > 1/2, else target where p1 > 1/2).
    fn maps() -> (Vec<f32>, Vec<u8>) {
        let n = DIMS.iter().product::<usize>();
        let mut p = vec![0f32; 2 * n];
        for (c, (centre, r)) in CELLS.iter().enumerate() {
            for q in 0..n {
                let x = [q / (DIMS[1] * DIMS[2]), q / DIMS[2] % DIMS[1], q % DIMS[2]];
                let d = (0..3).map(|k| (x[k] as f64 * VOX[k] - centre[k]).powi(2)).sum::<f64>().sqrt();
                p[c * n + q] = (1.0 / (1.0 + (-(r - d) / 0.3).exp())) as f32;
            }
        }
        let labels = (0..n).map(|q| if p[q] > 0.5 { 1 } else if p[n + q] > 0.5 { 2 } else { 0 }).collect();
        (p, labels)
    }

    /// `deepis analyze` of cell_labels.npy with `extra`: success, stderr, and the CSV's rows.
    fn analyze(dir: &Path, extra: &[&str]) -> (bool, String, Vec<Vec<f64>>) {
        let csv = dir.join(format!("out{}.csv", extra.len()));
        let o = Command::new(env!("CARGO_BIN_EXE_deepis"))
            .arg("analyze")
            .arg(dir.join("cell_labels.npy"))
            .args(["--voxel-size", "0.4,0.4,0.8", "-o"])
            .arg(&csv)
            .args(extra)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        let rows = std::fs::read_to_string(&csv).map(|t| t.lines().skip(1).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect()).unwrap_or_default();
        (o.status.success(), e, rows)
    }

    fn col(name: &str) -> usize {
        COLUMNS.iter().position(|c| *c == name).unwrap()
    }

    #[test]
    fn surfaces_come_from_the_maps_between_voxels() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (p, labels) = maps();
        let [a, b, c] = DIMS;
        write_labels(&d.join("cell_labels.npy"), &DIMS, &labels).unwrap();
        deepis::io::write_npy(&d.join("cell_probabilities.npy"), &[2, a, b, c], &p).unwrap();
        let (ok, e, beside) = analyze(d, &["--probabilities"]);
        assert!(ok && e.contains("surfaces from the probability maps"), "{e}");
        let given = d.join("cell_probabilities.npy");
        let (ok, e, explicit) = analyze(d, &["--probabilities", given.to_str().unwrap()]);
        assert!(ok, "{e}");
        assert_eq!(format!("{beside:?}"), format!("{explicit:?}"), "the maps beside the labels are the ones given");
        let (ok, e, from_labels) = analyze(d, &[]);
        assert!(ok, "{e}");
        for (name, (_, r)) in ["effector", "target"].iter().zip(CELLS) {
            let (area, vol) = (4.0 * PI * r * r, 4.0 / 3.0 * PI * r.powi(3));
            let row = &beside[0];
            let (ea, ev) = (row[col(&format!("{name}_area_um2"))] / area - 1.0, row[col(&format!("{name}_volume_um3"))] / vol - 1.0);
            let sph = row[col(&format!("{name}_sphericity"))];
            let la = from_labels[0][col(&format!("{name}_area_um2"))] / area - 1.0;
            println!("{name} r {r} um: maps area {ea:+.4} volume {ev:+.4} sphericity {sph:.5}; labels area {la:+.4}");
            // tests/surface_area.rs measures this estimator at these voxels over balls and
            // ellipsoids of 3-8 um and sub-voxel offsets: worst area error 0.69%, bound 1%. The
            // volume is the voxel count: within 1.2% for a 3 um ball over those offsets.
            assert!(ea.abs() < 0.01 && ev.abs() < 0.015, "{name}: area {ea}, volume {ev}");
            assert!(sph <= 1.0 + 1e-9, "{name}: sphericity {sph} of a closed surface");
        }
        assert_eq!(beside[0][col("is_area_um2")], 0.0, "2 um apart, beyond --is-distance 1");
    }

    #[test]
    fn a_saturated_map_gives_the_labels_own_surfaces() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_, labels) = maps();
        let n = labels.len();
        let mut p = vec![0f32; 2 * n];
        for (q, &l) in labels.iter().enumerate() {
            if l > 0 {
                p[(l as usize - 1) * n + q] = 1.0;
            }
        }
        let [a, b, c] = DIMS;
        write_labels(&d.join("cell_labels.npy"), &DIMS, &labels).unwrap();
        deepis::io::write_npy(&d.join("cell_probabilities.npy"), &[2, a, b, c], &p).unwrap();
        let (ok, e, maps) = analyze(d, &["--probabilities"]);
        assert!(ok, "{e}");
        let (ok, e, from_labels) = analyze(d, &[]);
        assert!(ok, "{e}");
        // A 0/1 map holds no position between voxels: the same smoothed, volume-matched surface.
        for name in ["effector_area_um2", "target_area_um2", "effector_sphericity", "target_sphericity"] {
            let (x, y) = (maps[0][col(name)], from_labels[0][col(name)]);
            println!("{name}: maps {x}, labels {y}");
            assert!((x / y - 1.0).abs() < 1e-6, "{name}: {x} vs {y}");
        }
    }

    #[test]
    fn maps_that_do_not_fit_the_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (mut p, labels) = maps();
        let [a, b, c] = DIMS;
        write_labels(&d.join("cell_labels.npy"), &DIMS, &labels).unwrap();
        let bad = |e: &str, words: &[&str]| {
            println!("{e}");
            assert!(!e.contains("panicked"), "{e}");
            for w in words {
                assert!(e.contains(w), "{w:?} missing: {e}");
            }
        };
        let (ok, e, _) = analyze(d, &["--probabilities"]);
        assert!(!ok);
        bad(&e, &["cell_probabilities.npy: no such file", "--save-probabilities"]);
        deepis::io::write_npy(&d.join("small.npy"), &[2, a, b, c - 1], &p[..2 * a * b * (c - 1)]).unwrap();
        let (ok, e, _) = analyze(d, &["--probabilities", d.join("small.npy").to_str().unwrap()]);
        assert!(!ok);
        bad(&e, &["shape [2, 46, 30, 14]", "C x 46 x 30 x 15"]);
        // a distance head's map is no probability
        let mut dist = p.clone();
        dist[7] = 2.5;
        deepis::io::write_npy(&d.join("dist.npy"), &[2, a, b, c], &dist).unwrap();
        let (ok, e, _) = analyze(d, &["--probabilities", d.join("dist.npy").to_str().unwrap()]);
        assert!(!ok);
        bad(&e, &["value 2.5", "[0, 1]"]);
        // maps of another run: the cells elsewhere
        p.rotate_right(5 * b * c);
        deepis::io::write_npy(&d.join("moved.npy"), &[2, a, b, c], &p).unwrap();
        let (ok, e, _) = analyze(d, &["--probabilities", d.join("moved.npy").to_str().unwrap()]);
        assert!(!ok);
        bad(&e, &["effector voxels of the labels lie outside", "different runs"]);
    }
}
