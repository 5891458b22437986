//! Host tensors. Inside the engine activations are channels-last: (N, D0, D1, D2, C).
//! Files (npy, safetensors of the oracle) are NCDHW; `from_ncdhw` / `to_ncdhw` convert.
use crate::error::{Error, Result};

/// Shape of a channels-last 5D activation: n volumes of d0 x d1 x d2 voxels with c channels
/// (the default: empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Shape {
    pub n: usize,
    pub d: [usize; 3],
    pub c: usize,
}

impl Shape {
    pub fn new(n: usize, d: [usize; 3], c: usize) -> Self {
        Shape { n, d, c }
    }
    pub fn voxels(&self) -> usize {
        self.d[0] * self.d[1] * self.d[2]
    }
    pub fn len(&self) -> usize {
        self.n * self.voxels() * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn with_c(&self, c: usize) -> Self {
        Shape { c, ..*self }
    }
    pub fn with_d(&self, d: [usize; 3]) -> Self {
        Shape { d, ..*self }
    }
    /// (n, i0, i1) of line `r`, the lines being the runs of d2 x c values in memory order (the
    /// unit of work of the line-parallel ops).
    pub fn line_coords(&self, r: usize) -> (usize, usize, usize) {
        let [d0, d1, _] = self.d;
        (r / (d1 * d0), (r / d1) % d0, r % d1)
    }
    /// Offset of the first value of line (n, i0, i1).
    pub fn line_start(&self, n: usize, i0: usize, i1: usize) -> usize {
        ((n * self.d[0] + i0) * self.d[1] + i1) * self.d[2] * self.c
    }
    /// The NCDHW dims as the oracle writes them.
    pub fn ncdhw(&self) -> [usize; 5] {
        [self.n, self.c, self.d[0], self.d[1], self.d[2]]
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}x{}x{} (NCDHW)", self.n, self.c, self.d[0], self.d[1], self.d[2])
    }
}

/// A float32 channels-last tensor on the host (the default: empty, no memory).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tensor {
    pub shape: Shape,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: Shape) -> Self {
        Tensor { shape, data: vec![0.0; shape.len()] }
    }
    pub fn new(shape: Shape, data: Vec<f32>) -> Result<Self> {
        if data.len() != shape.len() {
            return Err(Error::Shape(format!("{} needs {} values, got {}", shape, shape.len(), data.len())));
        }
        Ok(Tensor { shape, data })
    }
    /// From NCDHW data (file layout) to channels-last.
    pub fn from_ncdhw(dims: [usize; 5], src: &[f32]) -> Result<Self> {
        let [n, c, a, b, e] = dims;
        let shape = Shape::new(n, [a, b, e], c);
        if src.len() != shape.len() {
            return Err(Error::Shape(format!("{} needs {} values, got {}", shape, shape.len(), src.len())));
        }
        let v = a * b * e;
        let mut data = vec![0.0f32; src.len()];
        for i in 0..n {
            for ch in 0..c {
                let s = &src[(i * c + ch) * v..(i * c + ch + 1) * v];
                for (p, &x) in s.iter().enumerate() {
                    data[(i * v + p) * c + ch] = x;
                }
            }
        }
        Ok(Tensor { shape, data })
    }
    /// To NCDHW data (file layout).
    pub fn to_ncdhw(&self) -> Vec<f32> {
        let Shape { n, c, .. } = self.shape;
        let v = self.shape.voxels();
        let mut out = vec![0.0f32; self.data.len()];
        for i in 0..n {
            for p in 0..v {
                for ch in 0..c {
                    out[(i * c + ch) * v + p] = self.data[(i * v + p) * c + ch];
                }
            }
        }
        out
    }
    /// Index of (n, i0, i1, i2, c) in `data`.
    #[inline]
    pub fn idx(&self, n: usize, i: [usize; 3], c: usize) -> usize {
        let [_, d1, d2] = self.shape.d;
        (((n * self.shape.d[0] + i[0]) * d1 + i[1]) * d2 + i[2]) * self.shape.c + c
    }
}

/// The C-order multi-index of flat index `i` in `shape` (for messages naming a bad value).
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        let d = shape[k].max(1);
        idx[k] = i % d;
        i /= d;
    }
    idx
}

/// The error measure used by every parity check: max|a-e| / max(floor, max|e|).
pub fn rel_err(actual: &[f32], expected: &[f32], floor: f32) -> f32 {
    assert_eq!(actual.len(), expected.len(), "rel_err: length mismatch");
    let mut maxdiff = 0.0f32;
    let mut maxabs = 0.0f32;
    for (&a, &e) in actual.iter().zip(expected) {
        let d = (a - e).abs();
        maxdiff = if d.is_nan() { f32::INFINITY } else { maxdiff.max(d) };
        maxabs = maxabs.max(e.abs());
    }
    maxdiff / floor.max(maxabs)
}
