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
                return Ok(Loaded { path: cand, _lib: lib });
            }
            Err(e) => tried.push(format!("{cand}: {e}")),
        }
    }
    Err(format!(
        "libnvrtc not found (set DEEPIS_NVRTC to libnvrtc.so.12, or pip install nvidia-cuda-nvrtc-cu12); tried: {}",
        tried.join("; ")
    ))
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

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::backend("nvrtc", format!("{what} contains a NUL byte")))
}

fn chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one source file (which includes `deepis_device.h`, given in memory) to a cubin for
/// `arch` ("sm_90"). On a compile error the error carries NVRTC's full log.
pub fn compile_cubin(file: &str, src: &str, arch: &str) -> Result<Compiled> {
    ensure_loaded()?;
    let c_src = cstring(src, file)?;
    let c_name = cstring(file, file)?;
    let c_hdr = cstring(kernels::HEADER, kernels::HEADER_NAME)?;
    let c_hdr_name = cstring(kernels::HEADER_NAME, kernels::HEADER_NAME)?;
    let hdrs = [c_hdr.as_ptr()];
    let hdr_names = [c_hdr_name.as_ptr()];
    let mut prog = std::mem::MaybeUninit::uninit();
    // SAFETY: every pointer refers to a NUL-terminated string that outlives the program (they are
    // dropped at the end of this function, after destroy_program); 1 header, 1 name.
    unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            prog.as_mut_ptr(),
            c_src.as_ptr(),
            c_name.as_ptr(),
            1,
            hdrs.as_ptr(),
            hdr_names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| Error::kernel(file, format!("nvrtcCreateProgram: {e}")))?;
    // SAFETY: nvrtcCreateProgram succeeded, so it wrote the program handle.
    let prog = unsafe { prog.assume_init() };

    let opts = [
        format!("--gpu-architecture={arch}"),
        "-Xptxas=-v".to_string(),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    // SAFETY (all calls below): `prog` is a live program until destroy_program at the end.
    let compiled = unsafe { nvrtc_result::compile_program(prog, &opts) };
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

/// Compiles `src` for every arch and returns ptxas's report for each kernel.
pub fn compile_source_report(file: &str, src: &str, archs: &[String]) -> Result<Vec<KernelReport>> {
    let mut out = Vec::new();
    for arch in archs {
        let c = compile_cubin(file, src, arch)?;
        let reps = parse_ptxas(&c.log, file, arch);
        if reps.is_empty() {
            return Err(Error::kernel(file, format!("no ptxas report for {arch}; log:\n{}", c.log)));
        }
        out.extend(reps);
    }
    Ok(out)
}

/// Compiles every kernel source of `kernels::SOURCES` and `kernels::TESTING_SOURCES` for every arch.
pub fn compile_report(archs: &[String]) -> Result<Vec<KernelReport>> {
    let mut out = Vec::new();
    for &(file, src) in kernels::SOURCES.iter().chain(kernels::TESTING_SOURCES) {
        out.extend(compile_source_report(file, src, archs)?);
    }
    Ok(out)
}

/// The report as an aligned text table.
pub fn format_table(reports: &[KernelReport]) -> String {
    let mut s = format!(
        "{:<24} {:<24} {:<6} {:>5} {:>12} {:>11} {:>10}\n",
        "file", "kernel", "arch", "regs", "spill_stores", "spill_loads", "smem_bytes"
    );
    for r in reports {
        s += &format!(
            "{:<24} {:<24} {:<6} {:>5} {:>12} {:>11} {:>10}\n",
            r.file, r.kernel, r.arch, r.registers, r.spill_stores, r.spill_loads, r.smem_bytes
        );
    }
    s
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
ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem\n";
        let r = parse_ptxas(log, "f.cu", "sm_90");
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].registers, r[0].spill_stores, r[0].spill_loads, r[0].smem_bytes), (10, 8, 4, 1024));
    }
}
