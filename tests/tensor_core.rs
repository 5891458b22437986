//! The tensor-core path on the emulator, checked lane by lane (kernels/testing/tensor_checks.cu):
//! fp16/bf16 conversions against the `half` crate; the ldmatrix / mma.sync truth table against the
//! PTX ISA fragment formulas (written here, independently of the emulator); mma and a cp.async tile
//! loop against float64 matrix products; every planted bug fails with a message naming the kernel
//! and the fault; the tf32 rounding (cvt.rna) against bit patterns written by hand, the m16n8k8
//! .tf32 mma against float64 products. On a machine with a GPU the same kernels run on CUDA and must give the
//! emulator's table bit for bit (`cuda_truth_table_matches_the_emulator`).
mod common;

use deepis::error::Error;
use deepis::gpu::emu::{EmuDevice, Schedule};
use deepis::gpu::{DType, Device, KArg, LaunchCfg};

const SCHEDULES: [Schedule; 2] = [Schedule::Forward, Schedule::Reverse];
const SRC_FILE: &str = "testing/tensor_checks.cu";
const SRC: &str = include_str!("../kernels/testing/tensor_checks.cu");

fn cfg(grid: u32, block: u32) -> LaunchCfg {
    LaunchCfg { grid: [grid, 1, 1], block: [block, 1, 1], shmem: 0 }
}

fn kernel_err(r: deepis::Result<()>) -> (String, String) {
    match r {
        Err(Error::Kernel { kernel, msg }) => (kernel, msg),
        other => panic!("expected a kernel error, got {other:?}"),
    }
}

/// Small integers in [-r, r]: every product and sum of the tests is exact in f16, bf16 and f32.
fn ints(len: usize, r: i32, seed: u64) -> Vec<f32> {
    common::values(len, seed).iter().map(|v| ((v * (r as f32 + 0.5)).round()).clamp(-r as f32, r as f32)).collect()
}

// ---- the PTX ISA formulas (groupID g = lane / 4, threadID_in_group t = lane % 4) -----------------

/// The element id (16 r + c of the 16x16 source M) that `ldmatrix` puts in (lane, reg, half), when
/// lane s supplies the row address &M[s % 16][8 (s / 16)] (.x1: &M[s % 8][0]); -1 past `num`.
fn ldmatrix_id(num: usize, trans: bool, lane: usize, reg: usize, half: usize) -> f32 {
    if reg >= num {
        return -1.0;
    }
    let (g, t) = (lane / 4, lane % 4);
    // Matrix `reg`'s row i comes from lane 8 reg + i; each thread holds (row g, cols 2t, 2t+1),
    // or with .trans (rows 2t, 2t+1, col g).
    let (row, col) = if trans { (2 * t + half, g) } else { (g, 2 * t + half) };
    let s = 8 * reg + row;
    let (mr, mc) = if num == 1 { (s % 8, 0) } else { (s % 16, 8 * (s / 16)) };
    (16 * mr + mc + col) as f32
}

/// (m, n) of accumulator register `reg` of `lane` (C and D of m16n8k16).
fn acc_mn(lane: usize, reg: usize) -> (usize, usize) {
    (lane / 4 + 8 * (reg / 2), 2 * (lane % 4) + reg % 2)
}

fn expected_table() -> Vec<f32> {
    let mut t = vec![-1.0f32; 9 * 256];
    for (sec, (num, trans)) in [(1, false), (2, false), (4, false), (1, true), (2, true), (4, true)].into_iter().enumerate() {
        for lane in 0..32 {
            for reg in 0..4 {
                for half in 0..2 {
                    t[sec * 256 + lane * 8 + 2 * reg + half] = ldmatrix_id(num, trans, lane, reg, half);
                }
            }
        }
    }
    for sec in 6..9 {
        for lane in 0..32 {
            for reg in 0..4 {
                let (m, n) = acc_mn(lane, reg);
                let c = if sec == 8 { 1000.0 + 4.0 * lane as f32 + reg as f32 } else { 0.0 };
                t[sec * 256 + lane * 8 + reg] = (8 * m + n) as f32 + c;
            }
        }
    }
    t
}

