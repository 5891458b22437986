//! The JSON sidecar written next to every output (`<file name>.json`, e.g.
//! `cell_labels.npy.json`): the array's shape and axes, the voxel size in um, and, for `segment`,
//! the provenance that decides whether a re-run may skip the file.
//!
//! A `.npy` has no place for the voxel size, so the sidecar carries it; OME-TIFF outputs carry it
//! in their own header as well. Written atomically, after the file it describes: a sidecar never
//! describes a file that is not complete.
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Where the sidecar of `file` lives.
pub fn path_for(file: &Path) -> PathBuf {
    let mut name = file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".json");
    file.with_file_name(name)
}

/// What a sidecar says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sidecar {
    pub shape: Vec<usize>,
    /// Axis names, e.g. ["D0", "D1", "D2"] or ["T", "D0", "D1", "D2"].
    pub axes: Vec<String>,
    /// um per voxel along D0, D1, D2.
    pub voxel_size_um: Option<[f64; 3]>,
    /// Where the voxel size came from (a file and its field), for the record.
    pub voxel_size_from: Option<String>,
    /// Seconds between the frames of a time-lapse (a TCF's `TimeInterval`), when known.
    pub time_interval_s: Option<f64>,
    /// `segment`'s provenance (weights hash, options, version, input size and time).
    pub provenance: Option<Value>,
}

impl Sidecar {
    pub fn to_json(&self) -> Value {
        json!({
            "deepis_version": env!("CARGO_PKG_VERSION"),
            "shape": self.shape,
            "axes": self.axes,
            "voxel_size_um": self.voxel_size_um,
            "voxel_size_from": self.voxel_size_from,
            "time_interval_s": self.time_interval_s,
            "provenance": self.provenance,
        })
    }
}

/// Writes the sidecar of `file` atomically.
pub fn write(file: &Path, s: &Sidecar) -> Result<()> {
    let text = serde_json::to_string_pretty(&s.to_json()).map_err(|e| Error::Other(e.to_string()))? + "\n";
    crate::io::write_atomic(&path_for(file), |w| std::io::Write::write_all(w, text.as_bytes()))
}

/// Reads the sidecar of `file`, if there is one; a sidecar that is not valid is an error naming it.
pub fn read(file: &Path) -> Result<Option<Sidecar>> {
    let p = path_for(file);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&p, e)),
    };
    let bad = |m: String| Error::format(&p, m);
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON sidecar: {e}")))?;
    let shape = v["shape"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect()).unwrap_or_default();
    let axes = v["axes"].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default();
    let voxel_size_um = match &v["voxel_size_um"] {
        Value::Null => None,
        Value::Array(a) if a.len() == 3 && a.iter().all(|x| x.as_f64().is_some_and(|x| x.is_finite() && x > 0.0)) => {
            Some(std::array::from_fn(|k| a[k].as_f64().unwrap_or(f64::NAN)))
        }
        other => return Err(bad(format!("voxel_size_um is {other}: expected three positive numbers of um (D0, D1, D2) or null"))),
    };
    let voxel_size_from = v["voxel_size_from"].as_str().map(String::from);
    let time_interval_s = match &v["time_interval_s"] {
        Value::Null => None,
        t => Some(t.as_f64().filter(|t| t.is_finite() && *t > 0.0).ok_or_else(|| bad(format!("time_interval_s is {t}: expected a positive number of seconds or null")))?),
    };
    let provenance = Some(v["provenance"].clone()).filter(|p| !p.is_null());
    Ok(Some(Sidecar { shape, axes, voxel_size_um, voxel_size_from, time_interval_s, provenance }))
}

/// Seconds between the frames of `path`: its sidecar's `time_interval_s`, else a TCF's
/// `TimeInterval` or an OME-TIFF's `TimeIncrement`; None when none records one.
pub fn time_interval_of(path: &Path) -> Result<Option<f64>> {
    if let Some(t) = read(path)?.and_then(|s| s.time_interval_s) {
        return Ok(Some(t));
    }
    if crate::io::extension_is(path, &["tcf"]) {
        Ok(crate::tcf::read_info(path)?.time_interval_s)
    } else if crate::io::extension_is(path, &["tif", "tiff"]) {
        Ok(crate::ome_xml::time_increment_s(&crate::voxel::tiff_description(path)?.1))
    } else {
        Ok(None)
    }
}

/// Axis names of an array of `rank` dims whose last three are D0, D1, D2.
pub fn axes_for(rank: usize, leading: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = leading.iter().rev().take(rank.saturating_sub(3)).rev().map(|s| s.to_string()).collect();
    v.extend(["D0", "D1", "D2"].map(String::from));
    v
}
