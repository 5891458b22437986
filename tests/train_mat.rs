//! MATLAB MAT training files (`deepis train --data DIR` with NAME.mat): the fixtures in
//! tests/data/mat (written by scipy, make_mat.py there) hold input[i, j, k] = 100 i + 10 j + k on a
//! 4 x 3 x 5 volume, so the values check MATLAB's column-major order and the axis order at once.
use deepis::config::Config;
use deepis::io::write_npy;
use deepis::train::data::{load_samples, read_mat};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mat").join(name)
}

const D: [usize; 3] = [4, 3, 5];

/// input(i+1, j+1, k+1) in MATLAB, voxel (i, j, k) in deepis.
fn x_at(i: usize, j: usize, k: usize) -> f64 {
    100.0 * i as f64 + 10.0 * j as f64 + k as f64
}

fn voxels() -> impl Iterator<Item = (usize, usize, usize)> {
    (0..D[0]).flat_map(|i| (0..D[1]).flat_map(move |j| (0..D[2]).map(move |k| (i, j, k))))
}

#[test]
fn v6_and_v7_files_keep_matlabs_index_order() {
    // cell_v6: uncompressed, input single, target double; cell_v7: compressed, input double, target single;
    // cell_v73: HDF5 as MATLAB's -v7.3 writes it (make_mat73.py), input single, target double
    for file in ["cell_v6.mat", "cell_v7.mat", "cell_v73.mat"] {
        let (x, t) = read_mat(&fixture(file), 1).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!((x.shape.n, x.shape.d, x.shape.c), (1, D, 1), "{file}: input shape");
        assert_eq!(t.shape, x.shape, "{file}: target shape");
        for (i, j, k) in voxels() {
            let v = (i * D[1] + j) * D[2] + k;
            assert_eq!(x.data[v], x_at(i, j, k) as f32, "{file}: input at voxel ({i}, {j}, {k})");
            assert_eq!(t.data[v], (-x_at(i, j, k) / 1000.0) as f32, "{file}: target at voxel ({i}, {j}, {k})");
        }
    }
}

#[test]
fn several_channel_target_has_the_channel_last() {
    // target: logical D0 x D1 x D2 x 2 with target(i+1, j+1, k+1, h+1) = (i + j + k + h) even
    for file in ["masks.mat", "masks_v73.mat"] {
        let (x, t) = read_mat(&fixture(file), 2).unwrap();
        assert_eq!((t.shape.d, t.shape.c), (D, 2));
        assert_eq!(x.shape.c, 1);
        for (i, j, k) in voxels() {
            for h in 0..2 {
                let want = if (i + j + k + h) % 2 == 0 { 1.0 } else { 0.0 };
                assert_eq!(t.data[((i * D[1] + j) * D[2] + k) * 2 + h], want, "{file}: voxel ({i}, {j}, {k}) channel {h}");
            }
        }
    }
}

#[test]
fn a_data_folder_mixes_mat_files_and_npy_pairs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("cell_v7.mat"), dir.path().join("b.mat")).unwrap();
    let n = D.iter().product::<usize>();
    write_npy(&dir.path().join("a_input.npy"), &D, &vec![1.0; n]).unwrap();
    write_npy(&dir.path().join("a_target.npy"), &D, &vec![0.5; n]).unwrap();
    let samples = load_samples(dir.path(), &Config::default()).unwrap();
    let names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "the pairs first, then the .mat files");
    let (x, t) = read_mat(&fixture("cell_v7.mat"), 1).unwrap();
    assert_eq!((&samples[1].input, &samples[1].target), (&x, &t));
}

#[test]
fn unreadable_mat_files_say_why() {
    let err = |p: &Path, c: usize| read_mat(p, c).unwrap_err().to_string();
    let e = err(&fixture("no_target.mat"), 1);
    assert!(e.contains("no numeric array `target`") && e.contains("label"), "{e}");
    let e = err(&fixture("cell_v6.mat"), 3);
    assert!(e.contains("`target` has size [4, 3, 5]; expected [D0 D1 D2 3]"), "{e}");

    // v7.3: a MAT header with version 0x0200, then HDF5 from byte 512
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v73.mat");
    let mut b = format!("{:<116}", "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .").into_bytes();
    b.extend([0u8; 8]);
    b.extend([0x00, 0x02, b'I', b'M']);
    b.resize(512, 0);
    b.extend(b"\x89HDF\r\n\x1a\n");
    b.resize(2048, 0);
    std::fs::write(&p, &b).unwrap();
    let e = err(&p, 1);
    assert!(e.contains("v7.3") && e.contains("'-v7'"), "{e}");

    std::fs::write(&p, b"not a MAT file at all").unwrap();
    let e = err(&p, 1);
    assert!(e.contains("not a readable MAT file"), "{e}");
}

#[test]
fn train_help_states_the_axis_order() {
    let help = deepis::train::cli::TRAIN_LONG;
    for want in ["NAME.mat", "-v7.3 (HDF5)", "size(input) = [D0 D1 D2]", "input(i,j,k) is voxel (i,j,k)", "[D0 D1 D2 C]"] {
        assert!(help.contains(want), "train --help mentions `{want}`");
    }
}
