//! Every kernel compiles to real machine code (cubin) for sm_80 and sm_90 with no spill.
//! Needs only libnvrtc (no GPU, no driver). Skips when NVRTC is absent, except under CI (CI=true
//! or CI=1), where a missing NVRTC fails.
mod common;
use deepis::gpu::nvrtc;

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Test-only kernels (`kernels/testing/*.cu`), compiled with the same header as the real ones.
fn testing_sources() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels").join("testing");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "cu") {
                let name = format!("testing/{}", p.file_name().unwrap().to_string_lossy());
                out.push((name, std::fs::read_to_string(&p).expect("readable test kernel")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::version().expect("nvrtcVersion");
    println!("NVRTC {major}.{minor} from {}", nvrtc::ensure_loaded().unwrap());
    let archs: Vec<String> = ARCHS.iter().map(|s| s.to_string()).collect();
    let mut reports = match nvrtc::compile_report(&archs) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    // Test kernels not already in compile_report (which has kernels::TESTING_SOURCES).
    let listed = |f: &str| deepis::gpu::kernels::TESTING_SOURCES.iter().any(|&(g, _)| g == f);
    for (file, src) in testing_sources().into_iter().filter(|(f, _)| !listed(f)) {
        match nvrtc::compile_source_report(&file, &src, &archs) {
            Ok(r) => reports.extend(r),
            Err(e) => panic!("{e}"),
        }
    }
    println!("{}", deepis::gpu::occupancy::format_table(&reports));

    // Every named kernel has a report for every arch (sm_90a for a file marked for it on sm_90).
    for &(file, name) in deepis::gpu::kernels::KERNELS {
        let src = deepis::gpu::kernels::SOURCES.iter().find(|&&(f, _)| f == file).unwrap().1;
        for arch in ARCHS {
            let arch = nvrtc::arch_for(src, arch);
            assert!(
                reports.iter().any(|r| r.kernel == name && r.arch == arch),
                "no ptxas report for {name} on {arch}"
            );
        }
    }
    let spills: Vec<_> = reports.iter().filter(|r| r.spill_stores > 0 || r.spill_loads > 0).collect();
    assert!(spills.is_empty(), "kernels spill registers:\n{}", deepis::gpu::occupancy::format_table(&spills.into_iter().cloned().collect::<Vec<_>>()));
}

#[test]
fn compile_error_carries_the_full_log() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let bad = "#include \"deepis_device.h\"\nextern \"C\" __global__ void broken(gptr<float> y) { y[0] = undefined_name; }\n";
    let err = nvrtc::compile_cubin("broken.cu", bad, "sm_90").err().expect("must not compile").to_string();
    assert!(err.contains("undefined_name"), "log missing from error: {err}");
}

/// The wgmma kernels are real code for sm_90a (not the trap they compile to elsewhere, which
/// takes 4 registers; the conv's 64 accumulator registers need more than 64), and ptxas keeps their wgmma
/// asynchronous: it warns "wgmma.mma_async instructions are serialized" when the accumulators are
/// touched between issue and wait, or the fragments are not in registers. (The test-only kernel
/// wgmma_gemm touches them on purpose, in its planted faults: it is only required to build.)
#[test]
fn wgmma_kernels_build_for_sm90a_without_serialization() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let all = deepis::gpu::kernels::SOURCES.iter().chain(deepis::gpu::kernels::TESTING_SOURCES);
    for &(file, src) in all.filter(|(_, s)| s.contains(nvrtc::SM90A_MARK)) {
        assert_eq!(nvrtc::arch_for(src, "sm_90"), "sm_90a");
        assert_eq!(nvrtc::arch_for(src, "sm_80"), "sm_80");
        let c = nvrtc::compile_cubin(file, src, "sm_90a").unwrap_or_else(|e| panic!("{e}"));
        let testing = deepis::gpu::kernels::TESTING_SOURCES.iter().any(|&(f, _)| f == file);
        assert!(testing || !c.log.contains("serialized"), "{file}: ptxas serializes wgmma:\n{}", c.log);
        for r in nvrtc::parse_ptxas(&c.log, file, "sm_90a").iter().filter(|r| r.kernel.contains("wgmma")) {
            println!("{file} {} on sm_90a: {} registers, {} / {} spill bytes", r.kernel, r.registers, r.spill_stores, r.spill_loads);
            let least = if testing { 16 } else { 64 };
            assert!(r.registers > least, "{}: {} registers on sm_90a: compiled to the trap, not to wgmma", r.kernel, r.registers);
        }
    }
}
