//! Compiled cubins kept on disk, so a second start compiles nothing.
//!
//! An entry is keyed by everything NVRTC's output depends on: the source file's name and text, the
//! text of every header handed to NVRTC (the kernels include nothing else: no include path is
//! given), the options, NVRTC's version and library build, and the architecture. It stores the
//! cubin and NVRTC's log (so `deepis kernels` reports ptxas's figures from a cache hit too).
//!
//! Entries are written to a temporary file in the cache folder and renamed into place, so two
//! processes racing on the same entry each leave a complete file. Every read is checked (magic,
//! format, key, exact length, SHA-256 of the content, an ELF cubin): a truncated or corrupt
//! entry is reported, recompiled and overwritten, never loaded. The cache is an optimisation:
//! a folder that cannot be read or written costs a recompile and a warning, never a failure.
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bumped when the entry layout or the key's contents change.
const FORMAT: u32 = 1;
const MAGIC: &[u8; 12] = b"DEEPISCUBIN\0";
/// magic, format, key, log length, cubin length, digest.
const HEADER_LEN: usize = 12 + 4 + 32 + 8 + 8 + 32;

/// Environment variable naming the cache folder (cubins go to its `cubin/` subfolder).
pub const DIR_ENV: &str = "DEEPIS_CACHE_DIR";
/// Environment variable that turns the cache off when set to `off`.
pub const SWITCH_ENV: &str = "DEEPIS_KERNEL_CACHE";

/// Everything an NVRTC compile depends on; `digest()` is the cache key.
pub struct KeyParts<'a> {
    pub file: &'a str,
    pub source: &'a str,
    /// (include name, text) of every header given to NVRTC.
    pub headers: &'a [(&'a str, &'a str)],
    pub options: &'a [String],
    /// NVRTC's version and library build (`nvrtc::build_id`).
    pub compiler: &'a str,
    pub arch: &'a str,
}

impl KeyParts<'_> {
    /// SHA-256 over every part, each length-prefixed so no two inputs hash the same bytes.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut put = |s: &[u8]| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s);
        };
        put(b"deepis cubin key");
        put(&FORMAT.to_le_bytes());
        put(self.file.as_bytes());
        put(self.source.as_bytes());
        put(&(self.headers.len() as u64).to_le_bytes());
        for (name, text) in self.headers {
            put(name.as_bytes());
            put(text.as_bytes());
        }
        put(&(self.options.len() as u64).to_le_bytes());
        for o in self.options {
            put(o.as_bytes());
        }
        put(self.compiler.as_bytes());
        put(self.arch.as_bytes());
        h.finalize().into()
    }
}

/// A cached compile: NVRTC's log and the cubin.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub log: String,
    pub cubin: Vec<u8>,
}

/// What looking an entry up found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Entry),
    Miss,
    /// The file exists but cannot be used (why); it will be recompiled and overwritten.
    Bad(String),
}

/// The on-disk cubin cache (or none: every compile then goes to NVRTC).
#[derive(Clone, Debug)]
pub struct CubinCache {
    dir: Option<PathBuf>,
}

impl CubinCache {
    /// Cubins in `dir` itself.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        CubinCache { dir: Some(dir.into()) }
    }

    /// No cache: always compile.
    pub fn disabled() -> Self {
        CubinCache { dir: None }
    }

    /// The user's cache: `$DEEPIS_CACHE_DIR/cubin`, else `$XDG_CACHE_HOME/deepis/cubin`, else
    /// `~/.cache/deepis/cubin`; off when `DEEPIS_KERNEL_CACHE=off` or no folder can be named.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if std::env::var(SWITCH_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("off")) {
            return Self::disabled();
        }
        let root = var(DIR_ENV)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("deepis")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("deepis")));
        CubinCache { dir: root.map(|r| r.join("cubin")) }
    }

    /// The folder holding the entries, if the cache is on.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The file of the entry for `file` (a kernel source name) on `arch` with `key`.
    pub fn entry_path(&self, file: &str, arch: &str, key: &[u8; 32]) -> Option<PathBuf> {
        let stem: String = file
            .trim_end_matches(".cu")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
            .collect();
        let arch: String = arch.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        Some(self.dir.as_ref()?.join(format!("{stem}.{arch}.{}.cubin", hex(key))))
    }

    /// Looks the entry up and checks it whole before handing it out.
    pub fn load(&self, file: &str, arch: &str, key: &[u8; 32]) -> Lookup {
        let Some(path) = self.entry_path(file, arch, key) else { return Lookup::Miss };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Bad(format!("{}: {e}", path.display())),
        };
        match decode(&bytes, key) {
            Ok(entry) => Lookup::Hit(entry),
            Err(why) => Lookup::Bad(format!("{}: {why}", path.display())),
        }
    }

    /// Writes the entry atomically (temporary file in the same folder, then rename).
    pub fn store(&self, file: &str, arch: &str, key: &[u8; 32], entry: &Entry) -> std::result::Result<(), String> {
        let Some(path) = self.entry_path(file, arch, key) else { return Ok(()) };
        let dir = path.parent().expect("entry paths are inside the cache folder");
        let fail = |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| fail("create", e))?;
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").suffix(".cubin").tempfile_in(dir).map_err(|e| fail("write to", e))?;
        tmp.write_all(&encode(key, entry)).and_then(|_| tmp.flush()).map_err(|e| fail("write to", e))?;
        tmp.persist(&path).map_err(|e| fail("rename into", e.error))?;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn content_digest(key: &[u8; 32], log: &[u8], cubin: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key);
    h.update((log.len() as u64).to_le_bytes());
    h.update(log);
    h.update(cubin);
    h.finalize().into()
}

