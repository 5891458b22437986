//! Cell surfaces from the network's continuous output: the probability maps of a sigmoid head,
//! which `deepis segment --save-probabilities` writes beside the labels (`NAME_probabilities.npy`
//! or `.tif`: C x D0 x D1 x D2, or T x C x D0 x D1 x D2).
//!
//! `segment` labels effector where p0 > 1/2, else target where p1 > 1/2. The same regions are the
//! level-1/2 sets of p0 (effector) and of min(p1, 1 - p0) (target). Surfaces are drawn on those
//! fields as on the labels (smoothed [1 2 1]/4, then volume-matched to the labelled voxels, see
//! `surface_area::field_surface`): where a map ramps across the boundary the surface passes where
//! it crosses 1/2, between voxels; where the network is sure (0 and 1 on either side) the map
//! holds no sub-voxel position and the surface is the labels' own. Each surface is taken near its
//! labelled cell only (the cell dilated by one voxel), so the small components `segment` removed
//! stay out; the labels and the maps must agree (they do when both come from one `segment` run).
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The maps of every frame: `data` is T x C x D0 x D1 x D2 in C order.
pub struct Probabilities {
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Probabilities {
    /// The C maps of frame `t` (C x D0 x D1 x D2), `n` voxels each.
    pub fn frame(&self, t: usize, n: usize) -> &[f32] {
        &self.data[t * self.channels * n..(t + 1) * self.channels * n]
    }
}

/// Where `segment` wrote the maps of `labels` (`NAME_labels.EXT` -> `NAME_probabilities.EXT`),
/// which must exist.
pub fn beside(labels: &Path) -> Result<PathBuf> {
    let name = labels.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    match name.rsplit_once('.').and_then(|(stem, ext)| stem.strip_suffix("_labels").map(|s| (s, ext))) {
        Some((stem, ext)) => {
            let p = labels.with_file_name(format!("{stem}_probabilities.{ext}"));
            if !p.is_file() {
                return Err(Error::format(&p, format!("no such file: the probability maps of {} (`segment --save-probabilities` writes them beside the labels)", labels.display())));
            }
            Ok(p)
        }
        None => Err(Error::Input(format!(
            "{}: not a NAME_labels file, so its probability maps cannot be found beside it; give --probabilities FILE",
            labels.display()
        ))),
    }
}

/// Reads the maps of `frames` frames of `dims` voxels from `path`, checking the shape against the
/// labels and every value to lie in [0, 1].
pub fn read(path: &Path, frames: usize, dims: [usize; 3]) -> Result<Probabilities> {
    let n = dims.iter().product::<usize>();
    let expect = format!("C x {} x {} x {} (one frame) or {frames} x C x {} x {} x {}", dims[0], dims[1], dims[2], dims[0], dims[1], dims[2]);
    let shape_ok = |d: &[usize]| match *d {
        // C x D0 x D1 x D2 of one frame, or T x D0 x D1 x D2 of one channel (an OME-TIFF's axes)
        [k, a, b, c] => (frames == 1 || k == frames) && [a, b, c] == dims,
        [t, _, a, b, c] => t == frames && [a, b, c] == dims,
        // a TIFF stack without OME-XML axes: frames x channels x D0 pages
        [pages, h, w] => [h, w] == [dims[1], dims[2]] && pages % (frames * dims[0]) == 0 && pages > 0,
        _ => false,
    };
    let wrong = |d: &[usize]| Error::format(path, format!("the probability maps have shape {d:?}, the labels need {expect}"));
    let (d, data) = crate::io::read_array(path, |d| if shape_ok(d) { Ok(()) } else { Err(wrong(d)) })?;
    if !shape_ok(&d) {
        return Err(wrong(&d));
    }
    let channels = data.len() / (frames * n);
    if let Some(i) = data.iter().position(|x| !(0.0..=1.0).contains(x)) {
        return Err(Error::format(
            path,
            format!(
                "value {} at flat index {i}: probability maps hold values in [0, 1] (a distance head's map places no surface between voxels; analyse its labels without --probabilities)",
                data[i]
            ),
        ));
    }
    Ok(Probabilities { channels, data })
}

/// The field whose level-1/2 set is `class` (1 effector, 2 target) in one frame's maps, or None
/// when the maps have no channel for it.
pub fn field(maps: &[f32], channels: usize, class: u8) -> Option<Vec<f32>> {
    let n = maps.len() / channels;
    let p0 = &maps[..n];
    match class {
        super::EFFECTOR => Some(p0.to_vec()),
        super::TARGET if channels >= 2 => Some(maps[n..2 * n].iter().zip(p0).map(|(&p1, &p0)| p1.min(1.0 - p0)).collect()),
        _ => None,
    }
}

/// Refuses maps that disagree with the labels: more than 1% of the voxels labelled `class`
/// where the field says outside (<= 1/2), as when the two files come from different runs.
pub fn check_agrees(labels: &[u8], g: &[f32], class: u8, frame: usize, path: &Path) -> Result<()> {
    let labelled = labels.iter().filter(|&&l| l == class).count();
    let outside = labels.iter().zip(g).filter(|(&l, &v)| l == class && v <= 0.5).count();
    if outside * 100 > labelled {
        let name = if class == super::EFFECTOR { "effector" } else { "target" };
        return Err(Error::format(
            path,
            format!("frame {frame}: {outside} of the {labelled} {name} voxels of the labels lie outside the maps' {name} (<= 1/2): the maps and the labels come from different runs"),
        ));
    }
    Ok(())
}
