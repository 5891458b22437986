//! Shared helpers of the integration tests: golden-case files.
#![allow(dead_code)]
use deepis::tensor::Tensor;
use std::path::{Path, PathBuf};

pub const CASES: &[&str] = &["tiny", "small", "readme", "mid"];

pub fn data(case: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(case).join(file)
}

/// Reads a float32/float64/int64 `.npy` as (dims, f32 values).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).expect("npy header");
    let dims: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = match npy.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 => {
            npy.into_vec::<f32>().unwrap()
        }
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 8 => {
            npy.into_vec::<f64>().unwrap().into_iter().map(|x| x as f32).collect()
        }
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Int => {
            npy.into_vec::<i64>().unwrap().into_iter().map(|x| x as f32).collect()
        }
        d => panic!("{}: unexpected dtype {d:?}", path.display()),
    };
    (dims, data)
}

/// An N x C x D0 x D1 x D2 `.npy` as a channels-last tensor.
pub fn read_5d(path: &Path) -> Tensor {
    let (dims, data) = read_npy(path);
    assert_eq!(dims.len(), 5, "{}: expected 5D", path.display());
    Tensor::from_ncdhw([dims[0], dims[1], dims[2], dims[3], dims[4]], &data).unwrap()
}

/// Every float32 tensor of a safetensors file, by name, with its dims.
pub fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
