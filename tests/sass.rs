//! The tensor-core convolutions' inner loops in machine code, without a GPU: `deepis kernels`
//! compiles every kernel to cubin for sm_80 and sm_90 (sm_90a for conv3d_tc.cu), and
//! `benches/sass_loops.py` disassembles them with cuobjdump and prints each loop that issues HMMA
//! or HGMMA. The innermost loop of every mma.sync conv (`conv3d_tc_*`, `conv3d_tc_wide_*`, in
//! f16 / bf16 / tf32) must compute its shared-memory addresses in 32 bits: no instruction carrying
//! a high word (`.X`, the upper half of 64-bit integer arithmetic). The old inline `cvta` of a
//! generic pointer put 26 of them in `conv3d_tc_bf16`'s loop on sm_90a (145 instructions for 32
//! HMMA, against 109 now). No inner loop of these kernels, wgmma's included, may touch local
//! memory. (wgmma's loop builds 64-bit descriptors, so its carries are not counted against it.)
//! Skips when NVRTC or cuobjdump / nvdisasm is missing, except under CI, where `.ci/run` installs
//! all three.
mod common;
use std::collections::BTreeMap;
use std::process::Command;

/// The innermost tensor-core loop of each (arch, kernel): (instructions, tensor-core
/// instructions, instructions with a carry, local-memory instructions).
type Loops = BTreeMap<(String, String), (usize, usize, usize, usize)>;

/// Parses sass_loops.py's lines (`ARCH KERNEL loop A..B: N instructions, T tensor, R per tensor,
/// W with a carry (.X), L local: ...`); the first line of a kernel is its innermost loop.
fn parse(out: &str) -> Loops {
    let mut loops = Loops::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() > 17 && f[2] == "loop" && f[5] == "instructions," && f[7] == "tensor," && f[12] == "with" && f[17] == "local:", "not a loop line: `{line}`");
        let num = |i: usize| f[i].parse::<usize>().unwrap_or_else(|_| panic!("field {i} of `{line}`"));
        loops.entry((f[0].to_string(), f[1].to_string())).or_insert((num(4), num(6), num(11), num(16)));
    }
    loops
}

#[test]
fn tensor_core_inner_loops_keep_addresses_in_32_bits_and_out_of_local_memory() {
    if !common::nvrtc_or_skip() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let k = Command::new(env!("CARGO_BIN_EXE_deepis")).args(["kernels", "--arch", "sm_80,sm_90"]).env("DEEPIS_CACHE_DIR", cache.path()).output().unwrap();
    assert!(k.status.success(), "deepis kernels: {}", String::from_utf8_lossy(&k.stderr));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches").join("sass_loops.py");
    let o = match Command::new("python3").arg(&script).arg(cache.path()).arg("conv3d_tc").output() {
        Ok(o) => o,
        Err(e) => {
            assert!(!common::on_ci(), "CI is set and python3 cannot run: {e}");
            return common::skip(&format!("no python3 ({e})"));
        }
    };
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() == Some(3) {
        assert!(!common::on_ci(), "CI is set and the disassembler is missing: {err}");
        return common::skip(&format!("no disassembler ({})", err.trim()));
    }
    assert!(o.status.success(), "sass_loops.py: {err}");
    let out = String::from_utf8_lossy(&o.stdout);
    let loops = parse(&out);
    let mut checked = 0;
    for arch in ["sm_80", "sm_90a"] {
        for t in ["f16", "bf16", "tf32"] {
            for kernel in [format!("conv3d_tc_{t}"), format!("conv3d_tc_wide_{t}")] {
                let Some(&(n, tc, carry, local)) = loops.get(&(arch.to_string(), kernel.clone())) else {
                    panic!("{arch} {kernel}: no tensor-core loop found in\n{out}");
                };
                println!("{arch:7} {kernel:22} innermost loop: {n:4} instructions, {tc} HMMA, {carry} with a carry, {local} local");
                assert!(tc > 0 && carry == 0 && local == 0, "{arch} {kernel}: {carry} instructions with a carry (64-bit addresses), {local} local");
                checked += 1;
            }
            if arch == "sm_90a" {
                let kernel = format!("conv3d_wgmma_{t}");
                let Some(&(n, tc, _, local)) = loops.get(&(arch.to_string(), kernel.clone())) else {
                    panic!("{arch} {kernel}: no wgmma loop found in\n{out}");
                };
                println!("{arch:7} {kernel:22} innermost loop: {n:4} instructions, {tc} HGMMA, {local} local");
                assert!(tc > 0 && local == 0, "{arch} {kernel}: {local} local-memory instructions");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 15);
}
