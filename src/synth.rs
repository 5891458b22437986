//! Synthetic refractive-index time-lapses of a CAR-T (effector) cell meeting a target cell, with
//! their label volumes and the signed-distance targets the published model was trained on.
//!
//! The scene, in um: culture medium of RI 1.337; a target cell (diameter 14-18 um, cytoplasm RI
//! about 1.36, a slightly denser nucleus, granules) and an effector cell (diameter 8-10 um, RI
//! 1.37-1.38, a denser nucleus, lytic granules; the levels are set so that after the blur the
//! cells' mean RI is in those ranges). Both are ellipsoids with smooth random bumps.
//! Over the frames the effector approaches along a random direction in the D0-D1 plane (the first
//! 30 % of the time), touches, then spreads: it flattens against a shared contact plane that
//! indents the target, its cross-section widening at constant volume, so the contact disc grows
//! and the interface becomes flat as the synapse forms; its granules gather at the synapse.
//!
//! The tomogram: the RI phantom (cell edges anti-aliased over ~0.05 um) is filtered in Fourier
//! space by an anisotropic Gaussian (sigma 0.12 um laterally, 0.35 um along D2, the optical axis)
//! times a missing cone (frequencies within 30 degrees of the D2 axis damped to 25 %), which
//! blurs and elongates the cells axially and lowers their RI near the top and bottom as optical
//! diffraction tomography does; then Gaussian noise (sigma 0.0015) is added.
//!
//! Labels: 0 background, 1 effector, 2 target, at voxel centres. Distances (um): + the distance
//! from an effector voxel to the nearest non-effector voxel, - the same inside the target, 0 in
//! the background (exact anisotropic EDT). Deterministic: a seed gives bit-identical files on any
//! machine (the scalar FFT, no SIMD dispatch; per-frame random streams; no thread-order effects).
use crate::analysis::edt::edt;
use crate::error::{Error, Result};
use crate::rng::Rng;
use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::FftPlannerScalar;
use serde::Serialize;
use std::path::Path;

pub const MEDIUM_RI: f64 = crate::analysis::MEDIUM_RI;
/// Half-width (um) of the anti-aliased cell edge in the RI phantom.
const EDGE_W: f64 = 0.05;
const BLUR_SIGMA_LATERAL: f64 = 0.12;
const BLUR_SIGMA_AXIAL: f64 = 0.35;
const MISSING_CONE_DEG: f64 = 30.0;
const MISSING_CONE_FILL: f64 = 0.25;
const NOISE_SIGMA: f64 = 0.0015;
/// Fraction of the time-lapse spent approaching before contact.
const CONTACT_AT: f64 = 0.3;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SynthOptions {
    pub frames: usize,
    /// Voxels along D0, D1, D2 (D2 is the optical axis).
    pub size: [usize; 3],
    /// Voxel size in um along D0, D1, D2.
    pub voxel_size: [f64; 3],
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions { frames: 8, size: [128, 128, 64], voxel_size: [0.2, 0.2, 0.4], seed: 0 }
    }
}

impl SynthOptions {
    pub fn validate(&self) -> Result<()> {
        crate::analysis::check_voxel_size(self.voxel_size)?;
        if self.frames == 0 {
            return Err(Error::Input("--frames must be at least 1".into()));
        }
        if self.size.iter().any(|&s| s < 8) {
            return Err(Error::Input(format!("--size {:?}: every side must be at least 8 voxels", self.size)));
        }
        if crate::limits::product(&self.size.map(|s| s as u64)).is_none_or(|n| n > 1 << 28) {
            return Err(Error::Input(format!("--size {:?}: more than 2^28 voxels per frame", self.size)));
        }
        Ok(())
    }
}

/// One frame: RI volume, labels and signed distances, each D0 x D1 x D2 in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub ri: Vec<f32>,
    pub labels: Vec<u8>,
    pub distance: Vec<f32>,
    pub truth: FrameTruth,
}

