//! Immunological-synapse analysis of label volumes (0 background, 1 effector, 2 target): per frame,
//! the volume, surface area, sphericity and dry mass of each cell, the synapse area and its mean
//! refractive index, and the distance between the cells' centroids.
//!
//! Conventions: array axes (D0, D1, D2) with voxel sizes in um; voxel (i, j, k) has its centre at
//! (i d0, j d1, k d2). Surfaces are marching-cubes iso-surfaces at level 1/2 of the mask after a
//! [1 2 1]/4 smoothing along each axis: on a raw 0/1 mask every vertex sits on an edge midpoint and
//! the staircase inflates areas by 5-10 %; the smoothing moves vertices onto the boundary and keeps
//! a flat boundary where it is; the smoothed surface is then volume-matched ([`surface_area`]).
pub mod components;
pub mod edt;
pub mod marching_cubes;
pub mod probabilities;
pub mod surface_area;

pub use crate::voxel::{check_voxel_size, parse_voxel_size};
use crate::error::{Error, Result};
use crate::io::{read_volume, Volume};
use crate::tensor::unravel;
use rayon::prelude::*;
use std::path::Path;

/// Medium (culture medium) refractive index.
pub const MEDIUM_RI: f64 = 1.337;

pub const EFFECTOR: u8 = 1;
pub const TARGET: u8 = 2;

/// The CSV columns, in order.
pub const COLUMNS: [&str; 13] = [
    "frame",
    "effector_volume_um3",
    "target_volume_um3",
    "effector_area_um2",
    "target_area_um2",
    "effector_sphericity",
    "target_sphericity",
    "effector_dry_mass_pg",
    "target_dry_mass_pg",
    "is_area_um2",
    "is_mean_ri",
    "centroid_distance_um",
    "time_s",
];

#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Voxel size along D0, D1, D2 in um.
    pub voxel_size: [f64; 3],
    /// The synapse is the part of the effector's surface within this distance (um) of the target.
    pub is_distance: f64,
    /// Refractive-index increment in um^3/pg (= mL/g).
    pub dn_dc: f64,
    /// Refractive index of the medium.
    pub medium_ri: f64,
    /// Seconds between frames (the `time_s` column), when known.
    pub time_interval_s: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Options { voxel_size: [0.2, 0.2, 0.4], is_distance: 1.0, dn_dc: 0.19, medium_ri: MEDIUM_RI, time_interval_s: None }
    }
}

impl Options {
    pub fn validate(&self) -> Result<()> {
        check_voxel_size(self.voxel_size)?;
        if !(self.is_distance.is_finite() && self.is_distance >= 0.0) {
            return Err(Error::Input(format!("--is-distance must be a finite distance >= 0 um, got {}", self.is_distance)));
        }
        if !(self.dn_dc.is_finite() && self.dn_dc > 0.0) {
            return Err(Error::Input(format!("--dn-dc must be positive (um^3/pg), got {}", self.dn_dc)));
        }
        if let Some(t) = self.time_interval_s.filter(|t| !(t.is_finite() && *t > 0.0)) {
            return Err(Error::Input(format!("--time-interval must be a positive number of seconds, got {t}")));
        }
        Ok(())
    }
}


/// Metrics of one frame. Quantities of an absent cell (or of the synapse when a cell is absent)
/// are 0 for volumes and areas and NaN for ratios, dry masses without RI, and distances.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameMetrics {
    pub frame: usize,
    pub effector_volume_um3: f64,
    pub target_volume_um3: f64,
    pub effector_area_um2: f64,
    pub target_area_um2: f64,
    pub effector_sphericity: f64,
    pub target_sphericity: f64,
    pub effector_dry_mass_pg: f64,
    pub target_dry_mass_pg: f64,
    pub is_area_um2: f64,
    pub is_mean_ri: f64,
    pub centroid_distance_um: f64,
    /// frame x the time-lapse's interval (a TCF's `TimeInterval`, carried by `segment` in the
    /// labels' sidecar), NaN when unknown.
    pub time_s: f64,
}

impl FrameMetrics {
    /// The values in [`COLUMNS`] order (frame as a float).
    pub fn values(&self) -> [f64; 13] {
        [
            self.frame as f64,
            self.effector_volume_um3,
            self.target_volume_um3,
            self.effector_area_um2,
            self.target_area_um2,
            self.effector_sphericity,
            self.target_sphericity,
            self.effector_dry_mass_pg,
            self.target_dry_mass_pg,
            self.is_area_um2,
            self.is_mean_ri,
            self.centroid_distance_um,
            self.time_s,
        ]
    }
}