fn table_on<D: Device>(dev: &D) -> Vec<f32> {
    let out = dev.alloc_zeros(9 * 256).unwrap();
    dev.launch("tt_fragments", cfg(1, 32), &[KArg::Buf(&out)]).unwrap_or_else(|e| panic!("{e}"));
    dev.dtoh(&out).unwrap()
}

fn first_table_difference(got: &[f32], want: &[f32]) -> Option<String> {
    const SECTIONS: [&str; 9] = ["ldmatrix.x1", "ldmatrix.x2", "ldmatrix.x4", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "ldmatrix.x4.trans", "mma f16 D", "mma bf16 D", "mma f16 C->D"];
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    let &i = bad.first()?;
    let (sec, lane, v) = (i / 256, (i % 256) / 8, i % 8);
    Some(format!("{} differences; first: {} lane {lane} value {v}: got {}, want {}", bad.len(), SECTIONS[sec], got[i], want[i]))
}

#[test]
fn truth_table_matches_the_ptx_isa_formulas() {
    let want = expected_table();
    for s in SCHEDULES {
        let got = table_on(&EmuDevice::with_schedule(s));
        if let Some(d) = first_table_difference(&got, &want) {
            panic!("tt_fragments ({s:?}) differs from the PTX ISA layouts: {d}");
        }
    }
    // The table is not trivially satisfied: lane 5 of ldmatrix.x4 holds (row 1, cols 2, 3) of each matrix.
    assert_eq!(&want[2 * 256 + 5 * 8..2 * 256 + 5 * 8 + 8], &[18.0, 19.0, 146.0, 147.0, 26.0, 27.0, 154.0, 155.0]);
    println!("truth table: 9 sections x 32 lanes match the PTX ISA formulas on both schedules");
}

// ---- mma.sync with fragments from global memory ---------------------------------------------------

struct MmaCase {
    a: Vec<f32>,  // 16x16 row-major
    bn: Vec<f32>, // 8x16: Bn[n][k]
    c: Vec<f32>,  // 16x8
}

impl MmaCase {
    fn new(seed: u64, exact: bool, dtype: DType) -> MmaCase {
        let round = |v: Vec<f32>| -> Vec<f32> { deepis::gpu::from_half_bits(&deepis::gpu::to_half_bits(&v, dtype), dtype) };
        if exact {
            MmaCase { a: ints(256, 8, seed), bn: ints(128, 8, seed + 1), c: ints(128, 100, seed + 2) }
        } else {
            MmaCase { a: round(common::values(256, seed)), bn: round(common::values(128, seed + 1)), c: common::values(128, seed + 2) }
        }
    }
    /// D = A B + C in f64, and sum |A||B| + |C| per element (the scale of the rounding error).
    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut d, mut s) = (vec![0.0; 128], vec![0.0; 128]);
        for m in 0..16 {
            for n in 0..8 {
                let (mut acc, mut mag) = (self.c[m * 8 + n] as f64, (self.c[m * 8 + n] as f64).abs());
                for k in 0..16 {
                    let p = self.a[m * 16 + k] as f64 * self.bn[n * 16 + k] as f64;
                    acc += p;
                    mag += p.abs();
                }
                d[m * 8 + n] = acc;
                s[m * 8 + n] = mag;
            }
        }
        (d, s)
    }
}

