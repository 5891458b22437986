//! The on-disk cubin cache, through the compile path `deepis kernels` and `CudaDevice::new` use
//! (`nvrtc::compile_report_cached` / `compile_cached`): the first run compiles and stores, the
//! second loads everything, a changed source or option misses, damaged entries are recompiled,
//! racing processes leave a valid cache. Needs only libnvrtc; skips when it is absent, except
//! under CI=true.
use std::path::{Path, PathBuf};
use std::process::Command;

use deepis::gpu::kernels::{SOURCES, TESTING_SOURCES};
mod common;
use deepis::gpu::nvrtc::{self, cache::CubinCache, BuildStats};

const BIN: &str = env!("CARGO_BIN_EXE_deepis");

fn archs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn counts(s: &BuildStats) -> (usize, usize) {
    (s.cached, s.compiled)
}

#[test]
fn second_run_loads_every_kernel_from_the_cache() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = CubinCache::at(tmp.path().join("cubin"));
    let a = archs(&["sm_80", "sm_90"]);
    // `deepis kernels` compiles the test kernels too.
    let n = (SOURCES.len() + TESTING_SOURCES.len()) * a.len();
    let (first, s1) = nvrtc::compile_report_cached(&a, &cache).unwrap();
    assert_eq!(counts(&s1), (0, n), "first run: {s1:?}");
    assert!(s1.warnings.is_empty(), "{:?}", s1.warnings);
    let files = entries(cache.dir().unwrap());
    assert_eq!(files.len(), n, "one entry per source and arch, no temporary files left: {files:?}");
    assert!(files.iter().all(|f| f.extension().is_some_and(|e| e == "cubin")), "{files:?}");

    let (second, s2) = nvrtc::compile_report_cached(&a, &cache).unwrap();
    assert_eq!(counts(&s2), (n, 0), "second run: {s2:?}");
    assert_eq!(first, second, "ptxas's report from the stored log equals the compile's");
    assert!(first.iter().any(|r| r.kernel == "conv3d_tiled_f32" && r.registers > 0 && r.smem_bytes > 0));
    println!("{}", s2.summary(&cache, "sm_80, sm_90"));

    // The cached cubin is the compiled one, byte for byte.
    let (file, src) = SOURCES[0];
    let (hit, s) = nvrtc::compile_cached(&cache, file, src, "sm_90", &nvrtc::options("sm_90")).unwrap();
    assert_eq!(counts(&s), (1, 0));
    let fresh = nvrtc::compile_cubin(file, src, "sm_90").unwrap();
    assert_eq!(hit.cubin, fresh.cubin, "{file}: cached cubin differs from a fresh compile");
}

#[test]
fn a_changed_source_or_option_misses() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = CubinCache::at(tmp.path());
    let (file, src) = SOURCES.iter().find(|(f, _)| *f == "elementwise.cu").copied().unwrap();
    let opts = nvrtc::options("sm_90");
    let run = |src: &str, opts: &[String]| counts(&nvrtc::compile_cached(&cache, file, src, "sm_90", opts).unwrap().1);
    assert_eq!(run(src, &opts), (0, 1));
    assert_eq!(run(src, &opts), (1, 0));
    let changed = format!("{src}\n// one more line\n");
    assert_eq!(run(&changed, &opts), (0, 1), "an edited source must not hit");
    let mut more = opts.clone();
    more.push("-lineinfo".into());
    assert_eq!(run(src, &more), (0, 1), "an added option must not hit");
    let other: Vec<String> = opts.iter().map(|o| if o == "--std=c++17" { "--std=c++20".into() } else { o.clone() }).collect();
    assert_ne!(other, opts);
    assert_eq!(run(src, &other), (0, 1), "a changed option must not hit");
    let sm80 = nvrtc::options("sm_80");
    assert_eq!(counts(&nvrtc::compile_cached(&cache, file, src, "sm_80", &sm80).unwrap().1), (0, 1), "another arch must not hit");
    // Each variant is its own entry; all of them now hit.
    assert_eq!(run(src, &opts), (1, 0));
    assert_eq!(run(&changed, &opts), (1, 0));
    assert_eq!(run(src, &more), (1, 0));
    assert_eq!(run(src, &other), (1, 0));
    assert_eq!(entries(tmp.path()).len(), 5);
}