/// Sphericity pi^(1/3) (6V)^(2/3) / A: 1 for a ball, less for anything else.
pub fn sphericity(volume: f64, area: f64) -> f64 {
    if area > 0.0 {
        std::f64::consts::PI.cbrt() * (6.0 * volume).powf(2.0 / 3.0) / area
    } else {
        f64::NAN
    }
}

/// Checks that every value is 0, 1 or 2 and converts to u8; the error names the first bad voxel.
pub fn labels_from_f32(values: &[f32], dims: &[usize], what: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        if v == 0.0 || v == 1.0 || v == 2.0 {
            out.push(v as u8);
        } else {
            return Err(Error::format(
                what,
                format!("label {v} at index {:?}: a label volume holds 0 (background), 1 (effector) and 2 (target) only", unravel(i, dims)),
            ));
        }
    }
    Ok(out)
}

/// Where the cells' surfaces come from.
#[derive(Clone, Copy, Debug)]
pub enum Surfaces<'a> {
    /// The label masks: smoothed, volume-matched marching cubes ([`mask_surface`]); volumes are
    /// voxel counts.
    Labels,
    /// The effector's and the target's fields of a sigmoid head's maps ([`probabilities::field`]):
    /// their level-1/2 surfaces near each labelled cell, volume-matched
    /// ([`surface_area::field_surface`]); volumes are voxel counts. A class with no field (the
    /// maps have no channel for it) falls back to its labels.
    Fields([Option<&'a [f32]>; 2]),
}

/// Metrics of one frame: `labels` (0/1/2) and optional `ri`, both D0 x D1 x D2 in C order;
/// surfaces from the labels.
pub fn analyze_frame(frame: usize, labels: &[u8], ri: Option<&[f32]>, dims: [usize; 3], opt: &Options) -> FrameMetrics {
    analyze_frame_from(frame, labels, ri, Surfaces::Labels, dims, opt)
}

/// The sum of `per_triangle` over the surface of the cell `mask` of `class`.
fn cell_surface(mask: &[bool], class: u8, s: Surfaces<'_>, dims: [usize; 3], vox: [f64; 3], per_triangle: impl FnMut([[f64; 3]; 3]) -> f64) -> f64 {
    if let Surfaces::Fields(fields) = s {
        if let Some(g) = fields[class as usize - 1] {
            return surface_area::field_surface(g, mask, dims, vox, per_triangle);
        }
    }
    mask_surface(mask, dims, vox, per_triangle)
}

/// [`analyze_frame`] with the surfaces taken from `surfaces`.
pub fn analyze_frame_from(frame: usize, labels: &[u8], ri: Option<&[f32]>, surfaces: Surfaces<'_>, dims: [usize; 3], opt: &Options) -> FrameMetrics {
    let n = dims[0] * dims[1] * dims[2];
    assert_eq!(labels.len(), n, "analyze_frame: labels length");
    if let Some(r) = ri {
        assert_eq!(r.len(), n, "analyze_frame: ri length");
    }
    let vox = opt.voxel_size;
    let vv = vox[0] * vox[1] * vox[2];
    let eff: Vec<bool> = labels.iter().map(|&l| l == EFFECTOR).collect();
    let tgt: Vec<bool> = labels.iter().map(|&l| l == TARGET).collect();
    let count = |m: &[bool]| m.iter().filter(|&&b| b).count();
    let (ne, nt) = (count(&eff), count(&tgt));
    let (ve, vt) = (ne as f64 * vv, nt as f64 * vv);

    let dry = |m: &[bool]| match ri {
        Some(r) => {
            let s: f64 = m.iter().zip(r).filter(|(&b, _)| b).map(|(_, &x)| x as f64 - opt.medium_ri).sum();
            s * vv / opt.dn_dc
        }
        None => f64::NAN,
    };

    // Distance (um) from every voxel centre to the nearest target voxel centre.
    let to_target = if nt > 0 && ne > 0 { Some(edt::edt(&tgt, dims, vox)) } else { None };
    let mut is_area = 0.0;
    let ae = cell_surface(&eff, EFFECTOR, surfaces, dims, vox, |t| {
        let a = marching_cubes::triangle_area(&t);
        if let Some(d) = &to_target {
            let c: [f64; 3] = std::array::from_fn(|k| (t[0][k] + t[1][k] + t[2][k]) / 3.0 / vox[k]);
            if trilinear(d, dims, c) <= opt.is_distance {
                is_area += a;
            }
        }
        a
    });
    let at = cell_surface(&tgt, TARGET, surfaces, dims, vox, marching_cubes::triangle_area_ref);

    let is_mean_ri = match (&to_target, ri) {
        (Some(d), Some(r)) => {
            let (mut s, mut c) = (0.0, 0usize);
            for i in 0..n {
                if eff[i] && d[i] <= opt.is_distance {
                    s += r[i] as f64;
                    c += 1;
                }
            }
            if c > 0 {
                s / c as f64
            } else {
                f64::NAN
            }
        }
        _ => f64::NAN,
    };

    let centroid = |m: &[bool]| -> Option<[f64; 3]> {
        let mut s = [0.0f64; 3];
        let mut c = 0usize;
        for (p, _) in m.iter().enumerate().filter(|(_, &b)| b) {
            let idx = [p / (dims[1] * dims[2]), p / dims[2] % dims[1], p % dims[2]];
            for k in 0..3 {
                s[k] += idx[k] as f64 * vox[k];
            }
            c += 1;
        }
        (c > 0).then(|| s.map(|x| x / c as f64))
    };
    let cd = match (centroid(&eff), centroid(&tgt)) {
        (Some(a), Some(b)) => ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt(),
        _ => f64::NAN,
    };

    FrameMetrics {
        frame,
        effector_volume_um3: ve,
        target_volume_um3: vt,
        effector_area_um2: ae,
        target_area_um2: at,
        effector_sphericity: sphericity(ve, ae),
        target_sphericity: sphericity(vt, at),
        effector_dry_mass_pg: if ne > 0 { dry(&eff) } else { f64::NAN },
        target_dry_mass_pg: if nt > 0 { dry(&tgt) } else { f64::NAN },
        is_area_um2: is_area,
        is_mean_ri,
        centroid_distance_um: cd,
        time_s: opt.time_interval_s.map_or(f64::NAN, |dt| frame as f64 * dt),
    }
}

/// Trilinear interpolation of `f` at fractional voxel index `c` (clamped into the array).
fn trilinear(f: &[f64], dims: [usize; 3], c: [f64; 3]) -> f64 {
    let mut i0 = [0usize; 3];
    let mut w = [0f64; 3];
    for k in 0..3 {
        let x = c[k].clamp(0.0, (dims[k] - 1) as f64);
        i0[k] = (x.floor() as usize).min(dims[k].saturating_sub(2));
        w[k] = if dims[k] > 1 { x - i0[k] as f64 } else { 0.0 };
    }
    let mut s = 0.0;
    for corner in 0..8 {
        let o = [corner & 1, corner >> 1 & 1, corner >> 2 & 1];
        let mut wt = 1.0;
        let mut idx = [0usize; 3];
        for k in 0..3 {
            wt *= if o[k] == 1 { w[k] } else { 1.0 - w[k] };
            idx[k] = (i0[k] + o[k]).min(dims[k] - 1);
        }
        if wt > 0.0 {
            s += wt * f[(idx[0] * dims[1] + idx[1]) * dims[2] + idx[2]];
        }
    }
    s
}

/// Sum over the triangles of the mask's surface of `per_triangle(triangle)` (corners in um, in the
/// frame of the whole volume). Works on the mask's bounding box, padded so the surface closes.
/// The surface is the smoothed one, volume-matched (see [`surface_area`]).
pub fn mask_surface(mask: &[bool], dims: [usize; 3], spacing: [f64; 3], per_triangle: impl FnMut([[f64; 3]; 3]) -> f64) -> f64 {
    surface_area::volume_matched_surface(mask, dims, spacing, per_triangle)
}

/// [`mask_surface`] with the smoothing chosen by the caller (`false`: marching cubes on the raw mask).
pub fn mask_surface_with(mask: &[bool], dims: [usize; 3], spacing: [f64; 3], smooth: bool, per_triangle: impl FnMut([[f64; 3]; 3]) -> f64) -> f64 {
    surface_of(|_| 1.0, mask, dims, spacing, smooth, per_triangle)
}

/// Sum over the triangles of the level-1/2 surface of the field `value(p)` on `region` (0 off
/// it), optionally [1 2 1]/4-smoothed along each axis first, of `per_triangle(triangle)` (corners
/// in um, in the frame of the whole volume). Works on the region's bounding box, padded so the
/// surface closes.
pub fn surface_of(
    value: impl Fn(usize) -> f32,
    region: &[bool],
    dims: [usize; 3],
    spacing: [f64; 3],
    smooth: bool,
    mut per_triangle: impl FnMut([[f64; 3]; 3]) -> f64,
) -> f64 {
    let Some((lo, hi)) = bbox(region, dims) else { return 0.0 };
    let pad = if smooth { 2 } else { 1 };
    let org: [isize; 3] = std::array::from_fn(|k| lo[k] as isize - pad);
    let ld: [usize; 3] = std::array::from_fn(|k| hi[k] - lo[k] + 1 + 2 * pad as usize);
    let mut f = vec![0f32; ld[0] * ld[1] * ld[2]];
    for i in lo[0]..=hi[0] {
        for j in lo[1]..=hi[1] {
            for k in lo[2]..=hi[2] {
                let p = (i * dims[1] + j) * dims[2] + k;
                if region[p] {
                    let (a, b, c) = ((i as isize - org[0]) as usize, (j as isize - org[1]) as usize, (k as isize - org[2]) as usize);
                    f[(a * ld[1] + b) * ld[2] + c] = value(p);
                }
            }
        }
    }
    if smooth {
        for axis in 0..3 {
            smooth_121(&mut f, ld, axis);
        }
    }
    let off: [f64; 3] = std::array::from_fn(|k| org[k] as f64 * spacing[k]);
    let mut total = 0.0;
    marching_cubes::for_each_triangle(&f, ld, spacing, 0.5, |t| {
        let g = t.map(|p| std::array::from_fn(|k| p[k] + off[k]));
        total += per_triangle(g);
    });
    total
}

/// In place [1 2 1]/4 along `axis` (zero outside).
fn smooth_121(f: &mut [f32], d: [usize; 3], axis: usize) {
    let stride = [d[1] * d[2], d[2], 1][axis];
    let n = d[axis];
    let src = f.to_vec();
    for p in 0..f.len() {
        let i = p / stride % n;
        let l = if i > 0 { src[p - stride] } else { 0.0 };
        let r = if i + 1 < n { src[p + stride] } else { 0.0 };
        f[p] = 0.25 * l + 0.5 * src[p] + 0.25 * r;
    }
}

/// Inclusive bounding box of the true voxels, or None for an empty mask.
fn bbox(mask: &[bool], dims: [usize; 3]) -> Option<([usize; 3], [usize; 3])> {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let mut any = false;
    for (p, _) in mask.iter().enumerate().filter(|(_, &b)| b) {
        let idx = [p / (dims[1] * dims[2]), p / dims[2] % dims[1], p % dims[2]];
        for k in 0..3 {
            lo[k] = lo[k].min(idx[k]);
            hi[k] = hi[k].max(idx[k]);
        }
        any = true;
    }
    any.then_some((lo, hi))
}

/// The frames of a label or RI file: a 3D file is one frame; 4D (T x D0 x D1 x D2) and
/// 5D (T x 1 x D0 x D1 x D2) files hold T frames.
pub fn frame_dims(v: &Volume) -> (usize, [usize; 3]) {
    (v.tensor.shape.n, v.tensor.shape.d)
}

/// Reads the labels (and RI) files, checks them, and analyses every frame (in parallel).
pub fn analyze_files(labels_path: &Path, ri_path: Option<&Path>, opt: &Options) -> Result<Vec<FrameMetrics>> {
    analyze_with(labels_path, ri_path, None, opt)
}

/// [`analyze_files`], with the surfaces from the probability maps at `prob_path` when given
/// (see [`probabilities`]).
pub fn analyze_with(labels_path: &Path, ri_path: Option<&Path>, prob_path: Option<&Path>, opt: &Options) -> Result<Vec<FrameMetrics>> {
    opt.validate()?;
    let lv = read_volume(labels_path)?;
    let (t, dims) = frame_dims(&lv);
    let file_dims = volume_file_dims(&lv);
    let labels = labels_from_f32(&lv.tensor.data, &file_dims, labels_path)?;
    let ri = match ri_path {
        Some(p) => {
            let rv = read_volume(p)?; // refuses NaN and infinite values
            if frame_dims(&rv) != (t, dims) {
                return Err(Error::Input(format!(
                    "the RI volume {} has shape {:?} but the labels {} have shape {:?}: they must describe the same voxels",
                    p.display(),
                    volume_file_dims(&rv),
                    labels_path.display(),
                    file_dims
                )));
            }
            Some(rv.tensor.data)
        }
        None => None,
    };
    let n = dims[0] * dims[1] * dims[2];
    let probs = match prob_path {
        Some(p) => Some((probabilities::read(p, t, dims)?, p)),
        None => None,
    };
    (0..t)
        .into_par_iter()
        .map(|f| {
            let l = &labels[f * n..(f + 1) * n];
            // Each class's field, made once per frame: checked against the labels, then surfaced.
            let fields: [Option<Vec<f32>>; 2] = match &probs {
                Some((pr, path)) => {
                    let g = [EFFECTOR, TARGET].map(|c| probabilities::field(pr.frame(f, n), pr.channels, c));
                    for (c, g) in [EFFECTOR, TARGET].into_iter().zip(&g) {
                        if let Some(g) = g {
                            probabilities::check_agrees(l, g, c, f, path)?;
                        }
                    }
                    g
                }
                None => [None, None],
            };
            let surfaces = if probs.is_some() { Surfaces::Fields([fields[0].as_deref(), fields[1].as_deref()]) } else { Surfaces::Labels };
            Ok(analyze_frame_from(f, l, ri.as_ref().map(|r| &r[f * n..(f + 1) * n]), surfaces, dims, opt))
        })
        .collect()
}

/// The dims as the file has them.
fn volume_file_dims(v: &Volume) -> Vec<usize> {
    let s = v.tensor.shape;
    match v.rank {
        3 => s.d.to_vec(),
        4 => vec![s.n, s.d[0], s.d[1], s.d[2]],
        _ => vec![s.n, 1, s.d[0], s.d[1], s.d[2]],
    }
}

/// The metrics as CSV text: a header of [`COLUMNS`] and one row per frame.
pub fn to_csv(rows: &[FrameMetrics]) -> String {
    let mut s = COLUMNS.join(",");
    s.push('\n');
    for r in rows {
        let v = r.values();
        s.push_str(&r.frame.to_string());
        for x in &v[1..] {
            s.push(',');
            s.push_str(&format_value(*x));
        }
        s.push('\n');
    }
    s
}

fn format_value(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else {
        format!("{x:.6}")
    }
}

/// Writes the CSV atomically.
pub fn write_csv(path: &Path, rows: &[FrameMetrics]) -> Result<()> {
    let text = to_csv(rows);
    crate::io::write_atomic(path, |w| std::io::Write::write_all(w, text.as_bytes()))
}

/// A fixed-width table of the metrics for the terminal.
pub fn format_table(rows: &[FrameMetrics]) -> String {
    let heads = ["frame", "V_eff", "V_tgt", "A_eff", "A_tgt", "sph_eff", "sph_tgt", "m_eff", "m_tgt", "IS_area", "IS_RI", "dist", "time_s"];
    let mut s = String::new();
    for h in heads {
        s.push_str(&format!("{h:>9}"));
    }
    s.push('\n');
    for r in rows {
        let v = r.values();
        s.push_str(&format!("{:>9}", r.frame));
        for (i, x) in v[1..].iter().enumerate() {
            let prec = match i + 1 {
                5 | 6 => 3,
                10 => 4,
                _ => 1,
            };
            s.push_str(&format!("{:>9.*}", prec, x));
        }
        s.push('\n');
    }
    s
}

/// Writes a uint8 label volume (C-order `dims`, rank 3 or 4) as `.npy`, or as a multi-page 8-bit
/// `.tif` (pages ordered along the leading axes, each D1 rows x D2 columns), atomically.
pub fn write_labels(path: &Path, dims: &[usize], data: &[u8]) -> Result<()> {
    if dims.iter().product::<usize>() != data.len() || dims.len() < 2 {
        return Err(Error::Shape(format!("labels of shape {dims:?} need {} values, got {}", dims.iter().product::<usize>(), data.len())));
    }
    let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("npy") => crate::io::write_atomic(path, |w| crate::io::write_npy_to(w, dims, data)),
        Some("tif") | Some("tiff") => {
            let (h, wd) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            crate::io::write_atomic(path, |w| crate::io::write_tif_to::<tiff::encoder::colortype::Gray8>(w, h, wd, data))
        }
        _ => Err(Error::format(path, "unsupported file type for labels: expected .npy or .tif")),
    }
}