/// Runs an mma kernel; Err names the kernel and the first wrong element. Exact inputs must give
/// exact outputs; others within 2^-22 of sum |a||b| + |c| (one rounding of f32 is 2^-24 of |D|; the
/// hardware accumulates in f32 with a few roundings, each bounded the same way).
fn check_mma<D: Device>(dev: &D, kernel: &str, dtype: DType, case: &MmaCase, exact: bool) -> Result<(), String> {
    let a = dev.htod_as(&case.a, dtype).unwrap();
    let b = dev.htod_as(&case.bn, dtype).unwrap();
    let c = dev.htod(&case.c).unwrap();
    let d = dev.alloc_zeros(128).unwrap();
    dev.launch(kernel, cfg(1, 32), &[KArg::Buf(&a), KArg::Buf(&b), KArg::Buf(&c), KArg::Buf(&d)]).map_err(|e| e.to_string())?;
    let got = dev.dtoh(&d).unwrap();
    let (want, mag) = case.reference();
    let bad: Vec<usize> = (0..128)
        .filter(|&i| {
            let err = (got[i] as f64 - want[i]).abs();
            if exact { err != 0.0 } else { err > mag[i] * 2f64.powi(-22) }
        })
        .collect();
    match bad.first() {
        None => Ok(()),
        Some(&i) => Err(format!(
            "{kernel}: D = A B + C wrong at {} of 128 elements (a fragment layout fault); first D[{}][{}] = {}, expected {}",
            bad.len(),
            i / 8,
            i % 8,
            got[i],
            want[i]
        )),
    }
}

#[test]
fn mma_matches_float64_products() {
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        for (kernel, dtype) in [("mma_frag_f16", DType::F16), ("mma_frag_bf16", DType::BF16)] {
            for seed in [1, 2, 3] {
                check_mma(&dev, kernel, dtype, &MmaCase::new(seed, true, dtype), true).unwrap_or_else(|e| panic!("{s:?}: {e}"));
                check_mma(&dev, kernel, dtype, &MmaCase::new(seed, false, dtype), false).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            }
        }
    }
}

#[test]
fn planted_fragment_layout_bugs_give_wrong_products() {
    let dev = EmuDevice::new();
    for kernel in ["bug_mma_swapped_a_rows", "bug_mma_b_row_major"] {
        let err = check_mma(&dev, kernel, DType::F16, &MmaCase::new(7, true, DType::F16), true).expect_err(kernel);
        println!("{err}");
        assert!(err.starts_with(kernel) && err.contains("fragment layout fault"), "{err}");
    }
}

// ---- the cp.async + ldmatrix + mma tile loop --------------------------------------------------------

const K: usize = 48;

fn tile_case() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (a, bn) = (ints(16 * K, 4, 11), ints(16 * K, 4, 12));
    let mut d = vec![0.0; 256];
    for m in 0..16 {
        for n in 0..16 {
            d[m * 16 + n] = (0..K).map(|k| a[m * K + k] * bn[n * K + k]).sum();
        }
    }
    (a, bn, d)
}

fn run_tile<D: Device>(dev: &D, kernel: &str) -> deepis::Result<Vec<f32>> {
    let (a, bn, _) = tile_case();
    let (ab, bb) = (dev.htod_as(&a, DType::F16)?, dev.htod_as(&bn, DType::F16)?);
    let d = dev.alloc_zeros(256)?;
    dev.launch(kernel, cfg(1, 64), &[KArg::Buf(&ab), KArg::Buf(&bb), KArg::Buf(&d), KArg::I32(K as i32)])?;
    dev.dtoh(&d)
}

#[test]
fn async_copy_tile_loop_computes_the_product() {
    let want = tile_case().2;
    for s in SCHEDULES {
        let got = run_tile(&EmuDevice::with_schedule(s), "tc_tile_gemm").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, want, "{s:?}");
    }
}

#[test]
fn cp_async_sizes_and_zero_fill() {
    let x: Vec<f32> = (0..352).map(|i| i as f32 + 0.5).collect();
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let (xb, y) = (dev.htod(&x).unwrap(), dev.alloc_zeros(384).unwrap());
        dev.launch("cp_async_sizes", cfg(1, 32), &[KArg::Buf(&xb), KArg::Buf(&y)]).unwrap_or_else(|e| panic!("{e}"));
        let got = dev.dtoh(&y).unwrap();
        for i in 0..352 {
            let (lane, j) = ((i.max(224) - 224) / 4, (i.max(224) - 224) % 4);
            let want = if i < 224 || (lane % 2 == 0 && j < 2) { x[i] } else { 0.0 };
            assert_eq!(got[i], want, "y[{i}] {s:?}");
        }
        for l in 0..32 {
            assert_eq!(got[352 + l], x[l] + x[32 + 2 * l] + x[33 + 2 * l], "lane {l} {s:?}");
        }
    }
}