/// What the scene was at this frame (for checks and for the model card).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrameTruth {
    pub frame: usize,
    /// Gap between the cells along the approach axis (um); 0 once in contact.
    pub gap_um: f64,
    /// 0 before contact, rising to 1 at the last frame: how far the synapse has formed.
    pub spreading: f64,
    /// Radius (um) of the flat contact disc (0 before contact).
    pub contact_radius_um: f64,
    pub effector_centre_um: [f64; 3],
    pub target_centre_um: [f64; 3],
}

type V3 = [f64; 3];

fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn add(a: V3, b: V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}
fn scale(a: V3, s: f64) -> V3 {
    [a[0] * s, a[1] * s, a[2] * s]
}
fn cross(a: V3, b: V3) -> V3 {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}
fn norm(a: V3) -> V3 {
    scale(a, 1.0 / dot(a, a).sqrt())
}
fn uniform(r: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * r.uniform()
}
fn unit(r: &mut Rng) -> V3 {
    norm([r.normal(), r.normal(), r.normal()])
}

/// An ellipsoid with smooth bumps: axes along the columns of `frame`.
#[derive(Clone, Debug)]
struct Body {
    centre: V3,
    axes: V3,
    frame: [V3; 3],
    /// (direction, frequency, amplitude, phase) of each bump term.
    bumps: Vec<(V3, f64, f64, f64)>,
}

impl Body {
    fn new(centre: V3, axes: V3, frame: [V3; 3]) -> Self {
        Body { centre, axes, frame, bumps: Vec::new() }
    }

    fn with_bumps(mut self, r: &mut Rng, n: usize, amp: f64) -> Self {
        self.bumps = (0..n).map(|_| (unit(r), uniform(r, 1.5, 3.5), amp * uniform(r, 0.5, 1.0), uniform(r, 0.0, std::f64::consts::TAU))).collect();
        self
    }

    /// Approximate signed distance (um, negative inside).
    fn sd(&self, x: V3) -> f64 {
        let d = sub(x, self.centre);
        let u = [dot(d, self.frame[0]) / self.axes[0], dot(d, self.frame[1]) / self.axes[1], dot(d, self.frame[2]) / self.axes[2]];
        let rho = dot(u, u).sqrt();
        let mut g = 1.0;
        if rho > 1e-9 {
            let dir = scale(u, 1.0 / rho);
            for &(n, f, a, p) in &self.bumps {
                g += a * (f * dot(dir, n) + p).cos();
            }
        }
        // Scale by the local radius so the value is close to a distance in um near the surface.
        let local = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt() / rho.max(1e-9);
        (rho - g) * if rho > 1e-9 { local } else { self.axes[0] }
    }

    /// Distance from the centre to the surface along `dir` (bisection on `sd`).
    fn extent(&self, dir: V3) -> f64 {
        let (mut lo, mut hi) = (0.0, 3.0 * self.axes.iter().cloned().fold(0.0, f64::max));
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if self.sd(add(self.centre, scale(dir, mid))) < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }

    fn moved_to(&self, c: V3) -> Body {
        Body { centre: c, ..self.clone() }
    }
}

/// A small sphere of higher RI inside a cell.
#[derive(Clone, Debug)]
struct Granule {
    /// Position relative to the cell centre, in the cell's frame, at rest and at the synapse.
    rest: V3,
    synapse: V3,
    radius: f64,
    dn: f64,
}

/// Everything random about a time-lapse, drawn once from the seed.
#[derive(Clone, Debug)]
struct Scene {
    target: Body,
    target_nucleus: Body,
    target_granules: Vec<Granule>,
    /// The effector at rest (a sphere-like body, centre at the origin).
    effector_r: f64,
    effector_bumps: Body,
    effector_nucleus_frac: f64,
    effector_granules: Vec<Granule>,
    /// Approach direction (effector -> target), in the D0-D1 plane up to a small tilt.
    u: V3,
    start_gap: f64,
    n: RiLevels,
    /// Plane waves (wave vector 1/um, amplitude, phase) of the cytoplasm texture.
    texture: Vec<(V3, f64, f64)>,
    /// Small sideways drift of the effector per frame (um).
    drift: Vec<V3>,
}