#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// Label volume(s): 0 background, 1 effector, 2 target; 3D = one frame, 4D (T x D0 x D1 x D2) = T frames.
    /// A folder: every *_labels.npy/.tif in it (one CSV, with a `file` column first)
    #[arg(value_name = "LABELS")]
    pub labels: std::path::PathBuf,
    /// RI volume(s) of the same shape, for dry masses and the synapse's RI
    #[arg(long, value_name = "RI")]
    pub ri: Option<std::path::PathBuf>,
    /// Voxel size in um along D0, D1, D2, e.g. 0.2,0.2,0.4 (default: what the labels or the RI
    /// file record: the sidecar `segment` writes, a TCF's resolution, OME-TIFF/ImageJ tags)
    #[arg(long, value_name = "D0,D1,D2", value_parser = parse_voxel_size, allow_hyphen_values = true)]
    pub voxel_size: Option<[f64; 3]>,
    /// The synapse: the effector's surface within this distance (um) of the target
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub is_distance: f64,
    /// Refractive-index increment (um^3/pg = mL/g) for dry mass
    #[arg(long, default_value_t = 0.19, allow_hyphen_values = true)]
    pub dn_dc: f64,
    /// Surfaces (areas, volumes, sphericity) from a sigmoid head's probability maps, which place
    /// the boundary between voxels, instead of from the labels: the file `segment
    /// --save-probabilities` wrote, or, with no value, NAME_probabilities.* beside each NAME_labels.*
    #[arg(long, value_name = "PROBABILITIES", num_args = 0..=1)]
    pub probabilities: Option<Option<std::path::PathBuf>>,
    /// Seconds between frames, for the time_s column (default: what the labels' sidecar or the
    /// RI file records, e.g. a TCF's TimeInterval)
    #[arg(long, value_name = "S", allow_hyphen_values = true)]
    pub time_interval: Option<f64>,
    /// The CSV to write (one row per frame)
    #[arg(short, long, value_name = "CSV")]
    pub output: std::path::PathBuf,
    /// Also draw the time series as a PNG
    #[arg(long, value_name = "PNG")]
    pub plot: Option<std::path::PathBuf>,
}

