//! Volume I/O: every input dtype and rank read back exactly, outputs in the documented layouts,
//! bad volumes refused with the file named, atomic writes leaving nothing behind.
use deepis::io::{read_volume, write_atomic, write_npy, write_output};
use deepis::tensor::{Shape, Tensor};
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};

fn write_npy_typed<T: npyz::AutoSerialize + Copy>(path: &Path, dims: &[usize], data: &[T], fortran: bool) {
    let shape: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    let order = if fortran { npyz::Order::Fortran } else { npyz::Order::C };
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).order(order).writer(f).begin_nd().unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn ramp(len: usize) -> Vec<f32> {
    (0..len).map(|i| (i % 251) as f32 * 0.5 - 3.0).collect()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn npy_each_dtype_and_rank_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = [3usize, 4, 5];
    for (rank, dims, n) in [
        (3usize, vec![3usize, 4, 5], 1usize),
        (4, vec![2, 3, 4, 5], 2),
        (5, vec![2, 1, 3, 4, 5], 2),
    ] {
        let len: usize = dims.iter().product();
        let vals: Vec<f32> = ramp(len).iter().map(|x| x.abs().round()).collect();
        for dtype in ["f32", "f64", "u16", "u8"] {
            let p = dir.path().join(format!("v{rank}_{dtype}.npy"));
            match dtype {
                "f32" => write_npy_typed(&p, &dims, &vals, false),
                "f64" => write_npy_typed(&p, &dims, &vals.iter().map(|&x| x as f64).collect::<Vec<_>>(), false),
                "u16" => write_npy_typed(&p, &dims, &vals.iter().map(|&x| x as u16).collect::<Vec<_>>(), false),
                _ => write_npy_typed(&p, &dims, &vals.iter().map(|&x| x as u8).collect::<Vec<_>>(), false),
            }
            let v = read_volume(&p).unwrap_or_else(|e| panic!("{rank}D {dtype}: {e}"));
            assert_eq!(v.rank, rank, "{rank}D {dtype}");
            assert_eq!(v.tensor.shape, Shape::new(n, d, 1), "{rank}D {dtype}");
            assert_eq!(v.tensor.data, vals, "{rank}D {dtype}");
            println!("npy {rank}D {dtype}: ok");
        }
    }
}

#[test]
fn npy_fortran_order_is_read_in_c_order() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [2usize, 3, 4];
    let c_order = ramp(24);
    // Fortran storage: the first index runs fastest.
    let mut f_order = vec![0.0f32; 24];
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                f_order[i + 2 * (j + 3 * k)] = c_order[(i * 3 + j) * 4 + k];
            }
        }
    }
    let p = dir.path().join("f.npy");
    write_npy_typed(&p, &dims, &f_order, true);
    let v = read_volume(&p).unwrap();
    assert_eq!(v.tensor.data, c_order);
}

#[test]
fn npy_output_layouts_follow_the_input_rank() {
    let dir = tempfile::tempdir().unwrap();
    // Two volumes, two channels: a head output of 4D/5D input.
    let shape = Shape::new(2, [3, 4, 5], 2);
    let t = Tensor::new(shape, ramp(shape.len())).unwrap();
    let p = dir.path().join("out4.npy");
    write_output(&p, &t, 4).unwrap();
    let f = npyz::NpyFile::new(std::fs::File::open(&p).unwrap()).unwrap();
    assert_eq!(f.shape(), &[2, 2, 3, 4, 5]);
    assert_eq!(f.into_vec::<f32>().unwrap(), t.to_ncdhw());

    // One volume of a 3D input: C x D0 x D1 x D2.
    let shape = Shape::new(1, [3, 4, 5], 2);
    let t = Tensor::new(shape, ramp(shape.len())).unwrap();
    let p = dir.path().join("out3.npy");
    write_output(&p, &t, 3).unwrap();
    let f = npyz::NpyFile::new(std::fs::File::open(&p).unwrap()).unwrap();
    assert_eq!(f.shape(), &[2, 3, 4, 5]);
    assert_eq!(f.into_vec::<f32>().unwrap(), t.to_ncdhw());
    assert_eq!(files_in(dir.path()).len(), 2, "only the two outputs, no temporary files");
}