fn encode(key: &[u8; 32], e: &Entry) -> Vec<u8> {
    let log = e.log.as_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + log.len() + e.cubin.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(log.len() as u64).to_le_bytes());
    out.extend_from_slice(&(e.cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(&content_digest(key, log, &e.cubin));
    out.extend_from_slice(log);
    out.extend_from_slice(&e.cubin);
    out
}

fn decode(b: &[u8], key: &[u8; 32]) -> std::result::Result<Entry, String> {
    if b.len() < HEADER_LEN {
        return Err(format!("truncated: {} bytes, shorter than the {HEADER_LEN}-byte header", b.len()));
    }
    if &b[..12] != MAGIC {
        return Err("not a deepis cubin cache entry (bad magic)".into());
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let format = u32::from_le_bytes(b[12..16].try_into().unwrap());
    if format != FORMAT {
        return Err(format!("entry format {format}, this deepis writes {FORMAT}"));
    }
    if &b[16..48] != key {
        return Err("entry holds a different key than its name".into());
    }
    let (log_len, cubin_len) = (u64_at(48), u64_at(56));
    let want = (HEADER_LEN as u64).checked_add(log_len).and_then(|n| n.checked_add(cubin_len));
    if want != Some(b.len() as u64) {
        return Err(format!(
            "length {} bytes, header says {HEADER_LEN} + {log_len} (log) + {cubin_len} (cubin): truncated or corrupt",
            b.len()
        ));
    }
    let (log, cubin) = b[HEADER_LEN..].split_at(log_len as usize);
    if b[64..96] != content_digest(key, log, cubin) {
        return Err("SHA-256 of the content does not match: corrupt".into());
    }
    if !cubin.starts_with(b"\x7fELF") {
        return Err("the cubin is not an ELF image".into());
    }
    let log = String::from_utf8(log.to_vec()).map_err(|_| "the log is not UTF-8".to_string())?;
    Ok(Entry { log, cubin: cubin.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(src: &'a str, opts: &'a [String], arch: &'a str) -> KeyParts<'a> {
        KeyParts { file: "k.cu", source: src, headers: &[("h.h", "int x;")], options: opts, compiler: "12.9", arch }
    }

    #[test]
    fn every_part_changes_the_key() {
        let opts = vec!["-a".to_string()];
        let base = parts("src", &opts, "sm_90").digest();
        assert_eq!(base, parts("src", &opts, "sm_90").digest(), "deterministic");
        let other_opts = vec!["-b".to_string()];
        let split_opts = vec!["-".to_string(), "a".to_string()];
        let variants = [
            parts("src ", &opts, "sm_90").digest(),
            parts("src", &other_opts, "sm_90").digest(),
            parts("src", &split_opts, "sm_90").digest(),
            parts("src", &opts, "sm_80").digest(),
            KeyParts { compiler: "12.8", ..parts("src", &opts, "sm_90") }.digest(),
            KeyParts { file: "j.cu", ..parts("src", &opts, "sm_90") }.digest(),
            KeyParts { headers: &[("h.h", "int y;")], ..parts("src", &opts, "sm_90") }.digest(),
            KeyParts { headers: &[], ..parts("src", &opts, "sm_90") }.digest(),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i} gives the base key");
        }
    }

    #[test]
    fn entries_round_trip_and_damage_is_caught() {
        let key = [7u8; 32];
        let e = Entry { log: "ptxas info".into(), cubin: b"\x7fELF and the rest".to_vec() };
        let bytes = encode(&key, &e);
        assert_eq!(decode(&bytes, &key).unwrap(), e);
        assert!(decode(&bytes, &[8u8; 32]).unwrap_err().contains("different key"));
        for cut in [0, 10, HEADER_LEN, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], &key).is_err(), "truncated to {cut} bytes was accepted");
        }
        for i in [0, 13, 50, 70, HEADER_LEN + 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(decode(&bad, &key).is_err(), "byte {i} flipped was accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, &key).is_err(), "a trailing byte was accepted");
    }
}