/// The voxel size for `labels` (and its RI file): `--voxel-size`, else what the files record.
pub fn voxel_size_for(given: Option<[f64; 3]>, labels: &Path, ri: Option<&Path>) -> Result<crate::voxel::VoxelSize> {
    let mut files = vec![labels];
    files.extend(ri);
    crate::voxel::resolve(given, &files)?.ok_or_else(|| {
        Error::Input(format!(
            "{}: no voxel size: the file records none (no sidecar {}, no TCF/OME-TIFF/ImageJ metadata){}; give --voxel-size D0,D1,D2 in um",
            labels.display(),
            crate::sidecar::path_for(labels).display(),
            if ri.is_some() { ", nor does the RI file" } else { "" }
        ))
    })
}

/// The label files of a folder: its *_labels.npy/.tif/.tiff files, sorted (or, when it has
/// none, every .npy/.tif/.tiff file).
pub fn label_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut all: Vec<std::path::PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && crate::io::extension_is(p, &["npy", "tif", "tiff"]))
        .collect();
    all.sort();
    let labelled: Vec<_> = all.iter().filter(|p| p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| s.ends_with("_labels"))).cloned().collect();
    let v = if labelled.is_empty() { all } else { labelled };
    if v.is_empty() {
        return Err(Error::Input(format!("{}: the folder holds no label volume (.npy, .tif)", dir.display())));
    }
    Ok(v)
}