#[test]
fn tif_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    // float32 stack written by the engine and read back.
    let shape = Shape::new(1, [4, 3, 5], 1);
    let t = Tensor::new(shape, ramp(shape.len())).unwrap();
    let p = dir.path().join("vol.tif");
    write_output(&p, &t, 3).unwrap();
    let v = read_volume(&p).unwrap();
    assert_eq!(v.rank, 3);
    assert_eq!(v.tensor, t);

    // A 16-bit stack as microscopes write them, read as float.
    use tiff::encoder::{colortype::Gray16, TiffEncoder};
    let p = dir.path().join("vol16.tiff");
    let pages: Vec<Vec<u16>> = (0..3).map(|z| (0..6).map(|i| (z * 100 + i) as u16).collect()).collect();
    {
        let mut enc = TiffEncoder::new(std::fs::File::create(&p).unwrap()).unwrap();
        for pg in &pages {
            enc.write_image::<Gray16>(3, 2, pg).unwrap();
        }
    }
    let v = read_volume(&p).unwrap();
    assert_eq!(v.tensor.shape, Shape::new(1, [3, 2, 3], 1));
    let want: Vec<f32> = pages.concat().into_iter().map(f32::from).collect();
    assert_eq!(v.tensor.data, want);

    // A multi-channel output as a stack: pages ordered (n, c, d0).
    let shape = Shape::new(2, [2, 3, 4], 3);
    let t = Tensor::new(shape, ramp(shape.len())).unwrap();
    let p = dir.path().join("out.tif");
    write_output(&p, &t, 4).unwrap();
    let v = read_volume(&p).unwrap();
    assert_eq!(v.tensor.shape, Shape::new(1, [2 * 3 * 2, 3, 4], 1));
    assert_eq!(v.tensor.data, t.to_ncdhw());
}

fn err_of(p: &Path) -> String {
    let e = read_volume(p).expect_err("must be refused").to_string();
    println!("{}: {e}", p.file_name().unwrap().to_string_lossy());
    assert!(e.contains(&*p.file_name().unwrap().to_string_lossy()), "the message names the file: {e}");
    e
}

#[test]
fn bad_volumes_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let mut v = vec![1.0f32; 2 * 3 * 4];
    v[17] = f32::NAN;
    write_npy_typed(&d.join("nan.npy"), &[2, 3, 4], &v, false);
    let e = err_of(&d.join("nan.npy"));
    assert!(e.contains("NaN") && e.contains("[1, 1, 1]"), "{e}");

    let mut v = vec![1.0f64; 2 * 3 * 4];
    v[5] = f64::NEG_INFINITY;
    write_npy_typed(&d.join("inf.npy"), &[2, 3, 4], &v, false);
    let e = err_of(&d.join("inf.npy"));
    assert!(e.contains("inf") && e.contains("[0, 1, 1]"), "{e}");

    write_npy_typed(&d.join("rank2.npy"), &[4, 4], &[0.0f32; 16], false);
    assert!(err_of(&d.join("rank2.npy")).contains("2D"));
    write_npy_typed(&d.join("rank6.npy"), &[1, 1, 1, 2, 2, 2], &[0.0f32; 8], false);
    assert!(err_of(&d.join("rank6.npy")).contains("6D"));
    write_npy_typed(&d.join("chan2.npy"), &[1, 2, 2, 2, 2], &[0.0f32; 16], false);
    assert!(err_of(&d.join("chan2.npy")).contains("2 channels"));
    write_npy_typed(&d.join("empty.npy"), &[0, 4, 4], &[0.0f32; 0], false);
    assert!(err_of(&d.join("empty.npy")).contains("empty"));
    write_npy_typed(&d.join("int.npy"), &[2, 2, 2], &[0i32; 8], false);
    assert!(err_of(&d.join("int.npy")).contains("unsupported dtype"));

    std::fs::write(d.join("text.npy"), "hello\n").unwrap();
    assert!(err_of(&d.join("text.npy")).contains("not a readable .npy"));
    std::fs::write(d.join("text.tif"), "hello\n").unwrap();
    assert!(err_of(&d.join("text.tif")).contains("TIFF"));

    write_npy_typed(&d.join("trunc.npy"), &[4, 4, 4], &[1.0f32; 64], false);
    let bytes = std::fs::read(d.join("trunc.npy")).unwrap();
    std::fs::write(d.join("trunc.npy"), &bytes[..bytes.len() - 10]).unwrap();
    assert!(err_of(&d.join("trunc.npy")).contains("truncated"));

    assert!(err_of(&d.join("missing.npy")).contains("No such file"));
    std::fs::write(d.join("vol.raw"), "x").unwrap();
    assert!(err_of(&d.join("vol.raw")).contains("unsupported file type"));
}