// ---- planted bugs the emulator must catch ----------------------------------------------------------

fn expect_fault(kernel: &str, block: u32, grid: u32, want: &[&str], args: &dyn Fn(&EmuDevice) -> deepis::Result<()>) {
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let (k, msg) = kernel_err(args(&dev));
        println!("{k} ({s:?}): {msg}");
        assert_eq!(k, kernel);
        for w in want {
            assert!(msg.contains(w), "{kernel} {s:?}: {w:?} not in {msg:?} (block {block}, grid {grid})");
        }
    }
}

#[test]
fn planted_pipeline_bugs_are_caught() {
    let cases: [(&str, &[&str]); 4] = [
        ("bug_tile_no_wait", &["read of a cp.async destination before its cp_async_wait_group", "static shared `As`"]),
        ("bug_tile_no_barrier", &["read-after-write race (no __syncthreads between the write and this read)"]),
        ("bug_tile_war", &["write-after-read race (no __syncthreads between the read and this write)"]),
        ("bug_ldmatrix_misaligned", &["ldmatrix.x4: misaligned row address of lane 0", "is not 16-byte aligned"]),
    ];
    for (kernel, want) in cases {
        expect_fault(kernel, 64, 1, want, &|dev| run_tile(dev, kernel).map(|_| ()));
    }
}

#[test]
fn planted_shared_memory_and_warp_bugs_are_caught() {
    let one = |kernel: &'static str, block: u32, grid: u32| {
        move |dev: &EmuDevice| {
            let y = dev.alloc_zeros(64 * grid as usize).unwrap();
            dev.launch(kernel, cfg(grid, block), &[KArg::Buf(&y)])
        }
    };
    expect_fault("bug_shared_oob", 32, 1, &["out-of-bounds access: static shared `s` index 32, length 32", "thread (31,0,0)"], &one("bug_shared_oob", 32, 1));
    expect_fault("bug_shared_uninit", 32, 1, &["read of shared memory nothing wrote: static shared `s` byte"], &one("bug_shared_uninit", 32, 1));
    expect_fault("bug_shared_stale", 32, 2, &["read of shared memory nothing wrote", "block (1,0,0)"], &one("bug_shared_stale", 32, 2));
    expect_fault("bug_shfl_exited", 32, 1, &["__shfl_down_sync", "lane 8 reads lane 16, which has exited"], &one("bug_shfl_exited", 32, 1));
    expect_fault("bug_mma_exited_lane", 32, 1, &["mma.sync", "lane 16 has exited: all 32 lanes must execute it"], &one("bug_mma_exited_lane", 32, 1));
    expect_fault("bug_cp_async_exit", 32, 1, &["thread exits with 1 cp.async copies pending", "no cp_async_wait_group"], &|dev: &EmuDevice| {
        let (x, y) = (dev.htod(&vec![1.0; 128]).unwrap(), dev.alloc_zeros(32).unwrap());
        dev.launch("bug_cp_async_exit", cfg(1, 32), &[KArg::Buf(&x), KArg::Buf(&y)])
    });
}

// ---- half types and typed buffers -----------------------------------------------------------------

fn converted<D: Device>(dev: &D, x: &[f32]) -> (Vec<u16>, Vec<u16>) {
    let xb = dev.htod(x).unwrap();
    let (h, b) = (dev.htod_bits(&vec![0; x.len()], DType::F16).unwrap(), dev.htod_bits(&vec![0; x.len()], DType::BF16).unwrap());
    dev.launch("half_convert", LaunchCfg::linear(x.len(), 256), &[KArg::Buf(&xb), KArg::Buf(&h), KArg::Buf(&b), KArg::I32(x.len() as i32)])
        .unwrap_or_else(|e| panic!("{e}"));
    (dev.dtoh_bits(&h).unwrap(), dev.dtoh_bits(&b).unwrap())
}