#[derive(Clone, Debug)]
struct RiLevels {
    effector_cyto: f64,
    effector_nucleus: f64,
    target_cyto: f64,
    target_nucleus: f64,
}

impl Scene {
    fn new(o: &SynthOptions) -> Scene {
        let mut r = Rng::new(o.seed);
        let field: V3 = std::array::from_fn(|k| o.size[k] as f64 * o.voxel_size[k]);
        let ang = uniform(&mut r, 0.0, std::f64::consts::TAU);
        let tilt = uniform(&mut r, -0.15, 0.15);
        let u = norm([ang.cos(), ang.sin(), tilt]);

        // Target: radius 7-9 um, slightly flattened along the optical axis, random in-plane turn.
        let rt = uniform(&mut r, 7.0, 9.0);
        let axes_t = [rt * uniform(&mut r, 0.95, 1.05), rt * uniform(&mut r, 0.95, 1.05), rt * uniform(&mut r, 0.85, 0.95)];
        let a = uniform(&mut r, 0.0, std::f64::consts::TAU);
        let frame_t = [[a.cos(), a.sin(), 0.0], [-a.sin(), a.cos(), 0.0], [0.0, 0.0, 1.0]];
        let target = Body::new([0.0; 3], axes_t, frame_t).with_bumps(&mut r, 4, 0.025);
        let nuc_off = scale(unit(&mut r), 0.12 * rt);
        let target_nucleus = Body::new(nuc_off, scale(axes_t, 0.55), frame_t).with_bumps(&mut r, 3, 0.04);
        let target_granules = (0..8)
            .map(|_| {
                let p = scale(unit(&mut r), uniform(&mut r, 0.2, 0.75) * rt);
                Granule { rest: p, synapse: p, radius: uniform(&mut r, 0.3, 0.6), dn: 0.006 }
            })
            .collect();

        // Effector: radius 4-5 um.
        let re = uniform(&mut r, 4.0, 5.0);
        let effector_bumps = Body::new([0.0; 3], [re; 3], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).with_bumps(&mut r, 3, 0.03);
        // Granules in the effector's frame (axis 0 = u): they gather under the synapse (+u side).
        let effector_granules = (0..6)
            .map(|_| {
                let rest = scale(unit(&mut r), uniform(&mut r, 0.3, 0.7) * re);
                let synapse = [0.55 * re, uniform(&mut r, -0.3, 0.3) * re, uniform(&mut r, -0.3, 0.3) * re];
                Granule { rest, synapse, radius: uniform(&mut r, 0.3, 0.45), dn: 0.012 }
            })
            .collect();
        let ec = uniform(&mut r, 1.374, 1.379);
        let tc = uniform(&mut r, 1.360, 1.364);
        let n = RiLevels {
            effector_cyto: ec,
            effector_nucleus: ec + uniform(&mut r, 0.005, 0.008),
            target_cyto: tc,
            target_nucleus: tc + uniform(&mut r, 0.003, 0.005),
        };
        let texture = (0..5)
            .map(|_| (scale(unit(&mut r), uniform(&mut r, 0.25, 0.6)), uniform(&mut r, 0.0008, 0.0016), uniform(&mut r, 0.0, std::f64::consts::TAU)))
            .collect();
        let mut drift = vec![[0.0; 3]; o.frames];
        let side = norm(cross([0.0, 0.0, 1.0], u));
        for t in 1..o.frames {
            let step = add(scale(side, 0.08 * r.normal()), [0.0, 0.0, 0.04 * r.normal()]);
            drift[t] = add(drift[t - 1], step);
        }
        let mut s = Scene {
            target,
            target_nucleus,
            target_granules,
            effector_r: re,
            effector_bumps,
            effector_nucleus_frac: uniform(&mut r, 0.55, 0.62),
            effector_granules,
            u,
            start_gap: uniform(&mut r, 1.5, 2.5),
            n,
            texture,
            drift,
        };
        // Centre the union of the target and the effector's first position in the field.
        let (eff0, _, _) = s.effector_at(0.0, [0.0; 3]);
        let rmax_t = s.target.axes.iter().cloned().fold(0.0, f64::max) * 1.1;
        let rmax_e = re * 1.1;
        let lo: V3 = std::array::from_fn(|k| (-rmax_t).min(eff0.centre[k] - rmax_e));
        let hi: V3 = std::array::from_fn(|k| rmax_t.max(eff0.centre[k] + rmax_e));
        let shift: V3 = std::array::from_fn(|k| field[k] / 2.0 - (lo[k] + hi[k]) / 2.0);
        s.target.centre = shift;
        s.target_nucleus.centre = add(s.target_nucleus.centre, shift);
        s
    }

