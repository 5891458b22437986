//! Batch runs over many inputs, split over the workers of a cluster: which inputs a shard owns,
//! unique output names, and the provenance that lets a re-run skip what is already done.
//!
//! The split is over the sorted, de-duplicated list of every input (or of a `--manifest`), input
//! i going to shard i mod N: every shard computes the same list and the same names, so N shards
//! label every input exactly once without talking to each other. An output is done when it and
//! its sidecar exist and the sidecar's provenance (weights hash, options, deepis version, input
//! name, size and modification time) equals this run's: outputs are written to a temporary file
//! and renamed, the sidecar after them, so a killed run leaves nothing that looks done.
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Parses "I/N" (0 <= I < N).
pub fn parse_shard(s: &str) -> std::result::Result<Shard, String> {
    let (i, n) = s.split_once('/').ok_or_else(|| format!("expected I/N like 0/8, got `{s}`"))?;
    let (i, n) = (i.trim().parse::<usize>(), n.trim().parse::<usize>());
    match (i, n) {
        (Ok(index), Ok(count)) if count > 0 && index < count => Ok(Shard { index, count }),
        _ => Err(format!("expected I/N with 0 <= I < N, like 0/8, got `{s}`")),
    }
}

/// The shard this process runs, and what said so: `--shard` wins; then `JOB_COMPLETION_INDEX`
/// (a Kubernetes Indexed Job) with `--shards N`; then a Slurm array's `SLURM_ARRAY_TASK_ID`
/// (less `SLURM_ARRAY_TASK_MIN`, so `--array=1-8` works) of `SLURM_ARRAY_TASK_COUNT` (or
/// `--shards`); else the whole list.
pub fn shard_from(shard: Option<Shard>, shards: Option<usize>, env: &dyn Fn(&str) -> Option<String>) -> Result<(Shard, String)> {
    if let Some(s) = shard {
        return Ok((s, "--shard".into()));
    }
    let num = |k: &str| -> Result<Option<usize>> {
        match env(k) {
            None => Ok(None),
            Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| Error::Input(format!("{k}={v:?} is not a whole number"))),
        }
    };
    let check = |index: usize, count: usize, from: &str| -> Result<(Shard, String)> {
        if count == 0 || index >= count {
            return Err(Error::Input(format!("{from}: shard {index} of {count} does not exist (0 <= index < count)")));
        }
        Ok((Shard { index, count }, from.to_string()))
    };
    if let (Some(n), Some(i)) = (shards, num("JOB_COMPLETION_INDEX")?) {
        return check(i, n, "JOB_COMPLETION_INDEX and --shards");
    }
    if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let count = match shards {
            Some(n) => n,
            None => num("SLURM_ARRAY_TASK_COUNT")?
                .ok_or_else(|| Error::Input("SLURM_ARRAY_TASK_ID is set but not SLURM_ARRAY_TASK_COUNT: give --shards N".into()))?,
        };
        let index = id.checked_sub(min).ok_or_else(|| Error::Input(format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")))?;
        return check(index, count, "SLURM_ARRAY_TASK_ID");
    }
    if let Some(n) = shards {
        return Err(Error::Input(format!(
            "--shards {n} needs the shard index: JOB_COMPLETION_INDEX (Kubernetes) or SLURM_ARRAY_TASK_ID (Slurm), or give --shard I/{n}"
        )));
    }
    Ok((Shard { index: 0, count: 1 }, "no shard given: every input".into()))
}

/// Inputs of a manifest: one path per line (relative to the manifest's folder unless absolute);
/// blank lines and lines starting with '#' are skipped.
pub fn read_manifest(path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut v = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let p = Path::new(l);
        let p = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        if !p.is_file() {
            return Err(Error::format(path, format!("line {}: {} is not a file", n + 1, p.display())));
        }
        v.push(p);
    }
    if v.is_empty() {
        return Err(Error::format(path, "the manifest lists no input"));
    }
    Ok(v)
}

/// Sorts and de-duplicates the inputs (the order every shard agrees on).
pub fn canonical_order(mut v: Vec<PathBuf>) -> Vec<PathBuf> {
    v.sort();
    v.dedup();
    v
}

/// The inputs of `shard`: positions i with i mod count == index.
pub fn select(all: &[PathBuf], shard: Shard) -> Vec<usize> {
    (0..all.len()).filter(|i| i % shard.count == shard.index).collect()
}

/// One output name stem per input, unique over the whole list: the file stem, or, for stems that
/// two inputs share (two folders each holding `cell.tif`), the path from the inputs' common
/// folder with '/' written `__` (`day1__cell`), and the extension added if still not unique.
pub fn unique_stems(all: &[PathBuf]) -> Vec<String> {
    let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).unwrap_or("volume").to_string();
    let mut count: HashMap<String, usize> = HashMap::new();
    for p in all {
        *count.entry(stem(p)).or_default() += 1;
    }
    let clash: Vec<&PathBuf> = all.iter().filter(|p| count[&stem(p)] > 1).collect();
    let root = common_dir(&clash);
    let rel = |p: &Path| -> String {
        let r = p.strip_prefix(&root).unwrap_or(p).with_extension("");
        r.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).filter(|c| c != "/" && c != ".").collect::<Vec<_>>().join("__")
    };
    let mut names: Vec<String> = all.iter().map(|p| if count[&stem(p)] > 1 { rel(p) } else { stem(p) }).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for n in &names {
        *seen.entry(n.clone()).or_default() += 1;
    }
    for (n, p) in names.iter_mut().zip(all) {
        if seen[n.as_str()] > 1 {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            *n = format!("{n}_{ext}");
        }
    }
    names
}

fn common_dir(paths: &[&PathBuf]) -> PathBuf {
    let Some(first) = paths.first() else { return PathBuf::new() };
    let mut root: PathBuf = first.parent().map(Path::to_path_buf).unwrap_or_default();
    while !paths.iter().all(|p| p.starts_with(&root)) {
        if !root.pop() {
            return PathBuf::new();
        }
    }
    root
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The provenance of one output: what must be equal for a re-run to keep it.
pub fn provenance(weights_sha256: &str, options: &Value, input: &Path) -> Result<Value> {
    let m = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
    let mtime_ns = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as u64);
    Ok(json!({
        "deepis_version": env!("CARGO_PKG_VERSION"),
        "weights_sha256": weights_sha256,
        "options": options,
        "input": {
            "name": input.file_name().map(|n| n.to_string_lossy().into_owned()),
            "bytes": m.len(),
            "mtime_ns": mtime_ns,
        },
    }))
}

/// Whether every file of `outputs` exists and the first one's sidecar records `prov`.
pub fn is_done(outputs: &[PathBuf], prov: &Value) -> bool {
    outputs.iter().all(|p| p.is_file())
        && outputs.first().is_some_and(|p| matches!(crate::sidecar::read(p), Ok(Some(s)) if s.provenance.as_ref() == Some(prov)))
}

/// `OUT/failed-<shard>.txt`: one failed input per line, a tab, and the error.
pub fn failed_list_path(out_dir: &Path, shard: Shard) -> PathBuf {
    out_dir.join(format!("failed-{}.txt", shard.index))
}

pub fn write_failed_list(path: &Path, failed: &[(PathBuf, String)]) -> Result<()> {
    let text: String = failed.iter().map(|(p, e)| format!("{}\t{}\n", p.display(), e.replace(['\n', '\t'], " "))).collect();
    crate::io::write_atomic(path, |w| std::io::Write::write_all(w, text.as_bytes()))
}