/// The metrics of many files as one CSV: a `file` column, then [`COLUMNS`].
pub fn to_csv_files(rows: &[(String, FrameMetrics)]) -> String {
    let one = to_csv(&rows.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>());
    let mut lines = one.lines();
    let mut s = format!("file,{}\n", lines.next().unwrap_or_default());
    for ((f, _), line) in rows.iter().zip(lines) {
        let f = if f.contains([',', '"']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.clone() };
        s.push_str(&format!("{f},{line}\n"));
    }
    s
}

fn options_for(a: &AnalyzeArgs, labels: &Path, ri: Option<&Path>) -> Result<Options> {
    let v = voxel_size_for(a.voxel_size, labels, ri)?;
    eprintln!("{}: voxel size {:?} um ({})", labels.display(), v.um, v.from);
    let mut time_interval_s = a.time_interval;
    for f in std::iter::once(labels).chain(ri) {
        if time_interval_s.is_none() {
            time_interval_s = crate::sidecar::time_interval_of(f)?;
        }
    }
    let opt = Options { voxel_size: v.um, is_distance: a.is_distance, dn_dc: a.dn_dc, medium_ri: MEDIUM_RI, time_interval_s };
    opt.validate()?;
    Ok(opt)
}

/// The probability maps for `labels`: None without --probabilities, the file given, or (no
/// value) the one beside the labels.
fn probabilities_for(a: &AnalyzeArgs, labels: &Path) -> Result<Option<std::path::PathBuf>> {
    match &a.probabilities {
        None => Ok(None),
        Some(None) => probabilities::beside(labels).map(Some),
        Some(Some(p)) => Ok(Some(p.clone())),
    }
}

