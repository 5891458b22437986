//! NVRTC: compiles the kernels of `kernels/` to cubin at run time, and reports what ptxas says
//! about each kernel (registers, spills, shared memory). Works with no GPU and no driver: only
//! libnvrtc is needed. cudarc dlopens bare library names, so the library is first opened here by
//! absolute path (kept open for the life of the process); cudarc's own `dlopen("libnvrtc.so.12")`
//! then finds the already loaded object by its soname.
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use crate::error::{Error, Result};
use crate::gpu::kernels;

pub mod cache;
use cache::{CubinCache, Entry, KeyParts, Lookup};

/// What ptxas reported for one kernel compiled for one architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelReport {
    pub kernel: String,
    pub file: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory in bytes.
    pub smem_bytes: u32,
    /// Named barriers (`bar.sync` ids) the kernel uses.
    pub barriers: u32,
}

/// A compiled kernel family: the cubin and NVRTC's full log.
pub struct Compiled {
    pub file: String,
    pub arch: String,
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Where libnvrtc was found, and the handle that keeps it loaded.
struct Loaded {
    path: String,
    /// Size in bytes of the library file actually loaded (0 if unknown): tells patch builds of
    /// the same NVRTC version apart in the cache key.
    file_len: u64,
    _lib: libloading::Library,
}

static NVRTC: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();

/// Candidate locations of libnvrtc: env DEEPIS_NVRTC alone when set (an explicit choice that
/// fails loudly), else the PyPI wheel nvidia-cuda-nvrtc-cu12 of python3, then the system loader.
fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("DEEPIS_NVRTC") {
        if !p.is_empty() {
            return vec![p];
        }
    }
    let wheel = std::process::Command::new("python3")
        .args(["-c", "import nvidia.cuda_nvrtc as m; print(m.__path__[0])"])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(o) = wheel {
        if o.status.success() {
            let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !dir.is_empty() {
                out.push(PathBuf::from(dir).join("lib").join("libnvrtc.so.12").to_string_lossy().into_owned());
            }
        }
    }
    // The system loader; a CUDA 13 toolkit has only libnvrtc.so.13 (and its libnvrtc.so link).
    for name in ["libnvrtc.so.12", "libnvrtc.so", "libnvrtc.so.13"] {
        out.push(name.into());
    }
    out
}

fn load() -> std::result::Result<Loaded, String> {
    let mut tried = Vec::new();
    for cand in candidates() {
        // SAFETY: loading libnvrtc runs only its (trusted, side-effect free) initialisers.
        match unsafe { libloading::Library::new(&cand) } {
            Ok(lib) => {
                // cudarc resolves symbols through its own dlopen of bare names; make sure that finds
                // the library opened above rather than panicking later.
                // SAFETY: only dlopens candidate names, no symbol is called.
                if !unsafe { nvrtc_sys::is_culib_present() } {
                    tried.push(format!("{cand}: opened, but cudarc cannot find it by soname"));
                    continue;
                }
                let file_len = loaded_file(&lib).and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len());
                return Ok(Loaded { path: cand, file_len, _lib: lib });
            }
            Err(e) => tried.push(format!("{cand}: {e}")),
        }
    }
    Err(format!(
        "libnvrtc not found (set DEEPIS_NVRTC to libnvrtc.so.12, or pip install nvidia-cuda-nvrtc-cu12); tried: {}",
        tried.join("; ")
    ))
}

/// The file the dynamic loader mapped for `lib` (a bare soname resolves through the search path).
fn loaded_file(lib: &libloading::Library) -> Option<PathBuf> {
    // SAFETY: only the symbol's address is taken, nothing is called; dladdr writes `info`.
    unsafe {
        let sym = lib.get::<unsafe extern "C" fn()>(b"nvrtcVersion\0").ok()?;
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(*sym as *const libc::c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned();
        Some(PathBuf::from(name))
    }
}

/// Loads libnvrtc once; returns the path it was loaded from, or a clear error.
pub fn ensure_loaded() -> Result<&'static str> {
    match NVRTC.get_or_init(load) {
        Ok(l) => Ok(&l.path),
        Err(e) => Err(Error::backend("nvrtc", e)),
    }
}

