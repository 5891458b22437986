//! Marching cubes over a scalar field on an anisotropic grid, for surface areas.
//!
//! The case table is built at first use from the cube's geometry, not typed in: on each face the
//! edges crossed by the iso-surface are joined in pairs (where all four are crossed, the inside
//! corners are cut off separately, a rule that depends on the face alone, so two cubes sharing a
//! face always agree and the surface has no holes); the segments, two per crossed edge, close into
//! loops, and each loop is fanned into triangles.
use std::sync::OnceLock;

/// Three corners in um.
pub type Triangle = [[f64; 3]; 3];

/// Corner c sits at (c & 1, (c >> 1) & 1, (c >> 2) & 1) along axes (0, 1, 2).
const fn corner(c: usize) -> [usize; 3] {
    [c & 1, (c >> 1) & 1, (c >> 2) & 1]
}

/// The 12 edges as corner pairs.
const EDGES: [(usize, usize); 12] = [
    (0, 1), (2, 3), (4, 5), (6, 7), // along axis 0
    (0, 2), (1, 3), (4, 6), (5, 7), // along axis 1
    (0, 4), (1, 5), (2, 6), (3, 7), // along axis 2
];

/// The 6 faces as corners in cyclic order.
const FACES: [[usize; 4]; 6] = [
    [0, 2, 6, 4], [1, 3, 7, 5], // axis 0 = 0, 1
    [0, 1, 5, 4], [2, 3, 7, 6], // axis 1 = 0, 1
    [0, 1, 3, 2], [4, 5, 7, 6], // axis 2 = 0, 1
];

fn edge_of(a: usize, b: usize) -> usize {
    EDGES.iter().position(|&(p, q)| (p, q) == (a, b) || (p, q) == (b, a)).expect("adjacent corners")
}

/// For each of the 256 inside/outside patterns, the loops of crossed edges.
fn table() -> &'static Vec<Vec<Vec<u8>>> {
    static T: OnceLock<Vec<Vec<Vec<u8>>>> = OnceLock::new();
    T.get_or_init(|| (0..256).map(loops_of).collect())
}

fn loops_of(case: usize) -> Vec<Vec<u8>> {
    let inside = |c: usize| case >> c & 1 == 1;
    let mut segs: Vec<(usize, usize)> = Vec::new();
    for f in FACES {
        let e: [usize; 4] = std::array::from_fn(|k| edge_of(f[k], f[(k + 1) % 4]));
        let crossed: Vec<usize> = (0..4).filter(|&k| inside(f[k]) != inside(f[(k + 1) % 4])).collect();
        match crossed.len() {
            0 => {}
            2 => segs.push((e[crossed[0]], e[crossed[1]])),
            4 => {
                // Two diagonal corners inside: cut each inside corner off on its own.
                for k in 0..4 {
                    if inside(f[k]) {
                        segs.push((e[(k + 3) % 4], e[k]));
                    }
                }
            }
            _ => unreachable!("a face has an even number of crossed edges"),
        }
    }
    let mut loops = Vec::new();
    let mut used = vec![false; segs.len()];
    while let Some(start) = used.iter().position(|&u| !u) {
        used[start] = true;
        let (first, mut cur) = segs[start];
        let mut lp = vec![first as u8];
        while cur != first {
            lp.push(cur as u8);
            let next = (0..segs.len()).find(|&i| !used[i] && (segs[i].0 == cur || segs[i].1 == cur)).expect("closed loop");
            used[next] = true;
            cur = if segs[next].0 == cur { segs[next].1 } else { segs[next].0 };
        }
        loops.push(lp);
    }
    loops
}

