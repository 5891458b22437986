//! The warpgroup MMA (wgmma.mma_async m64n64k16 f16 / bf16, m64n64k8 tf32; sm_90a) on the emulator
//! (kernels/testing/wgmma_checks.cu): operands laid out in shared memory by the host with the PTX
//! ISA's canonical K-major no-swizzle layout, the accumulator read back through CUTLASS's
//! CLayout_64xN, both written here independently of the emulator, against float64 products; every
//! planted bug fails the launch with a message naming it. On an sm_90 GPU the same kernel must
//! give the same exact products (`cuda_wgmma_matches_float64`, benches/gpu_check.sh).
mod common;

use deepis::error::Error;
use deepis::gpu::emu::{EmuDevice, Schedule};
use deepis::gpu::{from_half_bits, round_tf32, to_half_bits, DType, Device, KArg, LaunchCfg};

const SCHEDULES: [Schedule; 2] = [Schedule::Forward, Schedule::Reverse];
const KERNEL: &str = "wgmma_gemm";

/// (m, n) of accumulator register `i` of thread `t` of the warpgroup, from CUTLASS's
/// `CLayout_64xN` (cute/atom/mma_traits_sm90_gmma.hpp) evaluated as a CuTe layout: shape
/// ((4, 8, 4), (2, 2, N/8)), stride ((128, 1, 16), (64, 8, 512)) maps (thread, value) to
/// m + 64 n of the column-major 64 x N tile.
fn clayout(t: usize, i: usize) -> (usize, usize) {
    let idx = (t % 4) * 128 + (t / 4 % 8) + (t / 32) * 16 + (i % 2) * 64 + (i / 2 % 2) * 8 + (i / 4) * 512;
    (idx % 64, idx / 64)
}

/// The element index of (row r, k) in a K-major, no-swizzle operand of `es`-byte elements (PTX
/// ISA "Canonical Layouts": ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO)) with T = 16 / es elements,
/// the 128 bits of a core-matrix row; LBO and SBO in bytes here).
fn canonical(r: usize, k: usize, lbo: usize, sbo: usize, es: usize) -> usize {
    let t = 16 / es;
    (r % 8) * t + (r / 8) * (sbo / es) + k % t + (k / t) * (lbo / es)
}

/// One wgmma_gemm launch: A and B (64 x K each, row-major f32 values exact in `dtype`; F32: tf32
/// values), C (64 x 64).
struct Case {
    dtype: DType,
    ksteps: usize,
    /// (LBO, SBO) of A and of B, bytes.
    a: (usize, usize),
    b: (usize, usize),
    scale_d: bool,
    av: Vec<f32>,
    bv: Vec<f32>,
    cv: Vec<f32>,
}

/// Three placements of the 64 x 32 core-matrix grid: K-adjacent core matrices next to each other,
/// M-adjacent ones next to each other, and both apart with 16-byte gaps.
const LAYOUTS: [(usize, usize); 3] = [(128, 512), (1024, 128), (8 * 144 + 16, 144)];

fn ints(len: usize, r: i32, seed: u64) -> Vec<f32> {
    common::values(len, seed).iter().map(|v| (v * (r as f32 + 0.5)).round().clamp(-r as f32, r as f32)).collect()
}

impl Case {
    fn new(dtype: DType, ksteps: usize, a: (usize, usize), b: (usize, usize), scale_d: bool, exact: bool, seed: u64) -> Case {
        let k = 16 * ksteps;
        let vals = |len, s| if exact { ints(len, 3, s) } else { common::values(len, s) };
        let round = |v: Vec<f32>| match dtype {
            DType::F32 => v.into_iter().map(round_tf32).collect(),
            _ => from_half_bits(&to_half_bits(&v, dtype), dtype),
        };
        let mut av = round(vals(64 * k, seed));
        av[3] = 2.0; // A[0][3]: fault 4 writes 1.0 there, which must change it
        Case { dtype, ksteps, a, b, scale_d, av, bv: round(vals(64 * k, seed + 1)), cv: ints(64 * 64, 50, seed + 2) }
    }

    /// Bytes of one element: 2 (f16, bf16) or 4 (tf32).
    fn es(&self) -> usize {
        if self.dtype == DType::F32 { 4 } else { 2 }
    }

