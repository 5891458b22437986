//! Builders of the hostile files of issue 13, shared by tests/hostile.rs (through the binary)
//! and tests/fuzz.rs (the loaders' corpus).
#![allow(dead_code)]

/// A .npy file: `header` (the dict text) padded as numpy pads it, then `data`.
pub fn npy_bytes(major: u8, header: &str, data: &[u8]) -> Vec<u8> {
    let pre = if major == 1 { 10 } else { 12 };
    let mut h = header.to_string();
    while !(pre + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut v = b"\x93NUMPY".to_vec();
    v.extend([major, 0]);
    if major == 1 {
        v.extend((h.len() as u16).to_le_bytes());
    } else {
        v.extend((h.len() as u32).to_le_bytes());
    }
    v.extend(h.as_bytes());
    v.extend(data);
    v
}

/// The 144-byte file of the issue: a shape whose product overflows u64.
pub fn overflow_npy(shape: &str, fortran: bool) -> Vec<u8> {
    let f = if fortran { "True" } else { "False" };
    npy_bytes(1, &format!("{{'descr': '<f4', 'fortran_order': {f}, 'shape': {shape}, }}"), &[0u8; 16])
}

/// Patches tag `tag` of the first IFD of a little-endian TIFF to the LONG `value`.
pub fn patch_tiff_tag(b: &mut [u8], tag: u16, value: u32) {
    let ifd = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
    let n = u16::from_le_bytes(b[ifd..ifd + 2].try_into().unwrap()) as usize;
    for e in 0..n {
        let o = ifd + 2 + 12 * e;
        if u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) == tag {
            b[o + 2..o + 4].copy_from_slice(&4u16.to_le_bytes());
            b[o + 4..o + 8].copy_from_slice(&1u32.to_le_bytes());
            b[o + 8..o + 12].copy_from_slice(&value.to_le_bytes());
            return;
        }
    }
    panic!("tag {tag} not in the IFD");
}

pub fn float_tiff(pages: usize, uint16_page: Option<usize>) -> Vec<u8> {
    use tiff::encoder::{colortype, TiffEncoder};
    let mut cur = std::io::Cursor::new(Vec::new());
    {
        let mut enc = TiffEncoder::new(&mut cur).unwrap();
        for p in 0..pages {
            if Some(p) == uint16_page {
                enc.write_image::<colortype::Gray16>(4, 4, &[7u16; 16]).unwrap();
            } else {
                enc.write_image::<colortype::Gray32Float>(4, 4, &[0.5f32; 16]).unwrap();
            }
        }
    }
    cur.into_inner()
}

/// A level-5 MAT file of one compressed element: `inner` is the inflated element (tag + data).
pub fn mat_bytes(compressed: &[u8]) -> Vec<u8> {
    let mut v = format!("{:<116}", "MATLAB 5.0 MAT-file, written by deepis tests/hostile.rs").into_bytes();
    v.extend([0u8; 8]);
    v.extend(0x0100u16.to_le_bytes());
    v.extend(b"IM");
    v.extend(15u32.to_le_bytes());
    v.extend((compressed.len() as u32).to_le_bytes());
    v.extend(compressed);
    v
}

pub fn zlib(chunks: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    for c in chunks {
        z.write_all(&c).unwrap();
    }
    z.finish().unwrap()
}

pub fn mi_matrix_tag(size: u32) -> Vec<u8> {
    [14u32.to_le_bytes(), size.to_le_bytes()].concat()
}


/// A miMATRIX element (tag and data) of a real single array `name` of size `dims` holding
/// `values`; nothing makes the two agree (the hostile files set them apart).
pub fn mi_single_array(name: &str, dims: &[i32], values: &[f32]) -> Vec<u8> {
    let sub = |kind: u32, data: &[u8]| {
        let mut v = [kind.to_le_bytes(), (data.len() as u32).to_le_bytes()].concat();
        v.extend(data);
        v.resize(v.len().next_multiple_of(8), 0);
        v
    };
    let mut body = sub(6, &[7u32.to_le_bytes(), [0; 4]].concat()); // array flags: class 7, single
    body.extend(sub(5, &dims.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<_>>()));
    body.extend(sub(1, name.as_bytes()));
    body.extend(sub(7, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()));
    [mi_matrix_tag(body.len() as u32), body].concat()
}

/// A compressed MAT element (tag and stream) of the bytes `chunks`.
pub fn mi_compressed(chunks: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
    let z = zlib(chunks);
    [15u32.to_le_bytes().to_vec(), (z.len() as u32).to_le_bytes().to_vec(), z].concat()
}
