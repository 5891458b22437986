//! OME-TIFF stacks with their physical voxel size, for napari (tifffile) and Fiji (Bio-Formats).
//!
//! Pages are ordered as deepis's other `.tif` files: D0 pages of D1 rows x D2 columns, after any
//! leading axes (frames, channels). In OME terms the page is X = D2 (columns), Y = D1 (rows), and
//! the pages are Z = D0, then C, then T (DimensionOrder XYZCT), so PhysicalSizeX/Y/Z are the voxel
//! sizes along D2, D1, D0. For a TCF input (D0, D1, D2 = X, Y, Z of the microscope) a viewer
//! therefore shows the microscope's Z as columns: the axes are permuted, the scale is right.
//! XResolution/YResolution (pixels per cm) carry the in-page scale for readers that skip the XML.
use crate::error::{Error, Result};
use std::path::Path;

/// Pixel types the stacks hold.
pub enum Pixels<'a> {
    U8(&'a [u8]),
    F32(&'a [f32]),
}

impl Pixels<'_> {
    fn len(&self) -> usize {
        match self {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        }
    }
    fn ome_type(&self) -> &'static str {
        match self {
            Pixels::U8(_) => "uint8",
            Pixels::F32(_) => "float",
        }
    }
}

/// Writes `data` (C order of `dims` = [T, C, D0, D1, D2] with missing leading axes of size 1) as
/// an OME-TIFF stack, atomically.
/// `time_interval_s` goes into the XML as TimeIncrement.
pub fn write(path: &Path, dims: [usize; 5], data: Pixels<'_>, voxel: Option<[f64; 3]>, time_interval_s: Option<f64>) -> Result<()> {
    let [_, _, _, h, w] = dims;
    if dims.iter().product::<usize>() != data.len() || h == 0 || w == 0 {
        return Err(Error::Shape(format!("an OME-TIFF of shape {dims:?} needs {} values, got {}", dims.iter().product::<usize>(), data.len())));
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("deepis");
    let xml = crate::ome_xml::ome_xml(data.ome_type(), dims, voxel, time_interval_s, name);
    crate::io::write_atomic(path, |out| {
        use tiff::encoder::{colortype, Rational, TiffEncoder};
        use tiff::tags::{ResolutionUnit, Tag};
        let terr = |e: tiff::TiffError| match e {
            tiff::TiffError::IoError(e) => e,
            e => std::io::Error::other(format!("cannot write TIFF: {e}")),
        };
        let mut enc = TiffEncoder::new(out).map_err(terr)?;
        let page = h * w;
        let pages = data.len() / page;
        // Pixels per cm, as a rational with a fixed denominator.
        let per_cm = |um: f64| Rational { n: (1e4 / um * 1000.0).round().clamp(1.0, u32::MAX as f64) as u32, d: 1000 };
        macro_rules! pages {
            ($ct:ty, $v:expr) => {
                for p in 0..pages {
                    let mut img = enc.new_image::<$ct>(w as u32, h as u32).map_err(terr)?;
                    if p == 0 {
                        img.encoder().write_tag(Tag::ImageDescription, xml.as_str()).map_err(terr)?;
                    }
                    if let Some(v) = voxel {
                        img.resolution_unit(ResolutionUnit::Centimeter);
                        img.x_resolution(per_cm(v[2]));
                        img.y_resolution(per_cm(v[1]));
                    }
                    img.write_data(&$v[p * page..(p + 1) * page]).map_err(terr)?;
                }
            };
        }
        match data {
            Pixels::U8(v) => pages!(colortype::Gray8, v),
            Pixels::F32(v) => pages!(colortype::Gray32Float, v),
        }
        Ok(())
    })
}