    /// K of the whole product: 32 bytes of each row per wgmma.
    fn k(&self) -> usize {
        32 / self.es() * self.ksteps
    }

    /// 16-bit words of one operand's placement (its last element + 1, rounded up to 16 bytes).
    fn extent(&self, (lbo, sbo): (usize, usize)) -> usize {
        ((canonical(63, self.k() - 1, lbo, sbo, self.es()) + 1) * self.es() / 2).div_ceil(8) * 8
    }

    /// The 16-bit words of `v` (tf32: two per value, the low one first).
    fn words(&self, v: &[f32]) -> Vec<u16> {
        match self.dtype {
            DType::F32 => v.iter().flat_map(|x| [x.to_bits() as u16, (x.to_bits() >> 16) as u16]).collect(),
            d => to_half_bits(v, d),
        }
    }

    /// The shared-memory image: A at word 0, B after it; the word offset of B.
    fn image(&self) -> (Vec<u16>, usize) {
        let b_off = self.extent(self.a);
        let mut img = vec![0u16; b_off + self.extent(self.b)];
        let (ab, bb) = (self.words(&self.av), self.words(&self.bv));
        let w = self.es() / 2;
        for r in 0..64 {
            for k in 0..self.k() {
                for h in 0..w {
                    img[canonical(r, k, self.a.0, self.a.1, self.es()) * w + h] = ab[(r * self.k() + k) * w + h];
                    img[b_off + canonical(r, k, self.b.0, self.b.1, self.es()) * w + h] = bb[(r * self.k() + k) * w + h];
                }
            }
        }
        (img, b_off)
    }

    /// Float64 D[m][n] = sum_k A[m][k] B[n][k] (+ C), and sum_k |A B| (+ |C|), row-major 64 x 64.
    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut d, mut mag) = (vec![0.0; 64 * 64], vec![0.0; 64 * 64]);
        for m in 0..64 {
            for n in 0..64 {
                let c = if self.scale_d { self.cv[m * 64 + n] as f64 } else { 0.0 };
                let (mut s, mut a) = (c, c.abs());
                for k in 0..self.k() {
                    let p = self.av[m * self.k() + k] as f64 * self.bv[n * self.k() + k] as f64;
                    s += p;
                    a += p.abs();
                }
                d[m * 64 + n] = s;
                mag[m * 64 + n] = a;
            }
        }
        (d, mag)
    }

    /// C in thread-register order.
    fn c_regs(&self) -> Vec<f32> {
        (0..128 * 32).map(|j| {
            let (m, n) = clayout(j / 32, j % 32);
            self.cv[m * 64 + n]
        }).collect()
    }

    /// Launches with `fault` on `dev` (block `threads`): `img` (B at word `b_off`) but its last
    /// `cut` words copied into shared memory of that size; the output in thread-register order.
    #[allow(clippy::too_many_arguments)]
    fn launch<D: Device>(&self, dev: &D, img: &[u16], b_off: usize, fault: i32, threads: u32, cut: usize) -> deepis::Result<Vec<f32>> {
        let img_buf = dev.htod_bits(img, DType::F16)?;
        let c = dev.htod(&self.c_regs())?;
        let out = dev.alloc_zeros(128 * 32)?;
        let i = |v: usize| KArg::I32(v as i32);
        let words = img.len() - cut;
        let args = [
            KArg::Buf(&img_buf), i(words), i(b_off), i(self.a.0), i(self.a.1), i(self.b.0), i(self.b.1), i(self.ksteps),
            i(match self.dtype { DType::F16 => 0, DType::BF16 => 1, DType::F32 => 2 }), KArg::Buf(&c), i(self.scale_d as usize), KArg::Buf(&out), KArg::I32(fault),
        ];
        let cfg = LaunchCfg { grid: [1, 1, 1], block: [threads, 1, 1], shmem: 2 * words as u32 };
        dev.launch(KERNEL, cfg, &args)?;
        dev.dtoh(&out)
    }

    fn run_with<D: Device>(&self, dev: &D, fault: i32, threads: u32) -> deepis::Result<Vec<f32>> {
        let (img, b_off) = self.image();
        self.launch(dev, &img, b_off, fault, threads, 0)
    }

    fn run<D: Device>(&self, dev: &D) -> deepis::Result<Vec<f32>> {
        self.run_with(dev, 0, 128)
    }

    /// Err names the first wrong element. Exact inputs must give the exact product; others are
    /// within (K + 2) 2^-24 of sum |a b| + |c| per element: the emulator rounds once, f32
    /// accumulation on a GPU at most once per product added and once for C (the same bound as the
    /// mma.sync tests; a layout bug is off by O(1) of the magnitude).
    fn check(&self, got: &[f32], exact: bool) -> Result<(), String> {
        let (want, mag) = self.reference();
        for j in 0..128 * 32 {
            let (m, n) = clayout(j / 32, j % 32);
            let (g, w) = (got[j] as f64, want[m * 64 + n]);
            let tol = if exact { 0.0 } else { (self.k() + 2) as f64 * 2f64.powi(-24) * mag[m * 64 + n] };
            if !((g - w).abs() <= tol) {
                return Err(format!(
                    "{:?} ksteps {} A {:?} B {:?} scale_d {}: thread {} register {} = D[{m}][{n}] = {g}, float64 {w} (tolerance {tol:e})",
                    self.dtype, self.ksteps, self.a, self.b, self.scale_d, j / 32, j % 32
                ));
            }
        }
        Ok(())
    }
}