#[test]
fn half_conversions_round_to_nearest_even() {
    let x = common::conversion_inputs();
    let (h, b) = converted(&EmuDevice::new(), &x);
    let (wh, wb) = (deepis::gpu::to_half_bits(&x, DType::F16), deepis::gpu::to_half_bits(&x, DType::BF16));
    for i in 0..x.len() {
        assert!(common::same_half(h[i], wh[i], DType::F16), "f16({:e} = {:#010x}): emulator {:#06x}, half crate {:#06x}", x[i], x[i].to_bits(), h[i], wh[i]);
        assert!(common::same_half(b[i], wb[i], DType::BF16), "bf16({:e} = {:#010x}): emulator {:#06x}, half crate {:#06x}", x[i], x[i].to_bits(), b[i], wb[i]);
    }
    // Widening is exact: every 16-bit pattern of both types.
    let dev = EmuDevice::new();
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let (hb, bb) = (dev.htod_bits(&all, DType::F16).unwrap(), dev.htod_bits(&all, DType::BF16).unwrap());
    let (f, g) = (dev.alloc_zeros(all.len()).unwrap(), dev.alloc_zeros(all.len()).unwrap());
    dev.launch("half_widen", LaunchCfg::linear(all.len(), 256), &[KArg::Buf(&hb), KArg::Buf(&bb), KArg::Buf(&f), KArg::Buf(&g), KArg::I32(all.len() as i32)]).unwrap();
    let (f, g) = (dev.dtoh(&f).unwrap(), dev.dtoh(&g).unwrap());
    for (i, &bits) in all.iter().enumerate() {
        let (wf, wg) = (half::f16::from_bits(bits).to_f32(), half::bf16::from_bits(bits).to_f32());
        assert!(f[i].to_bits() == wf.to_bits() || (f[i].is_nan() && wf.is_nan()), "f16 {bits:#06x}: {} vs {wf}", f[i]);
        assert!(g[i].to_bits() == wg.to_bits() || (g[i].is_nan() && wg.is_nan()), "bf16 {bits:#06x}: {} vs {wg}", g[i]);
    }
    println!("{} conversions and 2 x 65536 widenings agree with the half crate", x.len());
}

#[test]
fn typed_buffers_are_uploaded_once_and_checked_against_kernel_signatures() {
    let dev = EmuDevice::new();
    let w = [0.1f32, -2.5, 65520.0, 1e-8];
    let h = dev.htod_as(&w, DType::F16).unwrap();
    assert_eq!((dev.buf_dtype(&h), dev.buf_len(&h)), (DType::F16, 4));
    assert_eq!(dev.dtoh_bits(&h).unwrap(), deepis::gpu::to_half_bits(&w, DType::F16));
    assert_eq!(dev.dtoh(&h).unwrap(), [half::f16::from_f32(0.1).to_f32(), -2.5, f32::INFINITY, half::f16::from_f32(1e-8).to_f32()]);
    let f = dev.htod_as(&w, DType::F32).unwrap();
    assert_eq!(dev.dtoh(&f).unwrap(), w);
    assert!(dev.dtoh_bits(&f).is_err());

    let (a16, b16, c, d) = (dev.htod_as(&[0.0; 256], DType::F16).unwrap(), dev.htod_as(&[0.0; 128], DType::BF16).unwrap(), dev.alloc_zeros(128).unwrap(), dev.alloc_zeros(128).unwrap());
    let (_, msg) = kernel_err(dev.launch("mma_frag_f16", cfg(1, 32), &[KArg::Buf(&a16), KArg::Buf(&b16), KArg::Buf(&c), KArg::Buf(&d)]));
    assert!(msg.contains("argument 1 must be an f16 buffer, got an bf16 buffer"), "{msg}");
    let (_, msg) = kernel_err(dev.launch("mma_frag_f16", cfg(1, 32), &[KArg::Buf(&c), KArg::Buf(&a16), KArg::Buf(&c), KArg::Buf(&d)]));
    assert!(msg.contains("argument 0 must be an f16 buffer, got an f32 buffer"), "{msg}");
    let (_, msg) = kernel_err(dev.launch("mma_frag_f16", cfg(1, 32), &[KArg::Buf(&a16), KArg::Buf(&a16), KArg::Buf(&a16), KArg::Buf(&d)]));
    assert!(msg.contains("argument 2 must be an f32 (32-bit) buffer"), "{msg}");
}