    /// Spreading (0..1) and gap (um) at time s in [0, 1].
    fn phase(&self, s: f64) -> (f64, f64) {
        if s < CONTACT_AT {
            (0.0, self.start_gap * (1.0 - s / CONTACT_AT))
        } else {
            let x = (s - CONTACT_AT) / (1.0 - CONTACT_AT);
            (x * x * (3.0 - 2.0 * x), 0.0)
        }
    }

    /// The effector body, the contact plane point and the target indentation at time s (target
    /// centred as now), with a sideways `drift`.
    fn effector_at(&self, s: f64, drift: V3) -> (Body, V3, f64) {
        let (spread, gap) = self.phase(s);
        let u = self.u;
        let e1 = norm(cross([0.0, 0.0, 1.0], u));
        let e2 = cross(u, e1);
        // Flattened along u at constant volume, and the cap cut off by the contact plane given
        // back by a uniform swelling, so the cell keeps its volume as it spreads.
        let f = 0.2 * spread;
        let clip_frac = 0.3 * spread; // cap depth / r_par
        let cap = clip_frac * clip_frac * (3.0 - clip_frac) / 4.0; // cap volume / ellipsoid volume
        let re = self.effector_r * (1.0 - cap).powf(-1.0 / 3.0);
        let (r_par, r_perp) = (re * (1.0 - f), re / (1.0 - f).sqrt());
        let mut body = Body::new([0.0; 3], [r_par, r_perp, r_perp], [u, e1, e2]);
        body.bumps = self.effector_bumps.bumps.clone();
        let indent = 0.4 * spread;
        let clip = clip_frac * r_par;
        let tc = add(self.target.centre, drift);
        let rt = self.target.moved_to(tc).extent(scale(u, -1.0));
        let front = body.extent(u);
        let (plane, centre) = if gap > 0.0 {
            let p = sub(tc, scale(u, rt + gap / 2.0));
            (p, sub(tc, scale(u, rt + gap + front)))
        } else {
            let p = sub(tc, scale(u, rt - indent));
            (p, sub(p, scale(u, front - clip)))
        };
        body.centre = centre;
        (body, plane, indent)
    }