#[test]
fn atomic_write_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    write_npy(&p, &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(files_in(dir.path()), vec![p.clone()]);

    // A writer that fails half-way: the earlier file stays intact and no temporary is left.
    let before = std::fs::read(&p).unwrap();
    let r = write_atomic(&p, |w| {
        use std::io::Write;
        w.write_all(b"partial")?;
        Err(std::io::Error::other("disk full"))
    });
    let e = r.expect_err("the failure is reported").to_string();
    assert!(e.contains("disk full") && e.contains("a.npy"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(files_in(dir.path()), vec![p.clone()]);

    // A failed output (unknown extension) creates nothing.
    let t = Tensor::zeros(Shape::new(1, [2, 2, 2], 1));
    assert!(write_output(&dir.path().join("out.raw"), &t, 3).is_err());
    // A missing folder is an error naming the path.
    let e = write_output(&dir.path().join("no/such/dir/out.npy"), &t, 3).unwrap_err().to_string();
    assert!(e.contains("out.npy"), "{e}");
    assert_eq!(files_in(dir.path()), vec![p]);
}

/// Every dtype in both byte orders (numpy writes `>f4` and so on when asked), against the values
/// written: the bulk read and its byte swaps.
#[test]
fn npy_both_byte_orders_of_every_dtype() {
    use npyz::{DType, TypeStr};
    let dir = tempfile::tempdir().unwrap();
    let dims = [2usize, 3, 4];
    let vals: Vec<f32> = (0..24).map(|i| (i * 7 % 24) as f32 + if i % 3 == 0 { 200.0 } else { 0.0 }).collect();
    let write = |p: &Path, descr: &str, bytes: Vec<u8>| {
        // the .npy 1.0 layout: magic, version, header length, header padded to 64 bytes
        let h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2, 3, 4), }}");
        let h = format!("{h:<width$}\n", width = (10 + h.len() + 1).div_ceil(64) * 64 - 10 - 1);
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        f.extend((h.len() as u16).to_le_bytes());
        f.extend(h.as_bytes());
        f.extend(bytes);
        std::fs::write(p, f).unwrap();
        // npyz reads the header as numpy wrote it
        assert!(matches!(npyz::NpyFile::new(&std::fs::read(p).unwrap()[..]).unwrap().dtype(), DType::Plain(t) if t == descr.parse::<TypeStr>().unwrap()));
    };
    for descr in ["<f4", ">f4", "<f8", ">f8", "<u2", ">u2", "|u1"] {
        let big = descr.starts_with('>');
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&x| -> Vec<u8> {
                let (le, be) = match &descr[1..] {
                    "f4" => (x.to_le_bytes().to_vec(), x.to_be_bytes().to_vec()),
                    "f8" => ((x as f64).to_le_bytes().to_vec(), (x as f64).to_be_bytes().to_vec()),
                    "u2" => ((x as u16).to_le_bytes().to_vec(), (x as u16).to_be_bytes().to_vec()),
                    _ => (vec![x as u8], vec![x as u8]),
                };
                if big { be } else { le }
            })
            .collect();
        let p = dir.path().join(format!("v{}.npy", descr.replace(['<', '>', '|'], "_")));
        write(&p, descr, bytes);
        let v = read_volume(&p).unwrap_or_else(|e| panic!("{descr}: {e}"));
        assert_eq!(v.tensor.shape, Shape::new(1, dims, 1), "{descr}");
        assert_eq!(v.tensor.data, vals, "{descr}");
    }
    println!("npy <f4 >f4 <f8 >f8 <u2 >u2 |u1: the values written read back");
}

/// The values written in bulk after npyz's header: the files are byte for byte what npyz writes
/// value by value (float32 maps, uint8 labels; 3D and 4D).
#[test]
fn npy_outputs_are_what_npyz_writes_value_by_value() {
    let dir = tempfile::tempdir().unwrap();
    for dims in [vec![3usize, 4, 5], vec![2, 3, 4, 5]] {
        let n: usize = dims.iter().product();
        let maps = ramp(n);
        let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
        let (pm, pl, rm, rl) = (dir.path().join("m.npy"), dir.path().join("l.npy"), dir.path().join("rm.npy"), dir.path().join("rl.npy"));
        write_npy(&pm, &dims, &maps).unwrap();
        deepis::analysis::write_labels(&pl, &dims, &labels).unwrap();
        write_npy_typed(&rm, &dims, &maps, false);
        write_npy_typed(&rl, &dims, &labels, false);
        assert_eq!(std::fs::read(&pm).unwrap(), std::fs::read(&rm).unwrap(), "float32 {dims:?}");
        assert_eq!(std::fs::read(&pl).unwrap(), std::fs::read(&rl).unwrap(), "uint8 {dims:?}");
    }
    println!("float32 and uint8 .npy in 3D and 4D: byte for byte npyz's own");
}