// ---- the same kernels on a real GPU -----------------------------------------------------------------

/// Needs a GPU (skips with the reason otherwise): the truth table, conversions, mma and the tile
/// loop on CUDA must equal the emulator's bit for bit (all inputs exact). benches/gpu_check.sh.
#[test]
fn cuda_truth_table_matches_the_emulator() {
    let Some(mut cuda) = common::cuda_device_or_skip() else { return };
    let kernels = ["tt_fragments", "half_convert", "half_widen", "mma_frag_f16", "mma_frag_bf16", "tc_tile_gemm", "cp_async_sizes", "tf32_round_bits", "mma_frag_tf32"];
    cuda.load_source(SRC_FILE, SRC, &kernels).unwrap_or_else(|e| panic!("{e}"));
    let emu = EmuDevice::new();
    let (gpu_t, emu_t) = (table_on(&cuda), table_on(&emu));
    if let Some(d) = first_table_difference(&gpu_t, &emu_t) {
        panic!("{}: the truth table differs from the emulator's: {d}", cuda.name());
    }
    assert!(first_table_difference(&gpu_t, &expected_table()).is_none());
    println!("{}: truth table (9 x 32 lanes x 8) identical to the emulator's and to the PTX ISA formulas", cuda.name());

    let x = common::conversion_inputs();
    let ((gh, gb), (eh, eb)) = (converted(&cuda, &x), converted(&emu, &x));
    for i in 0..x.len() {
        assert!(common::same_half(gh[i], eh[i], DType::F16) && common::same_half(gb[i], eb[i], DType::BF16), "{:e}: cuda {:#06x}/{:#06x}, emu {:#06x}/{:#06x}", x[i], gh[i], gb[i], eh[i], eb[i]);
    }
    for (kernel, dtype) in [("mma_frag_f16", DType::F16), ("mma_frag_bf16", DType::BF16)] {
        check_mma(&cuda, kernel, dtype, &MmaCase::new(1, true, dtype), true).unwrap_or_else(|e| panic!("cuda: {e}"));
        check_mma(&cuda, kernel, dtype, &MmaCase::new(1, false, dtype), false).unwrap_or_else(|e| panic!("cuda: {e}"));
    }
    assert_eq!(run_tile(&cuda, "tc_tile_gemm").unwrap(), tile_case().2);
    // tf32: the GPU's cvt.rna.tf32.f32 gives the emulator's bits (a NaN: any NaN; sm_80's SASS
    // turns a signalling NaN with only low payload bits into an infinity), and its m16n8k8 mma
    // the float64 product
    let x = tf32_inputs();
    let (g, e) = (tf32_on(&cuda, &x), tf32_on(&emu, &x));
    for i in 0..x.len() {
        let nan = |b: u32| f32::from_bits(b).is_nan();
        assert!(g[i] == e[i] || (nan(e[i]) && nan(x[i].to_bits())), "tf32 of {:#010x}: cuda {:#010x}, emu {:#010x}", x[i].to_bits(), g[i], e[i]);
    }
    for exact in [true, false] {
        check_mma_tf32(&cuda, "mma_frag_tf32", 1, exact).unwrap_or_else(|e| panic!("cuda: {e}"));
    }
    println!("{}: conversions, mma (f16, bf16) and the cp.async tile loop agree with the emulator", cuda.name());
}

// ---- tf32: cvt.rna.tf32.f32 and mma.sync m16n8k8 .tf32 --------------------------------------------

