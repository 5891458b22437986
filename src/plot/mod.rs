//! PNG figures: the analysis time series in panels, and mid-slices of a volume with its masks.
//!
//! Drawn with plotters' bitmap backend; text uses an embedded subset of DejaVu Sans (ASCII,
//! 10 kB; see DejaVu-LICENSE.txt beside this file), so no system font library is needed.
use crate::analysis::FrameMetrics;
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("DejaVuSans-ascii.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is embedded and known to parse; a failure would only lose the text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn perr(e: impl std::fmt::Display) -> Error {
    Error::Other(format!("plot: {e}"))
}

/// Renders into a temporary .png beside `path`, then renames it over `path`.
fn write_png(path: &Path, size: (u32, u32), draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>) -> Result<()> {
    register_font();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new().prefix(".plot.").suffix(".png").tempfile_in(dir).map_err(|e| Error::io(path, e))?;
    {
        let root = BitMapBackend::new(tmp.path(), size).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        draw(root.clone())?;
        root.present().map_err(perr)?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// One panel: a title and (label, colour, values per frame) series.
struct Panel<'a> {
    title: &'a str,
    series: Vec<(&'a str, RGBColor, Vec<f64>)>,
}

/// The metrics over time, one panel per quantity (PNG, 1200 x 1300 pixels).
pub fn plot_metrics(path: &Path, rows: &[FrameMetrics]) -> Result<()> {
    let eff = RGBColor(214, 39, 40);
    let tgt = RGBColor(31, 119, 180);
    let syn = RGBColor(44, 160, 44);
    let col = |f: fn(&FrameMetrics) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let panels = [
        Panel { title: "volume (um^3)", series: vec![("effector", eff, col(|r| r.effector_volume_um3)), ("target", tgt, col(|r| r.target_volume_um3))] },
        Panel { title: "surface area (um^2)", series: vec![("effector", eff, col(|r| r.effector_area_um2)), ("target", tgt, col(|r| r.target_area_um2))] },
        Panel { title: "sphericity", series: vec![("effector", eff, col(|r| r.effector_sphericity)), ("target", tgt, col(|r| r.target_sphericity))] },
        Panel { title: "dry mass (pg)", series: vec![("effector", eff, col(|r| r.effector_dry_mass_pg)), ("target", tgt, col(|r| r.target_dry_mass_pg))] },
        Panel { title: "synapse area (um^2)", series: vec![("IS area", syn, col(|r| r.is_area_um2))] },
        Panel { title: "synapse mean RI", series: vec![("IS mean RI", syn, col(|r| r.is_mean_ri))] },
        Panel { title: "centroid distance (um)", series: vec![("effector-target", BLACK, col(|r| r.centroid_distance_um))] },
    ];
    let frames: Vec<f64> = rows.iter().map(|r| r.frame as f64).collect();
    write_png(path, (1200, 1300), |root| {
        let areas = root.split_evenly((4, 2));
        for (area, p) in areas.iter().zip(&panels) {
            draw_panel(area, p, &frames)?;
        }
        Ok(())
    })
}

fn draw_panel(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, p: &Panel, frames: &[f64]) -> Result<()> {
    let finite: Vec<f64> = p.series.iter().flat_map(|s| s.2.iter().copied()).filter(|v| v.is_finite()).collect();
    let (x0, x1) = match (frames.first(), frames.last()) {
        (Some(&a), Some(&b)) if b > a => (a - 0.3, b + 0.3),
        (Some(&a), _) => (a - 1.0, a + 1.0),
        _ => (0.0, 1.0),
    };
    let (mut y0, mut y1) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = if y1 > y0 { 0.08 * (y1 - y0) } else { (0.01 * y0.abs()).max(1e-3) };
    let mut chart = ChartBuilder::on(area)
        .caption(p.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("frame")
        .x_labels(frames.len().clamp(2, 12))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_labels(6)
        .draw()
        .map_err(perr)?;
    if finite.is_empty() {
        chart
            .draw_series(std::iter::once(Text::new("no data", ((x0 + x1) / 2.0, 0.5), ("sans-serif", 18))))
            .map_err(perr)?;
        return Ok(());
    }
    for (label, colour, values) in &p.series {
        let pts: Vec<(f64, f64)> = frames.iter().zip(values).filter(|(_, v)| v.is_finite()).map(|(&f, &v)| (f, v)).collect();
        let c = *colour;
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(perr)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&q| Circle::new(q, 4, c.filled()))).map_err(perr)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(perr)?;
    Ok(())
}

/// One slice panel: columns, voxel index of (row, column) if inside, pixel width, left edge.
type Slice<'a> = (usize, Box<dyn Fn(usize, usize) -> Option<usize> + 'a>, usize, usize);

/// Mid-slices (D0-D1 at the middle of D2, D0-D2 at the middle of D1) of a volume in grey (its
/// 0.5 and 99.5 percentiles mapped to black and white) with the label outlines drawn (effector
/// red, target blue) and the cells lightly tinted; `scale` pixels per smallest voxel side, each
/// axis drawn to its voxel size; `title` above.
pub fn plot_slices(path: &Path, ri: &[f32], labels: &[u8], dims: [usize; 3], voxel: [f64; 3], title: &str, scale: u32) -> Result<()> {
    let n = dims[0] * dims[1] * dims[2];
    if ri.len() != n || labels.len() != n {
        return Err(Error::Shape(format!("plot_slices: {} RI values and {} labels for {:?}", ri.len(), labels.len(), dims)));
    }
    crate::analysis::check_voxel_size(voxel)?;
    let (lo, hi) = {
        let mut v: Vec<f32> = ri.to_vec();
        v.sort_by(f32::total_cmp);
        (v[n / 200], v[n - 1 - n / 200])
    };
    let vmin = voxel.iter().cloned().fold(f64::INFINITY, f64::min);
    let px: [usize; 3] = std::array::from_fn(|k| ((scale.max(1) as f64 * voxel[k] / vmin).round() as usize).max(1));
    let head = 40usize;
    let w = dims[1] * px[1] + dims[2] * px[2] + 30;
    let h = dims[0] * px[0] + head + 10;
    let idx = |i: usize, j: usize, k: usize| (i * dims[1] + j) * dims[2] + k;
    let mid = (dims[2] / 2, dims[1] / 2);
    write_png(path, (w as u32, h as u32), |root| {
        root.draw(&Text::new(title.to_string(), (10, 10), ("sans-serif", 20))).map_err(perr)?;
        let colour = |p: usize, edge: bool| -> RGBColor {
            let g = ((ri[p] - lo) / (hi - lo).max(1e-12)).clamp(0.0, 1.0) * 255.0;
            let tint = |c: [f32; 3], a: f32| RGBColor(((1.0 - a) * g + a * c[0]) as u8, ((1.0 - a) * g + a * c[1]) as u8, ((1.0 - a) * g + a * c[2]) as u8);
            match (labels[p], edge) {
                (1, true) => RGBColor(255, 40, 40),
                (2, true) => RGBColor(60, 140, 255),
                (1, false) => tint([255.0, 0.0, 0.0], 0.15),
                (2, false) => tint([0.0, 90.0, 255.0], 0.15),
                _ => tint([0.0; 3], 0.0),
            }
        };
        let panels: [Slice<'_>; 2] = [
            (dims[1], Box::new(move |r: usize, c: usize| (r < dims[0] && c < dims[1]).then(|| idx(r, c, mid.0))), px[1], 10),
            (dims[2], Box::new(move |r: usize, c: usize| (r < dims[0] && c < dims[2]).then(|| idx(r, mid.1, c))), px[2], 20 + dims[1] * px[1]),
        ];
        for (cols, at, pw, left) in panels.iter() {
            for r in 0..dims[0] {
                for c in 0..*cols {
                    let p = at(r, c).expect("inside");
                    let l = labels[p];
                    let nb = [(r.wrapping_sub(1), c), (r + 1, c), (r, c.wrapping_sub(1)), (r, c + 1)];
                    let edge = l != 0 && nb.iter().any(|&(a, b)| at(a, b).is_none_or(|q| labels[q] != l));
                    let col = colour(p, edge);
                    for dy in 0..px[0] {
                        for dx in 0..*pw {
                            root.draw_pixel(((left + c * pw + dx) as i32, (head + r * px[0] + dy) as i32), &col).map_err(perr)?;
                        }
                    }
                }
            }
        }
        Ok(())
    })
}