#[test]
fn clayout_covers_the_64x64_tile_once() {
    let mut seen = vec![0u8; 64 * 64];
    for t in 0..128 {
        for i in 0..32 {
            let (m, n) = clayout(t, i);
            seen[m * 64 + n] += 1;
        }
    }
    assert!(seen.iter().all(|&c| c == 1));
    // Spot values of the PTX ISA figure ("WGMMA .m64nNk16 register fragment layout for
    // accumulator matrix D"): thread 0 holds D[0][0..1] in d0, d1 and D[8][0..1] in d2, d3;
    // thread 37 (warp 1, lane 5) holds D[17][2..3]; d4 of thread 0 is D[0][8].
    assert_eq!([clayout(0, 0), clayout(0, 1), clayout(0, 2), clayout(0, 3)], [(0, 0), (0, 1), (8, 0), (8, 1)]);
    assert_eq!((clayout(37, 0), clayout(37, 1)), ((17, 2), (17, 3)));
    assert_eq!(clayout(0, 4), (0, 8));
}

#[test]
fn wgmma_matches_float64_through_the_ptx_layouts() {
    let mut n = 0;
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (li, &la) in LAYOUTS.iter().enumerate() {
            let lb = LAYOUTS[(li + 1) % LAYOUTS.len()];
            for ksteps in [1, 2] {
                for scale_d in [false, true] {
                    for s in SCHEDULES {
                        let dev = EmuDevice::with_schedule(s);
                        for exact in [true, false] {
                            let case = Case::new(dtype, ksteps, la, lb, scale_d, exact, 7 + n as u64);
                            let got = case.run(&dev).unwrap_or_else(|e| panic!("{e}"));
                            case.check(&got, exact).unwrap_or_else(|e| panic!("{s:?}: {e}"));
                            n += 1;
                        }
                    }
                }
            }
        }
    }
    println!("{n} wgmma cases (f16, bf16 with K = 16, tf32 with K = 8, and chains of two; 3 operand placements; with and without C; both schedules): exact inputs exact, others within (K + 2) 2^-24 sum |a b|");
}

/// The kernel told another placement than the image has gives wrong products, not an error:
/// the check above can fail.
#[test]
fn a_misplaced_operand_gives_wrong_products() {
    let case = Case::new(DType::F16, 1, LAYOUTS[0], LAYOUTS[1], false, true, 3);
    let (img, b_off) = case.image();
    let swapped = Case { a: (case.a.1, case.a.0), ..Case::new(DType::F16, 1, LAYOUTS[0], LAYOUTS[1], false, true, 3) };
    let got = swapped.launch(&EmuDevice::new(), &img, b_off, 0, 128, 0).unwrap_or_else(|e| panic!("{e}"));
    let err = case.check(&got, true).expect_err("A described with LBO and SBO swapped must give wrong products");
    println!("{err}");
}