/// (f32 bits in, tf32 bits out), written by hand: round to nearest on the 13 dropped bits, ties
/// (dropped bits exactly 0x1000) away from zero; infinities kept, NaN stays NaN.
const TF32_TABLE: [(u32, u32); 23] = [
    (0x3f80_0000, 0x3f80_0000), // 1: exact
    (0x3f80_0fff, 0x3f80_0000), // 1 + 2^-11 - 2^-23: below the half-way point, down
    (0x3f80_1000, 0x3f80_2000), // 1 + 2^-11: a tie with an even lower neighbour, away (ties-to-even gives 1)
    (0xbf80_1000, 0xbf80_2000), // -(1 + 2^-11): away from zero
    (0x3f80_1001, 0x3f80_2000), // just above the tie
    (0x3f80_3000, 0x3f80_4000), // a tie with an odd lower neighbour: away (here also even)
    (0x3fff_f000, 0x4000_0000), // 2 - 2^-11: a tie that carries into the exponent: 2
    (0x3fff_efff, 0x3fff_e000), // just below that tie: the largest tf32 below 2
    (0x7f7f_efff, 0x7f7f_e000), // the largest finite tf32 stays
    (0x7f7f_f000, 0x7f80_0000), // the tie above it: infinity
    (0x7f7f_ffff, 0x7f80_0000), // f32::MAX: infinity
    (0xff7f_ffff, 0xff80_0000), // -f32::MAX: -infinity
    (0x7f80_0000, 0x7f80_0000), // infinity kept
    (0xff80_0000, 0xff80_0000), // -infinity kept
    (0x0000_0000, 0x0000_0000), // +0
    (0x8000_0000, 0x8000_0000), // -0
    (0x0000_0001, 0x0000_0000), // the smallest subnormal: zero
    (0x0000_1000, 0x0000_2000), // a subnormal tie: away
    (0x8000_1000, 0x8000_2000), // its negative
    (0x007f_f000, 0x0080_0000), // the largest subnormal tie carries into the smallest normal
    (0x7fc0_0000, 0x7fc0_0000), // the quiet NaN kept
    (0xffc1_2345, 0xffc1_2000), // a NaN: low 13 bits dropped, sign and high payload kept
    (0x7f80_0001, 0x7fc0_0000), // a signalling NaN whose payload is all in the low bits: a (quiet) NaN
];

fn tf32_on<D: Device>(dev: &D, x: &[f32]) -> Vec<u32> {
    let (xb, y) = (dev.htod(x).unwrap(), dev.alloc_zeros(x.len()).unwrap());
    dev.launch("tf32_round_bits", LaunchCfg::linear(x.len(), 256), &[KArg::Buf(&xb), KArg::Buf(&y), KArg::I32(x.len() as i32)])
        .unwrap_or_else(|e| panic!("{e}"));
    dev.dtoh(&y).unwrap().iter().map(|v| v.to_bits()).collect()
}

/// The table's inputs, the half-conversion inputs and 4096 random bit patterns.
fn tf32_inputs() -> Vec<f32> {
    let mut x: Vec<f32> = TF32_TABLE.iter().map(|&(b, _)| f32::from_bits(b)).collect();
    x.extend(common::conversion_inputs());
    let mut s = 0x9e3779b97f4a7c15u64;
    x.extend((0..4096).map(|_| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        f32::from_bits((s >> 32) as u32)
    }));
    x
}

