//! Exact Euclidean distance transform on an anisotropic grid (Felzenszwalb & Huttenlocher 2012):
//! the squared distance to the nearest site is a lower envelope of parabolas, computed one axis at
//! a time, so each of the three passes is linear in the number of voxels and the result is exact
//! (distances between voxel centres, in the units of `spacing`).
use rayon::prelude::*;

/// Squared distance from every voxel centre to the nearest voxel where `site` is true, in the units
/// of `spacing` (um). Voxels of a volume with no site get `f64::INFINITY`.
pub fn edt_sq(site: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    assert_eq!(site.len(), dims[0] * dims[1] * dims[2], "edt_sq: mask length");
    let mut f: Vec<f64> = site.iter().map(|&s| if s { 0.0 } else { f64::INFINITY }).collect();
    if f.is_empty() {
        return f;
    }
    let [n0, n1, n2] = dims;
    // Axis 2: contiguous lines.
    f.par_chunks_mut(n2).for_each_init(|| Scratch::new(n2), |s, line| s.pass(line, spacing[2]));
    // Axis 1: lines of stride n2 inside each d0-slab.
    f.par_chunks_mut(n1 * n2).for_each_init(
        || (Scratch::new(n1), vec![0.0; n1]),
        |(s, buf), slab| {
            for k in 0..n2 {
                for j in 0..n1 {
                    buf[j] = slab[j * n2 + k];
                }
                s.pass(buf, spacing[1]);
                for j in 0..n1 {
                    slab[j * n2 + k] = buf[j];
                }
            }
        },
    );
    // Axis 0: lines of stride n1*n2; split the plane into column blocks for the threads.
    let plane = n1 * n2;
    let cols: Vec<Vec<f64>> = (0..plane)
        .into_par_iter()
        .chunks(256)
        .flat_map_iter(|block| {
            let mut s = Scratch::new(n0);
            let mut out = Vec::with_capacity(block.len());
            for c in block {
                let mut buf: Vec<f64> = (0..n0).map(|i| f[i * plane + c]).collect();
                s.pass(&mut buf, spacing[0]);
                out.push(buf);
            }
            out
        })
        .collect();
    for (c, col) in cols.into_iter().enumerate() {
        for (i, v) in col.into_iter().enumerate() {
            f[i * plane + c] = v;
        }
    }
    f
}

/// Working arrays of one 1D pass: parabola vertices and the boundaries between them.
struct Scratch {
    v: Vec<usize>,
    z: Vec<f64>,
    out: Vec<f64>,
}

impl Scratch {
    fn new(n: usize) -> Self {
        Scratch { v: vec![0; n], z: vec![0.0; n + 1], out: vec![0.0; n] }
    }

    /// In place: line[q] = min_p (h (q - p))^2 + line[p].
    fn pass(&mut self, line: &mut [f64], h: f64) {
        let n = line.len();
        let mut k: isize = -1;
        for q in 0..n {
            let fq = line[q];
            if fq.is_infinite() {
                continue;
            }
            let xq = q as f64 * h;
            loop {
                if k < 0 {
                    k = 0;
                    self.v[0] = q;
                    self.z[0] = f64::NEG_INFINITY;
                    self.z[1] = f64::INFINITY;
                    break;
                }
                let vk = self.v[k as usize];
                let xv = vk as f64 * h;
                let s = ((fq + xq * xq) - (line[vk] + xv * xv)) / (2.0 * (xq - xv));
                if s <= self.z[k as usize] {
                    k -= 1;
                    continue;
                }
                k += 1;
                self.v[k as usize] = q;
                self.z[k as usize] = s;
                self.z[k as usize + 1] = f64::INFINITY;
                break;
            }
        }
        if k < 0 {
            return; // no site on this line: everything stays infinite
        }
        let mut j = 0usize;
        for q in 0..n {
            let xq = q as f64 * h;
            while self.z[j + 1] < xq {
                j += 1;
            }
            let d = (q as f64 - self.v[j] as f64) * h;
            self.out[q] = d * d + line[self.v[j]];
        }
        line.copy_from_slice(&self.out[..n]);
    }
}

/// Distance (not squared) from every voxel to the nearest voxel where `site` is true.
pub fn edt(site: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d = edt_sq(site, dims, spacing);
    d.iter_mut().for_each(|x| *x = x.sqrt());
    d
}