fn kernel_err(r: deepis::Result<Vec<f32>>) -> String {
    match r {
        Err(Error::Kernel { kernel, msg }) => {
            assert_eq!(kernel, KERNEL);
            msg
        }
        other => panic!("expected a kernel error, got {:?}", other.map(|v| v.len())),
    }
}

#[test]
fn planted_wgmma_bugs_are_caught() {
    let case = Case::new(DType::F16, 2, LAYOUTS[0], LAYOUTS[2], true, true, 11);
    let faults: [(i32, &[&str]); 9] = [
        (1, &["line", "made no wgmma_fence"]),
        (3, &["accumulator register 7 was written while the wgmma was in flight"]),
        (4, &["shared memory of its A operand was modified while it was in flight"]),
        (5, &["no fence.proxy.async"]),
        (6, &["descriptor A", "swizzled layout"]),
        (7, &["descriptor B", "reserved bit"]),
        (8, &["thread 5 of the warpgroup has other descriptors"]),
        (9, &["thread exits with 2 wgmma pending"]),
        (10, &["thread 96 of the warpgroup has exited"]),
    ];
    for (fault, want) in faults {
        for s in SCHEDULES {
            let msg = kernel_err(case.run_with(&EmuDevice::with_schedule(s), fault, 128));
            println!("fault {fault} ({s:?}): {msg}");
            for w in want {
                assert!(msg.contains(w), "fault {fault} {s:?}: {w:?} not in {msg:?}");
            }
        }
    }
    // Accumulators read before the wait hold the poison (a NaN), and nothing fails: a test of
    // the values (as above) catches it.
    let got = case.run_with(&EmuDevice::new(), 2, 128).unwrap();
    assert!(got.iter().all(|v| v.is_nan()), "accumulators read in flight must be NaN");
    // Shared memory 8 words short of the image: B's last elements lie past its end.
    let (img, b_off) = case.image();
    let msg = kernel_err(case.launch(&EmuDevice::new(), &img, b_off, 0, 128, 8));
    assert!(msg.contains("out-of-bounds access: wgmma") && msg.contains("B element (63, "), "{msg}");
    // A block that is not whole warpgroups.
    let msg = kernel_err(case.run_with(&EmuDevice::new(), 0, 96));
    assert!(msg.contains("not whole warpgroups"), "{msg}");
    // tf32: an operand in shared memory that is not a tf32 value.
    let tf = Case::new(DType::F32, 1, LAYOUTS[0], LAYOUTS[1], false, true, 12);
    let msg = kernel_err(tf.run_with(&EmuDevice::new(), 11, 128));
    assert!(msg.contains("wgmma .tf32") && msg.contains("A element (0, 0)") && msg.contains("not a tf32 value"), "{msg}");
    println!("every planted wgmma bug failed its launch with its message");
}

/// Needs an sm_90 GPU (skips with the reason otherwise): the same kernel on CUDA gives the exact
/// products of exact inputs, bit for bit the emulator's, and the inexact ones within the bound.
#[test]
fn cuda_wgmma_matches_float64() {
    let Some(mut cuda) = common::cuda_device_or_skip() else { return };
    if !cuda.has_wgmma() {
        common::skip(&format!("{}: no wgmma (needs sm_90)", cuda.name()));
        return;
    }
    let src = include_str!("../kernels/testing/wgmma_checks.cu");
    cuda.load_source("testing/wgmma_checks.cu", src, &[KERNEL]).unwrap_or_else(|e| panic!("{e}"));
    let emu = EmuDevice::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (li, &la) in LAYOUTS.iter().enumerate() {
            for ksteps in [1, 2] {
                for exact in [true, false] {
                    let case = Case::new(dtype, ksteps, la, LAYOUTS[(li + 2) % 3], true, exact, 40 + li as u64);
                    let got = case.run(&cuda).unwrap_or_else(|e| panic!("{e}"));
                    case.check(&got, exact).unwrap_or_else(|e| panic!("{}: {e}", cuda.name()));
                    if exact {
                        assert!(common::same_bits(&got, &case.run(&emu).unwrap()), "cuda and emu differ on exact inputs");
                    }
                }
            }
        }
    }
    println!("{}: wgmma m64n64k16 (f16, bf16) and m64n64k8 (tf32), 3 placements, one and two steps, match float64 and the emulator", cuda.name());
}