#[test]
fn damaged_entries_are_recompiled_never_loaded() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = CubinCache::at(tmp.path());
    let a = archs(&["sm_90"]);
    let n = SOURCES.len() + TESTING_SOURCES.len();
    let (good, _) = nvrtc::compile_report_cached(&a, &cache).unwrap();
    let files = entries(tmp.path());
    assert_eq!(files.len(), n);
    // One byte flipped in the middle of the cubin, one truncated, one emptied.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let mid = bytes.len() * 3 / 4;
    bytes[mid] ^= 0x01;
    std::fs::write(&files[0], &bytes).unwrap();
    let len = std::fs::metadata(&files[1]).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&files[1]).unwrap().set_len(len / 2).unwrap();
    std::fs::write(&files[2], b"").unwrap();

    let (again, s) = nvrtc::compile_report_cached(&a, &cache).unwrap();
    assert_eq!(counts(&s), (n - 3, 3), "{s:?}");
    assert_eq!(s.warnings.len(), 3, "{:?}", s.warnings);
    for (f, why) in files[..3].iter().zip(["SHA-256", "truncated or corrupt", "truncated: 0 bytes"]) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let w = s.warnings.iter().find(|w| w.contains(&name)).unwrap_or_else(|| panic!("no warning names {name}: {:?}", s.warnings));
        println!("{w}");
        assert!(w.contains("unusable cache entry, recompiling") && w.contains(why), "{w}");
    }
    assert_eq!(good, again);
    // The damaged files were rewritten: everything hits again, with no warning.
    let (_, s) = nvrtc::compile_report_cached(&a, &cache).unwrap();
    assert_eq!(counts(&s), (n, 0), "{s:?}");
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

fn kernels_cmd(cache_root: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["kernels", "--arch", "sm_90"])
        .args(extra)
        .env("DEEPIS_CACHE_DIR", cache_root)
        .env_remove("DEEPIS_KERNEL_CACHE")
        .output()
        .unwrap()
}

fn stderr_of(o: &std::process::Output) -> String {
    assert!(o.status.success(), "deepis kernels failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn deepis_kernels_says_what_came_from_the_cache() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let n = SOURCES.len() + TESTING_SOURCES.len();
    let first = kernels_cmd(tmp.path(), &[]);
    let e1 = stderr_of(&first);
    let dir = tmp.path().join("cubin");
    assert!(e1.contains(&format!("kernels: 0 cached, {n} compiled for sm_90 (cache {})", dir.display())), "{e1}");
    let second = kernels_cmd(tmp.path(), &[]);
    let e2 = stderr_of(&second);
    assert!(e2.contains(&format!("kernels: {n} cached, 0 compiled for sm_90")), "{e2}");
    assert_eq!(first.stdout, second.stdout, "the table is the same from the cache");
    let table = String::from_utf8_lossy(&second.stdout);
    assert!(table.lines().next().unwrap().contains("blk/SM"), "{table}");

    // --no-cache and DEEPIS_KERNEL_CACHE=off compile everything and write nothing.
    let other = tempfile::tempdir().unwrap();
    let e = stderr_of(&kernels_cmd(other.path(), &["--no-cache"]));
    assert!(e.contains(&format!("kernels: 0 cached, {n} compiled for sm_90 (cache off)")), "{e}");
    let off = Command::new(BIN)
        .args(["kernels", "--arch", "sm_90"])
        .env("DEEPIS_CACHE_DIR", other.path())
        .env("DEEPIS_KERNEL_CACHE", "off")
        .output()
        .unwrap();
    assert!(stderr_of(&off).contains("(cache off)"));
    assert!(entries(other.path()).is_empty(), "{:?}", entries(other.path()));
}

#[test]
fn racing_processes_leave_a_valid_cache() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spawn = || {
        Command::new(BIN)
            .args(["kernels", "--arch", "sm_90"])
            .env("DEEPIS_CACHE_DIR", tmp.path())
            .env_remove("DEEPIS_KERNEL_CACHE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for p in [a, b] {
        let o = p.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{e}");
        assert!(!e.contains("warning"), "{e}");
    }
    let e = stderr_of(&kernels_cmd(tmp.path(), &[]));
    assert!(e.contains(&format!("kernels: {} cached, 0 compiled", SOURCES.len() + TESTING_SOURCES.len())), "{e}");
    assert!(!e.contains("warning"), "{e}");
    let names = entries(&tmp.path().join("cubin"));
    assert!(names.iter().all(|f| !f.file_name().unwrap().to_string_lossy().starts_with(".tmp")), "{names:?}");
}

#[test]
fn an_unwritable_cache_costs_a_warning_not_a_failure() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"not a folder").unwrap();
    // The cache folder would be a_file/cubin: it cannot be created.
    let e = stderr_of(&kernels_cmd(&file, &[]));
    assert!(e.contains("warning: kernel cache not written"), "{e}");
    assert!(e.contains(&format!("kernels: 0 cached, {} compiled", SOURCES.len() + TESTING_SOURCES.len())), "{e}");
}