/// The emulator's cvt.rna.tf32.f32 and the host's `round_tf32` give the hand-written bits of the
/// table, and agree with each other bit for bit on every input (NaN payloads included).
#[test]
fn tf32_rounding_matches_the_hand_written_bits() {
    let x = tf32_inputs();
    let emu = tf32_on(&EmuDevice::new(), &x);
    for (i, &(bits, want)) in TF32_TABLE.iter().enumerate() {
        let host = deepis::gpu::round_tf32(f32::from_bits(bits)).to_bits();
        assert_eq!(host, want, "round_tf32({bits:#010x}) = {host:#010x}, want {want:#010x}");
        assert_eq!(emu[i], want, "emulator tf32_from_f32({bits:#010x}) = {:#010x}, want {want:#010x}", emu[i]);
    }
    for (i, &v) in x.iter().enumerate() {
        let host = deepis::gpu::round_tf32(v).to_bits();
        assert_eq!(emu[i], host, "{:#010x}: emulator {:#010x}, host {host:#010x}", v.to_bits(), emu[i]);
        assert_eq!(host & 0x1fff, 0, "{:#010x}: {host:#010x} is not a tf32 value", v.to_bits());
    }
    println!("{} hand-written tf32 roundings hold; emulator and host agree on {} inputs", TF32_TABLE.len(), x.len());
}

/// A 16x8 (raw f32: the kernel rounds it), Bn 8x8 (n-major, tf32 values) and C 16x8.
fn tf32_mma_case(seed: u64, exact: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if exact {
        (ints(128, 8, seed), ints(64, 8, seed + 1), ints(128, 100, seed + 2))
    } else {
        let bn = common::values(64, seed + 1).into_iter().map(deepis::gpu::round_tf32).collect();
        (common::values(128, seed), bn, common::values(128, seed + 2))
    }
}

/// Runs an m16n8k8 .tf32 kernel against the float64 product of the tf32-rounded A and B: exact
/// inputs give exact outputs, others are within 2^-22 of sum |a||b| + |c| (tf32 products are exact;
/// the sum is rounded to f32 a few times, each within 2^-24 of the magnitude).
fn check_mma_tf32<D: Device>(dev: &D, kernel: &str, seed: u64, exact: bool) -> Result<(), String> {
    let (a, bn, c) = tf32_mma_case(seed, exact);
    let (ab, bb, cb, d) = (dev.htod(&a).unwrap(), dev.htod(&bn).unwrap(), dev.htod(&c).unwrap(), dev.alloc_zeros(128).unwrap());
    dev.launch(kernel, cfg(1, 32), &[KArg::Buf(&ab), KArg::Buf(&bb), KArg::Buf(&cb), KArg::Buf(&d)]).map_err(|e| e.to_string())?;
    let got = dev.dtoh(&d).unwrap();
    for m in 0..16 {
        for n in 0..8 {
            let (mut acc, mut mag) = (c[m * 8 + n] as f64, (c[m * 8 + n] as f64).abs());
            for k in 0..8 {
                let p = deepis::gpu::round_tf32(a[m * 8 + k]) as f64 * bn[n * 8 + k] as f64;
                acc += p;
                mag += p.abs();
            }
            let err = (got[m * 8 + n] as f64 - acc).abs();
            if (exact && err != 0.0) || err > mag * 2f64.powi(-22) {
                return Err(format!("{kernel}: D[{m}][{n}] = {}, expected {acc} (a fragment layout fault)", got[m * 8 + n]));
            }
        }
    }
    Ok(())
}

#[test]
fn tf32_mma_matches_float64_products() {
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        for seed in [1, 2, 3] {
            for exact in [true, false] {
                check_mma_tf32(&dev, "mma_frag_tf32", seed, exact).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            }
        }
    }
}

/// An mma given an f32 that is not a tf32 value (the kernel skipped cvt.rna) fails the launch.
#[test]
fn an_unrounded_tf32_operand_is_caught() {
    let kernel = "bug_mma_tf32_unrounded";
    expect_fault(kernel, 32, 1, &["mma.sync m16n8k8 .tf32", "is not a tf32 value (low 13 bits set)"], &|dev| {
        let (a, bn, c) = tf32_mma_case(4, false);
        let (ab, bb, cb, d) = (dev.htod(&a)?, dev.htod(&bn)?, dev.htod(&c)?, dev.alloc_zeros(128)?);
        dev.launch(kernel, cfg(1, 32), &[KArg::Buf(&ab), KArg::Buf(&bb), KArg::Buf(&cb), KArg::Buf(&d)])
    });
}