/// Whether libnvrtc can be loaded.
pub fn available() -> bool {
    ensure_loaded().is_ok()
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_loaded()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded; both pointers are valid for writes.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::backend("nvrtc", e))?;
    Ok((major, minor))
}

/// NVRTC's version and library build, as the cubin cache keys on it: "12.9 (7340032 bytes)".
pub fn build_id() -> Result<String> {
    let (major, minor) = version()?;
    let len = match NVRTC.get() {
        Some(Ok(l)) => l.file_len,
        _ => 0,
    };
    Ok(format!("{major}.{minor} ({len} bytes)"))
}

/// The headers NVRTC is given in memory (include name, text): the kernels include nothing else.
pub fn headers() -> [(&'static str, &'static str); 1] {
    [(kernels::HEADER_NAME, kernels::HEADER)]
}

/// The line a kernel source carries when it is to be compiled for sm_90a (wgmma) where the device
/// is sm_90: arch-specific features, whose cubin runs on compute capability 9.0 only.
pub const SM90A_MARK: &str = "// deepis-nvrtc: sm_90a on sm_90";

/// The architecture `src` is compiled for on an `arch` device: sm_90a for a source with
/// [`SM90A_MARK`] on sm_90, else `arch`.
pub fn arch_for<'a>(src: &str, arch: &'a str) -> &'a str {
    if arch == "sm_90" && src.contains(SM90A_MARK) {
        "sm_90a"
    } else {
        arch
    }
}

/// The options every kernel is compiled with for `arch`.
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-Xptxas=-v".to_string(),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ]
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::backend("nvrtc", format!("{what} contains a NUL byte")))
}

fn chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one source file (which includes `deepis_device.h`, given in memory) to a cubin for
/// `arch` ("sm_90") with the standard `options`, bypassing the cache. On a compile error the
/// error carries NVRTC's full log.
pub fn compile_cubin(file: &str, src: &str, arch: &str) -> Result<Compiled> {
    compile_cubin_with(file, src, arch, &options(arch))
}

/// As `compile_cubin`, with the NVRTC options given (they must name `arch`).
pub fn compile_cubin_with(file: &str, src: &str, arch: &str, opts: &[String]) -> Result<Compiled> {
    ensure_loaded()?;
    let c_src = cstring(src, file)?;
    let c_name = cstring(file, file)?;
    let hdr_list = headers();
    let c_hdrs = hdr_list.iter().map(|(n, t)| cstring(t, n)).collect::<Result<Vec<_>>>()?;
    let c_hdr_names = hdr_list.iter().map(|(n, _)| cstring(n, n)).collect::<Result<Vec<_>>>()?;
    let hdrs: Vec<*const c_char> = c_hdrs.iter().map(|c| c.as_ptr()).collect();
    let hdr_names: Vec<*const c_char> = c_hdr_names.iter().map(|c| c.as_ptr()).collect();
    let mut prog = std::mem::MaybeUninit::uninit();
    // SAFETY: every pointer refers to a NUL-terminated string that outlives the program (they are
    // dropped at the end of this function, after destroy_program); as many names as headers.
    unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            prog.as_mut_ptr(),
            c_src.as_ptr(),
            c_name.as_ptr(),
            hdrs.len() as i32,
            hdrs.as_ptr(),
            hdr_names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| Error::kernel(file, format!("nvrtcCreateProgram: {e}")))?;
    // SAFETY: nvrtcCreateProgram succeeded, so it wrote the program handle.
    let prog = unsafe { prog.assume_init() };

    // SAFETY (all calls below): `prog` is a live program until destroy_program at the end.
    let compiled = unsafe { nvrtc_result::compile_program(prog, opts) };
    let log = unsafe { nvrtc_result::get_program_log(prog) }.map(|l| chars_to_string(&l)).unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(Error::kernel(
            file,
            format!("NVRTC compile for {arch} failed ({e}); options {opts:?}; full log:\n{log}"),
        )),
        Ok(()) => unsafe { get_cubin(prog) }
            .map(|cubin| Compiled { file: file.to_string(), arch: arch.to_string(), cubin, log: log.clone() })
            .map_err(|e| Error::kernel(file, format!("nvrtcGetCUBIN for {arch}: {e}"))),
    };
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    out
}