/// Calls `tri` with every triangle (corners in um, ordered so the right-hand normal points outward) of the `level` iso-surface of `field`
/// (dims `dims`, C order, value at voxel centre i at position i * spacing). "Inside" is
/// `value > level`; values outside the array count as below the level, so the surface closes.
pub fn for_each_triangle(field: &[f32], dims: [usize; 3], spacing: [f64; 3], level: f32, mut tri: impl FnMut([[f64; 3]; 3])) {
    let t = table();
    let [n0, n1, n2] = dims.map(|n| n as isize);
    let at = |i: isize, j: isize, k: isize| -> f32 {
        if i < 0 || j < 0 || k < 0 || i >= n0 || j >= n1 || k >= n2 {
            f32::NEG_INFINITY
        } else {
            field[((i * n1 + j) * n2 + k) as usize]
        }
    };
    // Cubes from -1 so the border voxels are enclosed.
    for i in -1..n0 {
        for j in -1..n1 {
            for k in -1..n2 {
                let mut v = [0f32; 8];
                let mut case = 0usize;
                for (c, vc) in v.iter_mut().enumerate() {
                    let o = corner(c);
                    *vc = at(i + o[0] as isize, j + o[1] as isize, k + o[2] as isize);
                    if *vc > level {
                        case |= 1 << c;
                    }
                }
                if case == 0 || case == 255 {
                    continue;
                }
                let mut pts = [[0f64; 3]; 12];
                for lp in &t[case] {
                    for &e in lp {
                        let (a, b) = EDGES[e as usize];
                        let (va, vb) = (v[a], v[b]);
                        // Outside the array a value is -inf: the crossing sits on the inside corner's
                        // side at the same place as for a 0-valued neighbour of a mask.
                        let (va, vb) = (if va.is_finite() { va } else { 0.0 }, if vb.is_finite() { vb } else { 0.0 });
                        let s = if vb != va { ((level - va) / (vb - va)) as f64 } else { 0.5 };
                        let (ca, cb) = (corner(a), corner(b));
                        let base = [i, j, k];
                        pts[e as usize] = std::array::from_fn(|d| {
                            let p = base[d] as f64 + ca[d] as f64 + s * (cb[d] as f64 - ca[d] as f64);
                            p * spacing[d]
                        });
                    }
                    // Outward = from the inside corner to the outside one along each crossed edge.
                    let mut out = [0f64; 3];
                    for &e in lp {
                        let (a, b) = EDGES[e as usize];
                        let (ins, outs) = if case >> a & 1 == 1 { (a, b) } else { (b, a) };
                        for d in 0..3 {
                            out[d] += (corner(outs)[d] as f64 - corner(ins)[d] as f64) * spacing[d];
                        }
                    }
                    for m in 1..lp.len() - 1 {
                        let t = [pts[lp[0] as usize], pts[lp[m] as usize], pts[lp[m + 1] as usize]];
                        let n = normal(&t);
                        tri(if n[0] * out[0] + n[1] * out[1] + n[2] * out[2] >= 0.0 { t } else { [t[0], t[2], t[1]] });
                    }
                }
            }
        }
    }
}

/// (t1 - t0) x (t2 - t0): twice the area, along the right-hand normal.
fn normal(t: &[[f64; 3]; 3]) -> [f64; 3] {
    let u: [f64; 3] = std::array::from_fn(|d| t[1][d] - t[0][d]);
    let v: [f64; 3] = std::array::from_fn(|d| t[2][d] - t[0][d]);
    [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]
}

pub fn triangle_area(t: &[[f64; 3]; 3]) -> f64 {
    let c = normal(t);
    0.5 * (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt()
}

/// Signed volume of the tetrahedron (origin, t0, t1, t2): summed over an outward-oriented closed
/// surface it is the enclosed volume (divergence theorem), whatever the origin.
pub fn triangle_volume(t: &[[f64; 3]; 3]) -> f64 {
    let [a, b, c] = t;
    (a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0]) + a[2] * (b[0] * c[1] - b[1] * c[0])) / 6.0
}

/// Area and enclosed volume of the `level` iso-surface of `field` (units of `spacing`): for a
/// continuous field (a signed distance at 0, a probability at 1/2) the linear interpolation along
/// each edge puts the vertices between voxels, on the surface.
pub fn surface_area_volume(field: &[f32], dims: [usize; 3], spacing: [f64; 3], level: f32) -> (f64, f64) {
    let (mut a, mut v) = (0.0, 0.0);
    for_each_triangle(field, dims, spacing, level, |t| {
        a += triangle_area(&t);
        v += triangle_volume(&t);
    });
    (a, v)
}

/// `triangle_area` taking the triangle by value, for [`crate::analysis::mask_surface`].
pub fn triangle_area_ref(t: [[f64; 3]; 3]) -> f64 {
    triangle_area(&t)
}

/// Area of the `level` iso-surface of `field`, in the squared units of `spacing`.
pub fn surface_area(field: &[f32], dims: [usize; 3], spacing: [f64; 3], level: f32) -> f64 {
    let mut a = 0.0;
    for_each_triangle(field, dims, spacing, level, |t| a += triangle_area(&t));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_closes_into_loops() {
        for case in 0..256 {
            let l = loops_of(case);
            let edges: usize = l.iter().map(Vec::len).sum();
            let crossed = EDGES.iter().filter(|&&(a, b)| (case >> a & 1) != (case >> b & 1)).count();
            assert_eq!(edges, crossed, "case {case}");
            assert!(l.iter().all(|lp| lp.len() >= 3), "case {case}");
        }
    }

    #[test]
    fn orientation_gives_the_enclosed_volume() {
        // One voxel: the octahedron through the edge midpoints encloses 4/3 * (1/2)^3.
        let (_, v) = surface_area_volume(&[1.0f32], [1, 1, 1], [1.0; 3], 0.5);
        assert!((v - 4.0 / 3.0 * 0.125).abs() < 1e-12, "{v}");
    }

    #[test]
    fn unit_cube_voxel() {
        // One voxel: the surface is an octahedron through the 6 edge midpoints around it.
        let f = vec![1.0f32];
        let a = surface_area(&f, [1, 1, 1], [1.0; 3], 0.5);
        let expect = 8.0 * (3f64.sqrt() / 4.0) * 0.5; // 8 equilateral triangles of side sqrt(2)/2
        assert!((a - expect).abs() < 1e-9, "{a} vs {expect}");
    }
}