    fn frame(&self, o: &SynthOptions, t: usize) -> Frame {
        let s = if o.frames > 1 { t as f64 / (o.frames - 1) as f64 } else { 0.75 };
        let (spread, gap) = self.phase(s);
        // The target stays; the drift moves the effector relative to it.
        let (mut eff, plane, _) = self.effector_at(s, [0.0; 3]);
        let dr = self.drift[t];
        let dr_side = sub(dr, scale(self.u, dot(dr, self.u)));
        eff.centre = add(eff.centre, dr_side);
        let u = self.u;
        let nuc_frac = self.effector_nucleus_frac;
        // The nucleus sits back from the synapse as it forms.
        let mut eff_nuc = eff.clone();
        eff_nuc.axes = scale(eff.axes, nuc_frac);
        eff_nuc.centre = sub(eff.centre, scale(u, 0.12 * self.effector_r * (1.0 + spread)));
        eff_nuc.bumps.iter_mut().for_each(|b| b.2 *= 1.5);
        let gr: Vec<(V3, f64, f64)> = self
            .effector_granules
            .iter()
            .map(|g| {
                let l: V3 = std::array::from_fn(|k| g.rest[k] + spread * (g.synapse[k] - g.rest[k]));
                let p = add(eff.centre, add(add(scale(eff.frame[0], l[0]), scale(eff.frame[1], l[1])), scale(eff.frame[2], l[2])));
                (p, g.radius, g.dn)
            })
            .collect();
        let tg: Vec<(V3, f64, f64)> = self.target_granules.iter().map(|g| (add(self.target.centre, g.rest), g.radius, g.dn)).collect();

        let dims = o.size;
        let vs = o.voxel_size;
        let nv = dims[0] * dims[1] * dims[2];
        let mut phantom = vec![0f64; nv];
        let mut labels = vec![0u8; nv];
        let target = &self.target;
        let n = &self.n;
        phantom.par_chunks_mut(dims[1] * dims[2]).zip(labels.par_chunks_mut(dims[1] * dims[2])).enumerate().for_each(|(i, (ph, lb))| {
            for j in 0..dims[1] {
                for k in 0..dims[2] {
                    let x = [i as f64 * vs[0], j as f64 * vs[1], k as f64 * vs[2]];
                    let side = dot(sub(x, plane), u); // < 0: the effector's side of the contact plane
                    let sd_e = eff.sd(x).max(side);
                    let sd_t = target.sd(x).max(-side);
                    let p = (i * dims[1] + j) * dims[2] + k;
                    let mut dn = 0.0;
                    if sd_e < 6.0 * EDGE_W {
                        let chi = soft(sd_e);
                        let nuc = soft(eff_nuc.sd(x));
                        let mut v = n.effector_cyto - MEDIUM_RI + nuc * (n.effector_nucleus - n.effector_cyto);
                        v += granules(&gr, x) + self.texture_at(x);
                        dn += chi * v;
                    }
                    if sd_t < 6.0 * EDGE_W {
                        let chi = soft(sd_t);
                        let nuc = soft(self.target_nucleus.sd(x));
                        let mut v = n.target_cyto - MEDIUM_RI + nuc * (n.target_nucleus - n.target_cyto);
                        v += granules(&tg, x) + self.texture_at(x);
                        dn += chi * v;
                    }
                    ph[p - i * dims[1] * dims[2]] = dn;
                    lb[p - i * dims[1] * dims[2]] = if sd_e < 0.0 {
                        1
                    } else if sd_t < 0.0 {
                        2
                    } else {
                        0
                    };
                }
            }
        });
        let blurred = blur(&phantom, dims, vs);
        let mut noise = Rng::new(o.seed ^ 0xA5A5_5A5A_0000_0000 ^ (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let ri: Vec<f32> = blurred.iter().map(|&b| (MEDIUM_RI + b + NOISE_SIGMA * noise.normal()) as f32).collect();
        let distance = signed_distance(&labels, dims, vs);
        let contact_radius_um = if gap > 0.0 {
            0.0
        } else {
            // The contact disc: effector voxels whose +u neighbour across the plane is target.
            contact_radius(&eff, plane, u)
        };
        Frame {
            ri,
            labels,
            distance,
            truth: FrameTruth {
                frame: t,
                gap_um: gap,
                spreading: spread,
                contact_radius_um,
                effector_centre_um: eff.centre,
                target_centre_um: self.target.centre,
            },
        }
    }

    fn texture_at(&self, x: V3) -> f64 {
        self.texture.iter().map(|&(k, a, p)| a * (std::f64::consts::TAU * dot(k, x) + p).sin()).sum()
    }
}

/// Radius of the disc where the contact plane cuts the effector body.
fn contact_radius(eff: &Body, plane: V3, u: V3) -> f64 {
    // Along rays in the plane from the plane's point on the axis, bisect for the body's edge.
    let axis_pt = add(eff.centre, scale(u, dot(sub(plane, eff.centre), u)));
    if eff.sd(axis_pt) >= 0.0 {
        return 0.0;
    }
    let e1 = norm(cross([0.0, 0.0, 1.0], u));
    let e2 = cross(u, e1);
    let mut sum = 0.0;
    for a in 0..16 {
        let th = a as f64 * std::f64::consts::TAU / 16.0;
        let dir = add(scale(e1, th.cos()), scale(e2, th.sin()));
        let (mut lo, mut hi) = (0.0, 3.0 * eff.axes[1]);
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if eff.sd(add(axis_pt, scale(dir, mid))) < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        sum += lo;
    }
    sum / 16.0
}

fn soft(sd: f64) -> f64 {
    1.0 / (1.0 + (sd / (EDGE_W / 2.0)).exp())
}

fn granules(g: &[(V3, f64, f64)], x: V3) -> f64 {
    let mut v = 0.0;
    for &(c, r, dn) in g {
        let d = sub(x, c);
        let q = dot(d, d);
        if q < (r + 0.3) * (r + 0.3) {
            v += dn * soft(q.sqrt() - r);
        }
    }
    v
}

/// + distance to the nearest non-effector voxel inside the effector, - the same inside the target.
pub fn signed_distance(labels: &[u8], dims: [usize; 3], voxel: [f64; 3]) -> Vec<f32> {
    let not_e: Vec<bool> = labels.iter().map(|&l| l != 1).collect();
    let not_t: Vec<bool> = labels.iter().map(|&l| l != 2).collect();
    let de = edt(&not_e, dims, voxel);
    let dt = edt(&not_t, dims, voxel);
    labels
        .iter()
        .enumerate()
        .map(|(p, &l)| match l {
            1 => de[p] as f32,
            2 => -dt[p] as f32,
            _ => 0.0,
        })
        .collect()
}

/// The optical transfer of the simulated microscope, applied in Fourier space.
fn blur(x: &[f64], dims: [usize; 3], vs: [f64; 3]) -> Vec<f64> {
    let mut c: Vec<Complex<f64>> = x.iter().map(|&v| Complex::new(v, 0.0)).collect();
    fft3(&mut c, dims, false);
    let freq = |j: usize, n: usize, v: f64| -> f64 {
        let s = if j < n.div_ceil(2) { j as f64 } else { j as f64 - n as f64 };
        s / (n as f64 * v)
    };
    let (lo, hi) = ((MISSING_CONE_DEG - 8.0).to_radians(), (MISSING_CONE_DEG + 8.0).to_radians());
    let two_pi2 = 2.0 * std::f64::consts::PI * std::f64::consts::PI;
    c.par_chunks_mut(dims[1] * dims[2]).enumerate().for_each(|(i, slab)| {
        let k0 = freq(i, dims[0], vs[0]);
        for j in 0..dims[1] {
            let k1 = freq(j, dims[1], vs[1]);
            for k in 0..dims[2] {
                let k2 = freq(k, dims[2], vs[2]);
                let kr2 = k0 * k0 + k1 * k1;
                let gauss = (-two_pi2 * (BLUR_SIGMA_LATERAL.powi(2) * kr2 + BLUR_SIGMA_AXIAL.powi(2) * k2 * k2)).exp();
                let cone = if kr2 == 0.0 && k2 == 0.0 {
                    1.0
                } else {
                    // Angle from the optical axis: inside the cone the transfer is damped.
                    let phi = kr2.sqrt().atan2(k2.abs());
                    let t = ((phi - lo) / (hi - lo)).clamp(0.0, 1.0);
                    MISSING_CONE_FILL + (1.0 - MISSING_CONE_FILL) * t * t * (3.0 - 2.0 * t)
                };
                slab[j * dims[2] + k] *= gauss * cone;
            }
        }
    });
    fft3(&mut c, dims, true);
    let inv_n = 1.0 / c.len() as f64;
    c.iter().map(|z| z.re * inv_n).collect()
}

/// In-place 3D FFT (unnormalised), one axis at a time with the scalar planner (bit-reproducible).
fn fft3(c: &mut [Complex<f64>], dims: [usize; 3], inverse: bool) {
    let [n0, n1, n2] = dims;
    let mut planner = FftPlannerScalar::<f64>::new();
    let mut plan = |n: usize| if inverse { planner.plan_fft_inverse(n) } else { planner.plan_fft_forward(n) };
    let (f0, f1, f2) = (plan(n0), plan(n1), plan(n2));
    c.par_chunks_mut(n2).for_each(|line| f2.process(line));
    c.par_chunks_mut(n1 * n2).for_each(|slab| {
        let mut buf = vec![Complex::new(0.0, 0.0); n1];
        for k in 0..n2 {
            for j in 0..n1 {
                buf[j] = slab[j * n2 + k];
            }
            f1.process(&mut buf);
            for j in 0..n1 {
                slab[j * n2 + k] = buf[j];
            }
        }
    });
    let plane = n1 * n2;
    let cols: Vec<Vec<Complex<f64>>> = (0..plane)
        .into_par_iter()
        .map(|p| {
            let mut buf: Vec<Complex<f64>> = (0..n0).map(|i| c[i * plane + p]).collect();
            f0.process(&mut buf);
            buf
        })
        .collect();
    for (p, col) in cols.into_iter().enumerate() {
        for (i, v) in col.into_iter().enumerate() {
            c[i * plane + p] = v;
        }
    }
}

/// The frames of a time-lapse, computed one by one (each frame is parallel inside).
pub fn synthesize(o: &SynthOptions) -> Result<Vec<Frame>> {
    o.validate()?;
    let scene = Scene::new(o);
    Ok((0..o.frames).map(|t| scene.frame(o, t)).collect())
}

/// The frame `t` of the time-lapse of `o` alone.
pub fn synthesize_frame(o: &SynthOptions, t: usize) -> Result<Frame> {
    o.validate()?;
    if t >= o.frames {
        return Err(Error::Input(format!("frame {t} of a {}-frame time-lapse", o.frames)));
    }
    Ok(Scene::new(o).frame(o, t))
}

#[derive(Serialize)]
struct Manifest<'a> {
    generator: &'static str,
    options: &'a SynthOptions,
    axes: &'static str,
    layout: &'static str,
    medium_ri: f64,
    frames: Vec<FrameTruth>,
}

/// Writes a time-lapse to `dir`:
/// `input/tNNN.npy` (float32 RI), `labels/tNNN.npy` (uint8), `target/tNNN.npy` (float32 signed
/// distance, um) per frame; `input.npy` and `labels.npy` stacks (T x D0 x D1 x D2) for `segment`
/// and `analyze`; `synth.json` (options and per-frame truth). `progress` is called after each frame.
pub fn write_time_lapse(dir: &Path, o: &SynthOptions, mut progress: impl FnMut(usize)) -> Result<Vec<FrameTruth>> {
    o.validate()?;
    for sub in ["input", "labels", "target"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| Error::io(dir.join(sub), e))?;
    }
    let scene = Scene::new(o);
    let d = o.size;
    let nv = d[0] * d[1] * d[2];
    let mut ri_stack = Vec::with_capacity(o.frames * nv);
    let mut label_stack = Vec::with_capacity(o.frames * nv);
    let mut truth = Vec::new();
    for t in 0..o.frames {
        let f = scene.frame(o, t);
        let name = format!("t{t:03}.npy");
        crate::io::write_npy(&dir.join("input").join(&name), &d, &f.ri)?;
        crate::analysis::write_labels(&dir.join("labels").join(&name), &d, &f.labels)?;
        crate::io::write_npy(&dir.join("target").join(&name), &d, &f.distance)?;
        ri_stack.extend_from_slice(&f.ri);
        label_stack.extend_from_slice(&f.labels);
        truth.push(f.truth);
        progress(t);
    }
    let td = [o.frames, d[0], d[1], d[2]];
    crate::io::write_npy(&dir.join("input.npy"), &td, &ri_stack)?;
    crate::analysis::write_labels(&dir.join("labels.npy"), &td, &label_stack)?;
    let m = Manifest {
        generator: concat!("deepis synth ", env!("CARGO_PKG_VERSION")),
        options: o,
        axes: "D0, D1, D2; D2 is the optical axis; voxel (i,j,k) centred at (i,j,k) * voxel_size um",
        layout: "input/tNNN.npy float32 RI; labels/tNNN.npy uint8 0 background 1 effector 2 target; target/tNNN.npy float32 signed distance um (+ effector, - target); input.npy, labels.npy: T x D0 x D1 x D2 stacks",
        medium_ri: MEDIUM_RI,
        frames: truth.clone(),
    };
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::Other(e.to_string()))?;
    crate::io::write_atomic(&dir.join("synth.json"), |w| std::io::Write::write_all(w, json.as_bytes()))?;
    Ok(truth)
}