/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn get_cubin(prog: nvrtc_sys::nvrtcProgram) -> std::result::Result<Vec<u8>, nvrtc_result::NvrtcError> {
    let mut size = 0usize;
    nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
    let mut buf = vec![0u8; size];
    nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char).result()?;
    Ok(buf)
}

/// Reads ptxas's `-v` report out of an NVRTC log: one entry per entry function.
pub fn parse_ptxas(log: &str, file: &str, arch: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    let mut current: Option<usize> = None;
    let find = |out: &Vec<KernelReport>, name: &str| out.iter().position(|r| r.kernel == name);
    for line in log.lines() {
        if let Some(name) = quoted_after(line, "Compiling entry function '") {
            current = Some(find(&out, &name).unwrap_or_else(|| {
                out.push(KernelReport {
                    kernel: name,
                    file: file.into(),
                    arch: arch.into(),
                    registers: 0,
                    spill_stores: 0,
                    spill_loads: 0,
                    smem_bytes: 0,
                    barriers: 0,
                });
                out.len() - 1
            }));
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = find(&out, rest.trim());
        } else if let Some(i) = current {
            if let Some(v) = number_before(line, "bytes spill stores") {
                out[i].spill_stores = v;
            }
            if let Some(v) = number_before(line, "bytes spill loads") {
                out[i].spill_loads = v;
            }
            if let Some(v) = number_before(line, "registers") {
                out[i].registers = v;
            }
            if let Some(v) = number_before(line, "bytes smem") {
                out[i].smem_bytes = v;
            }
            if let Some(v) = number_before(line, "barriers") {
                out[i].barriers = v;
            }
        }
    }
    out
}

fn quoted_after(line: &str, key: &str) -> Option<String> {
    let rest = line.split(key).nth(1)?;
    Some(rest.split('\'').next()?.to_string())
}

/// The integer just before `key` in `line` ("Used 32 registers" -> 32).
fn number_before(line: &str, key: &str) -> Option<u32> {
    let head = &line[..line.find(key)?];
    head.split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
}

/// How many compile units came from the cache and how many NVRTC compiled, and any cache trouble.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    pub cached: usize,
    pub compiled: usize,
    /// Unusable entries (recompiled) and failed writes, one line each.
    pub warnings: Vec<String>,
}

impl BuildStats {
    fn add(&mut self, other: BuildStats) {
        self.cached += other.cached;
        self.compiled += other.compiled;
        self.warnings.extend(other.warnings);
    }

    /// The log line, counting source files x architectures:
    /// "kernels: 8 cached, 0 compiled for sm_90 (cache /home/u/.cache/deepis/cubin)".
    pub fn summary(&self, cache: &CubinCache, archs: &str) -> String {
        let where_ = match cache.dir() {
            Some(d) => format!("cache {}", d.display()),
            None => "cache off".to_string(),
        };
        format!("kernels: {} cached, {} compiled for {archs} ({where_})", self.cached, self.compiled)
    }
}