/// Before any work: no output over an input or the other output, and every output's folder exists.
fn check_outputs(a: &AnalyzeArgs) -> Result<()> {
    let mut inputs = vec![("LABELS", a.labels.as_path())];
    inputs.extend(a.ri.as_deref().map(|p| ("--ri", p)));
    inputs.extend(a.probabilities.iter().flatten().map(|p| ("--probabilities", p.as_path())));
    let mut outputs = vec![("-o", a.output.as_path())];
    outputs.extend(a.plot.as_deref().map(|p| ("--plot", p)));
    crate::io::refuse_overwrites(&outputs, &inputs)?;
    for (name, p) in outputs {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
            return Err(Error::format(p, format!("{name}: the folder {} does not exist", dir.display())));
        }
    }
    Ok(())
}

/// `deepis analyze`: the CSV and the table on stdout; returns the rows of a single file (the CLI
/// plots them if asked, so that `plot`, which draws `FrameMetrics`, is not a dependency of
/// `analysis`).
pub fn run_cli(a: &AnalyzeArgs) -> Result<Vec<FrameMetrics>> {
    check_outputs(a)?;
    let t0 = std::time::Instant::now();
    if a.labels.is_dir() {
        if a.ri.is_some() || a.plot.is_some() || matches!(a.probabilities, Some(Some(_))) {
            return Err(Error::Input(format!(
                "{}: --ri, --plot and --probabilities FILE take one label file; analyse a folder without them (--probabilities with no file takes each NAME_probabilities beside NAME_labels), or file by file",
                a.labels.display()
            )));
        }
        let mut rows = Vec::new();
        for f in label_files(&a.labels)? {
            let opt = options_for(a, &f, None)?;
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let probs = probabilities_for(a, &f)?;
            rows.extend(analyze_with(&f, None, probs.as_deref(), &opt)?.into_iter().map(|r| (name.clone(), r)));
        }
        let text = to_csv_files(&rows);
        crate::io::write_atomic(&a.output, |w| std::io::Write::write_all(w, text.as_bytes()))?;
        eprintln!("{} frame(s) of {} analysed in {:.2} s; wrote {}", rows.len(), a.labels.display(), t0.elapsed().as_secs_f64(), a.output.display());
        // a folder is never plotted (refused above)
        return Ok(Vec::new());
    }
    let opt = options_for(a, &a.labels, a.ri.as_deref())?;
    let probs = probabilities_for(a, &a.labels)?;
    if let Some(p) = &probs {
        eprintln!("surfaces from the probability maps {}", p.display());
    }
    let rows = analyze_with(&a.labels, a.ri.as_deref(), probs.as_deref(), &opt)?;
    write_csv(&a.output, &rows)?;
    print!("{}", format_table(&rows));
    eprintln!("{} frame(s) analysed in {:.2} s; wrote {}", rows.len(), t0.elapsed().as_secs_f64(), a.output.display());
    Ok(rows)
}