#[derive(clap::Args, Debug, Clone)]
pub struct SynthArgs {
    /// Folder to write the time-lapse to (created if missing)
    #[arg(short, long = "output", value_name = "DIR")]
    pub out_dir: std::path::PathBuf,
    /// Number of frames
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Voxels along D0, D1, D2 (D2 is the optical axis)
    #[arg(long, default_value = "128,128,64", value_parser = crate::engine::parse_size)]
    pub size: [usize; 3],
    /// Voxel size in um along D0, D1, D2
    #[arg(long, default_value = "0.2,0.2,0.4", value_parser = crate::analysis::parse_voxel_size, allow_hyphen_values = true)]
    pub voxel_size: [f64; 3],
    /// Random seed: the same seed gives bit-identical files
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `deepis synth`.
pub fn run_cli(a: &SynthArgs) -> Result<()> {
    let o = SynthOptions { frames: a.frames, size: a.size, voxel_size: a.voxel_size, seed: a.seed };
    o.validate()?;
    let t0 = std::time::Instant::now();
    let pb = indicatif::ProgressBar::new(o.frames as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} frame {pos}/{len}, {elapsed} elapsed, ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let truth = write_time_lapse(&a.out_dir, &o, |_| pb.inc(1))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    // A look at the last frame: mid-slices with the labels overlaid.
    let last = o.frames - 1;
    let name = format!("t{last:03}.npy");
    let ri = crate::io::read_volume(&a.out_dir.join("input").join(&name))?.tensor.data;
    let labels: Vec<u8> = crate::io::read_volume(&a.out_dir.join("labels").join(&name))?.tensor.data.iter().map(|&v| v as u8).collect();
    let preview = a.out_dir.join("preview.png");
    let title = format!("frame {last}: D0-D1 mid-slice | D0-D2 mid-slice (red effector, blue target)");
    crate::plot::plot_slices(&preview, &ri, &labels, o.size, o.voxel_size, &title, 3)?;
    for t in &truth {
        eprintln!(
            "frame {:>3}: gap {:.2} um, spreading {:.2}, contact radius {:.2} um",
            t.frame, t.gap_um, t.spreading, t.contact_radius_um
        );
    }
    eprintln!(
        "wrote {} frame(s) of {}x{}x{} to {} in {:.1} s ({:.2} s per frame)",
        o.frames,
        o.size[0],
        o.size[1],
        o.size[2],
        a.out_dir.display(),
        secs,
        secs / o.frames as f64
    );
    eprintln!("preview of the last frame: {}", preview.display());
    Ok(())
}