/// One source compiled for one arch: from `cache` when it holds exactly this compile, else by
/// NVRTC (and then stored). Compile errors are never cached.
pub fn compile_cached(cache: &CubinCache, file: &str, src: &str, arch: &str, opts: &[String]) -> Result<(Compiled, BuildStats)> {
    let mut stats = BuildStats::default();
    if cache.dir().is_none() {
        stats.compiled = 1;
        return Ok((compile_cubin_with(file, src, arch, opts)?, stats));
    }
    let compiler = build_id()?;
    let hdrs = headers();
    let key = KeyParts { file, source: src, headers: &hdrs, options: opts, compiler: &compiler, arch }.digest();
    match cache.load(file, arch, &key) {
        Lookup::Hit(e) => {
            stats.cached = 1;
            return Ok((Compiled { file: file.into(), arch: arch.into(), cubin: e.cubin, log: e.log }, stats));
        }
        Lookup::Bad(why) => stats.warnings.push(format!("unusable cache entry, recompiling: {why}")),
        Lookup::Miss => {}
    }
    let c = compile_cubin_with(file, src, arch, opts)?;
    stats.compiled = 1;
    let entry = Entry { log: c.log.clone(), cubin: c.cubin.clone() };
    if let Err(e) = cache.store(file, arch, &key, &entry) {
        stats.warnings.push(format!("kernel cache not written: {e}"));
    }
    Ok((c, stats))
}

/// Every kernel source of `kernels::SOURCES` for `arch`, through `cache`.
pub fn build_all(arch: &str, cache: &CubinCache) -> Result<(Vec<Compiled>, BuildStats)> {
    let mut out = Vec::new();
    let mut stats = BuildStats::default();
    for &(file, src) in kernels::SOURCES {
        let arch = arch_for(src, arch);
        let (c, s) = compile_cached(cache, file, src, arch, &options(arch))?;
        out.push(c);
        stats.add(s);
    }
    Ok((out, stats))
}

fn report_of(c: &Compiled) -> Result<Vec<KernelReport>> {
    let reps = parse_ptxas(&c.log, &c.file, &c.arch);
    if reps.is_empty() {
        return Err(Error::kernel(&c.file, format!("no ptxas report for {}; log:\n{}", c.arch, c.log)));
    }
    Ok(reps)
}

/// Compiles `src` for every arch (no cache) and returns ptxas's report for each kernel.
pub fn compile_source_report(file: &str, src: &str, archs: &[String]) -> Result<Vec<KernelReport>> {
    let mut out = Vec::new();
    for arch in archs {
        out.extend(report_of(&compile_cubin(file, src, arch_for(src, arch))?)?);
    }
    Ok(out)
}

/// Compiles every kernel source of `kernels::SOURCES` and `kernels::TESTING_SOURCES` for every
/// arch (no cache).
pub fn compile_report(archs: &[String]) -> Result<Vec<KernelReport>> {
    Ok(compile_report_cached(archs, &CubinCache::disabled())?.0)
}

/// Every kernel source (`SOURCES` and `TESTING_SOURCES`) for every arch through `cache` (what
/// `deepis kernels` runs): ptxas's report for each kernel, from the stored log on a cache hit.
pub fn compile_report_cached(archs: &[String], cache: &CubinCache) -> Result<(Vec<KernelReport>, BuildStats)> {
    let mut out = Vec::new();
    let mut stats = BuildStats::default();
    for &(file, src) in kernels::SOURCES.iter().chain(kernels::TESTING_SOURCES) {
        for arch in archs {
            let arch = arch_for(src, arch);
            let (c, s) = compile_cached(cache, file, src, arch, &options(arch))?;
            stats.add(s);
            out.extend(report_of(&c)?);
        }
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k' for 'sm_90'\n\
ptxas info    : Function properties for k\n\
ptxas         .     0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 10 registers, used 2 barriers, 1024 bytes smem, 400 bytes cmem[0]\n";
        let r = parse_ptxas(log, "f.cu", "sm_90");
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].registers, r[0].spill_stores, r[0].spill_loads, r[0].smem_bytes), (10, 8, 4, 1024));
        assert_eq!(r[0].barriers, 2);
    }
}
