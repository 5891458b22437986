//! Occupancy without a GPU: how many blocks of a kernel fit on one SM, from its registers, shared
//! memory and barriers (ptxas's report) and its launch block (the launch code), by the rules of
//! NVIDIA's occupancy calculator (`cuda_occupancy.h`, CUDA 12: `cudaOccMaxActiveBlocksPerMultiprocessor`):
//!
//! - warps: `max_warps_per_sm / ceil(threads / 32)`;
//! - registers: each warp gets `regs x 32` rounded up to 256; each of the 4 sub-partitions holds
//!   `(regs_per_sm / 4) / regs_per_warp` warps; a block whose warps (rounded up to a multiple of 4)
//!   need more than 64K registers cannot launch;
//! - shared memory: per block `static + dynamic + 1 KB reserved` (sm_80 and up) rounded up to 128
//!   bytes, against the SM's shared memory at the default carveout (the maximum); more than the
//!   per-block limit (48 KB, or the opt-in limit, which the launch code requests above 48 KB)
//!   cannot launch;
//! - blocks: the SM's resident-block limit;
//! - barriers (sm_90 and up): `2 x max_blocks / barriers per block`.
use std::fmt;

use crate::gpu::nvrtc::KernelReport;

/// The per-SM resources of one architecture (CUDA C++ Programming Guide, "Compute Capabilities").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmLimits {
    pub arch: &'static str,
    pub max_threads_per_sm: u32,
    pub max_threads_per_block: u32,
    pub max_blocks_per_sm: u32,
    pub regs_per_sm: u32,
    pub regs_per_block: u32,
    pub max_regs_per_thread: u32,
    /// Bytes of shared memory per SM at the maximum carveout.
    pub smem_per_sm: u32,
    /// Per block without opting in, and the opt-in maximum.
    pub smem_per_block: u32,
    pub smem_per_block_optin: u32,
    /// Reserved by the driver for every block (sm_80 and up).
    pub smem_reserved_per_block: u32,
    /// Whether block barriers limit residency (sm_90 and up).
    pub barrier_limited: bool,
}

const WARP: u32 = 32;
const REG_ALLOC_UNIT: u32 = 256;
const SUB_PARTITIONS: u32 = 4;
const SMEM_ALLOC_UNIT: u32 = 128;
const KB: u32 = 1024;

const SM80: SmLimits = SmLimits {
    arch: "sm_80",
    max_threads_per_sm: 2048,
    max_threads_per_block: 1024,
    max_blocks_per_sm: 32,
    regs_per_sm: 65536,
    regs_per_block: 65536,
    max_regs_per_thread: 255,
    smem_per_sm: 164 * KB,
    smem_per_block: 48 * KB,
    smem_per_block_optin: 163 * KB,
    smem_reserved_per_block: KB,
    barrier_limited: false,
};

/// The limits of `arch` ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"), or None when this
/// table does not know it.
pub fn limits(arch: &str) -> Option<SmLimits> {
    let l = match arch {
        "sm_80" => SM80,
        // GA10x and AD10x: 1536 threads, 100 KB of shared memory per SM (99 KB per block).
        "sm_86" | "sm_89" => SmLimits {
            arch: if arch == "sm_86" { "sm_86" } else { "sm_89" },
            max_threads_per_sm: 1536,
            max_blocks_per_sm: if arch == "sm_86" { 16 } else { 24 },
            smem_per_sm: 100 * KB,
            smem_per_block_optin: 99 * KB,
            ..SM80
        },
        "sm_90" | "sm_90a" => SmLimits {
            arch: if arch == "sm_90" { "sm_90" } else { "sm_90a" },
            smem_per_sm: 228 * KB,
            smem_per_block_optin: 227 * KB,
            barrier_limited: true,
            ..SM80
        },
        _ => return None,
    };
    Some(l)
}

/// What a kernel needs per thread and per block, from ptxas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelNeeds {
    pub registers: u32,
    pub static_smem: u32,
    pub barriers: u32,
}

/// What limits residency (several when they tie).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    Warps,
    Registers,
    SharedMemory,
    Blocks,
    Barriers,
}

impl fmt::Display for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limiter::Warps => "warps",
            Limiter::Registers => "regs",
            Limiter::SharedMemory => "smem",
            Limiter::Blocks => "blocks",
            Limiter::Barriers => "barriers",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub blocks_per_sm: u32,
    pub warps_per_sm: u32,
    pub max_warps_per_sm: u32,
    /// Registers and shared memory one block is allocated.
    pub regs_per_block: u32,
    pub smem_per_block: u32,
    pub limiters: Vec<Limiter>,
}

impl Occupancy {
    /// Resident warps as a percentage of the SM's maximum.
    pub fn percent(&self) -> f64 {
        100.0 * self.warps_per_sm as f64 / self.max_warps_per_sm as f64
    }

    pub fn limiter_names(&self) -> String {
        self.limiters.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("+")
    }
}

fn round_up(x: u32, unit: u32) -> u32 {
    x.div_ceil(unit) * unit
}

fn warps_limit(l: &SmLimits, threads: u32, warps_per_block: u32) -> u32 {
    if threads > l.max_threads_per_block {
        return 0;
    }
    l.max_threads_per_sm / WARP / warps_per_block
}

/// (blocks, registers allocated per block)
fn regs_limit(l: &SmLimits, regs: u32, warps_per_block: u32) -> (u32, u32) {
    let per_warp = round_up(regs * WARP, REG_ALLOC_UNIT);
    let per_block = per_warp * warps_per_block;
    // The hardware check assumes every sub-partition gets the same number of warps.
    let assumed = per_warp * round_up(warps_per_block, SUB_PARTITIONS);
    if regs > l.max_regs_per_thread || per_block > l.regs_per_block || assumed > l.regs_per_block {
        return (0, per_block);
    }
    if per_warp == 0 {
        return (u32::MAX, 0);
    }
    let warps_per_sub = l.regs_per_sm / SUB_PARTITIONS / per_warp;
    (warps_per_sub * SUB_PARTITIONS / warps_per_block, per_block)
}

/// (blocks, shared memory allocated per block)
fn smem_limit(l: &SmLimits, static_smem: u32, dyn_smem: u32) -> (u32, u32) {
    let used = static_smem as u64 + dyn_smem as u64;
    let alloc = round_up((used + l.smem_reserved_per_block as u64).min(u32::MAX as u64 / 2) as u32, SMEM_ALLOC_UNIT);
    let per_block = if used > l.smem_per_block as u64 { l.smem_per_block_optin } else { l.smem_per_block };
    if alloc > per_block + l.smem_reserved_per_block {
        return (0, alloc);
    }
    (l.smem_per_sm.checked_div(alloc).unwrap_or(u32::MAX), alloc)
}

/// Resident blocks per SM of a kernel launched with `threads` per block and `dyn_smem` bytes of
/// dynamic shared memory. `blocks_per_sm == 0`: the launch cannot run on this architecture.
pub fn occupancy(l: &SmLimits, k: KernelNeeds, threads: u32, dyn_smem: u32) -> Occupancy {
    let warps_per_block = threads.div_ceil(WARP).max(1);
    let (by_regs, regs_per_block) = regs_limit(l, k.registers, warps_per_block);
    let (by_smem, smem_per_block) = smem_limit(l, k.static_smem, dyn_smem);
    let by_barriers = if l.barrier_limited && k.barriers > 0 { 2 * l.max_blocks_per_sm / k.barriers } else { u32::MAX };
    let limits = [
        (Limiter::Warps, warps_limit(l, threads, warps_per_block)),
        (Limiter::Registers, by_regs),
        (Limiter::SharedMemory, by_smem),
        (Limiter::Blocks, l.max_blocks_per_sm),
        (Limiter::Barriers, by_barriers),
    ];
    let blocks = limits.iter().map(|&(_, n)| n).min().unwrap_or(0);
    Occupancy {
        blocks_per_sm: blocks,
        warps_per_sm: blocks * warps_per_block,
        max_warps_per_sm: l.max_threads_per_sm / WARP,
        regs_per_block,
        smem_per_block,
        limiters: limits.iter().filter(|&&(_, n)| n == blocks).map(|&(w, _)| w).collect(),
    }
}

/// Threads per block and dynamic shared memory bytes `kernel` is launched with, from the constants
/// the launches use (forward ops, then training ops); None for a name not in `kernels::KERNELS`.
fn launch_block(kernel: &str) -> Option<(u32, u32)> {
    crate::gpu::ops::launch_block(kernel).or_else(|| crate::gpu::train_ops::launch_block(kernel))
}

/// The launch block (threads, dynamic shared memory) and occupancy of a reported kernel, when its
/// architecture and launch are known.
pub fn of_report(r: &KernelReport) -> Option<((u32, u32), Occupancy)> {
    let l = limits(&r.arch)?;
    let (threads, dyn_smem) = launch_block(&r.kernel)?;
    let needs = KernelNeeds { registers: r.registers, static_smem: r.smem_bytes, barriers: r.barriers };
    Some(((threads, dyn_smem), occupancy(&l, needs, threads, dyn_smem)))
}

/// The report as an aligned text table: ptxas's figures, then the launch block (threads, dynamic
/// shared memory) and the occupancy it gives on one SM (`occupancy`), "-" where unknown.
pub fn format_table(reports: &[KernelReport]) -> String {
    let kw = reports.iter().map(|r| r.kernel.len()).max().unwrap_or(0).max(6);
    let fw = reports.iter().map(|r| r.file.len()).max().unwrap_or(0).max(4);
    let mut s = format!(
        "{:<fw$} {:<kw$} {:<6} {:>4} {:>6} {:>6} {:>6} {:>4} {:>7} {:>6} {:>8} {:>5} limit\n",
        "file", "kernel", "arch", "regs", "spillS", "spillL", "smem", "bars", "threads", "blk/SM", "warps/SM", "occ%"
    );
    for r in reports {
        let occ = match of_report(r) {
            Some(((threads, dyn_smem), o)) => format!(
                "{:>7} {:>6} {:>8} {:>5.0} {}",
                if dyn_smem > 0 { format!("{threads}+{dyn_smem}B") } else { threads.to_string() },
                o.blocks_per_sm,
                format!("{}/{}", o.warps_per_sm, o.max_warps_per_sm),
                o.percent(),
                o.limiter_names()
            ),
            None => format!("{:>7} {:>6} {:>8} {:>5} -", "-", "-", "-", "-"),
        };
        s += &format!(
            "{:<fw$} {:<kw$} {:<6} {:>4} {:>6} {:>6} {:>6} {:>4} {occ}\n",
            r.file, r.kernel, r.arch, r.registers, r.spill_stores, r.spill_loads, r.smem_bytes, r.barriers
        );
    }
    s
}

#[cfg(test)]
mod tests {
    //! Each expected value is worked by hand from the rules in the module comment.
    use super::*;
    use Limiter::*;

    fn occ(arch: &str, regs: u32, static_smem: u32, barriers: u32, threads: u32, dyn_smem: u32) -> Occupancy {
        occupancy(&limits(arch).unwrap(), KernelNeeds { registers: regs, static_smem, barriers }, threads, dyn_smem)
    }

    fn check(o: &Occupancy, blocks: u32, warps: u32, limiters: &[Limiter]) {
        assert_eq!((o.blocks_per_sm, o.warps_per_sm), (blocks, warps), "{o:?}");
        assert_eq!(o.limiters, limiters, "{o:?}");
    }

    #[test]
    fn full_occupancy_at_32_registers() {
        // 32 x 32 = 1024 regs per warp; 16384 / 1024 = 16 warps per sub-partition, 64 per SM;
        // 8 warps per block -> 8 blocks by registers and by warps (64 / 8).
        let o = occ("sm_80", 32, 0, 1, 256, 0);
        check(&o, 8, 64, &[Warps, Registers]);
        assert_eq!(o.percent(), 100.0);
        assert_eq!(o.regs_per_block, 8192);
        assert_eq!(o.smem_per_block, 1024, "the reserved 1 KB alone");
    }

    #[test]
    fn register_granularity_rounds_per_warp() {
        // The tiled conv on sm_90: 56 regs -> 1792 per warp (7 x 256, no rounding);
        // 16384 / 1792 = 9 warps per sub-partition, 36 per SM, 36 / 8 = 4 blocks.
        // smem: 8448 + 1024 = 9472 (74 x 128), 233472 / 9472 = 24 blocks.
        let o = occ("sm_90", 56, 8448, 1, 256, 0);
        check(&o, 4, 32, &[Registers]);
        assert_eq!(o.percent(), 50.0);
        assert_eq!(o.smem_per_block, 9472);
        // 57 regs: 1824 -> 2048 per warp; 16384 / 2048 = 8 per sub-partition, 32 per SM, 4 blocks.
        check(&occ("sm_80", 57, 0, 0, 256, 0), 4, 32, &[Registers]);
        // 40 regs: 1280 per warp, 12 per sub-partition, 48 per SM, 6 blocks of 8 warps.
        check(&occ("sm_80", 40, 0, 0, 256, 0), 6, 48, &[Registers]);
        // 255 regs: 8160 -> 8192 per warp, 2 per sub-partition, 8 per SM: one 8-warp block.
        check(&occ("sm_90", 255, 0, 0, 256, 0), 1, 8, &[Registers]);
    }

    #[test]
    fn blocks_that_cannot_launch() {
        // 1024 threads x 64 regs = 65536: exactly one block (warps alone would allow 2);
        // 65 regs -> 2304 per warp x 32 warps > 64K: none.
        check(&occ("sm_80", 64, 0, 0, 1024, 0), 1, 32, &[Registers]);
        check(&occ("sm_80", 65, 0, 0, 1024, 0), 0, 0, &[Registers]);
        // 1056 threads: over the 1024-thread block limit.
        assert_eq!(occ("sm_90", 16, 0, 0, 1056, 0).blocks_per_sm, 0);
        // 3 warps x 255 regs: 3 x 8192 = 24576 allocated (the hardware check's 4 x 8192 = 32768 is
        // under 64K); 2 warps per sub-partition, 8 per SM -> 8 / 3 = 2 blocks.
        check(&occ("sm_80", 255, 0, 0, 96, 0), 2, 6, &[Registers]);
    }

    #[test]
    fn shared_memory_limits_and_opt_in() {
        // 100 KB dynamic: 102400 + 1024 = 103424 (808 x 128). sm_90: 233472 / 103424 = 2 blocks;
        // sm_80: 167936 / 103424 = 1 block. Registers (32: 16 blocks of 4 warps) and warps (16) do not bind.
        check(&occ("sm_90", 32, 0, 1, 128, 100 * KB), 2, 8, &[SharedMemory]);
        check(&occ("sm_80", 32, 0, 1, 128, 100 * KB), 1, 4, &[SharedMemory]);
        // The per-block opt-in maxima: 227 KB on sm_90 and 163 KB on sm_80 fit, one byte more does not.
        assert_eq!(occ("sm_90", 32, 0, 1, 128, 227 * KB).blocks_per_sm, 1);
        assert_eq!(occ("sm_90", 32, 0, 1, 128, 227 * KB + 1).blocks_per_sm, 0);
        assert_eq!(occ("sm_80", 32, 0, 1, 128, 163 * KB).blocks_per_sm, 1);
        assert_eq!(occ("sm_80", 32, 0, 1, 128, 164 * KB).blocks_per_sm, 0);
        // Granularity: 40000 static + 1024 = 41024 -> 41088 (321 x 128), 167936 / 41088 = 4;
        // 42000 + 1024 = 43024 -> 43136, 167936 / 43136 = 3.
        let o = occ("sm_80", 32, 40000, 1, 128, 0);
        assert_eq!((o.blocks_per_sm, o.smem_per_block), (4, 41088));
        assert_eq!(occ("sm_80", 32, 42000, 1, 128, 0).blocks_per_sm, 3);
        // sm_86: 100 KB per SM, 99 KB per block opt-in, 1536 threads.
        check(&occ("sm_86", 32, 0, 1, 128, 48 * KB), 2, 8, &[SharedMemory]);
        assert_eq!(occ("sm_86", 32, 0, 1, 128, 99 * KB + 1).blocks_per_sm, 0);
    }

    #[test]
    fn block_and_barrier_limits() {
        // One-warp blocks with few registers: 64 warps would fit, the SM holds 32 blocks (16 on sm_86).
        check(&occ("sm_90", 16, 0, 1, 32, 0), 32, 32, &[Blocks]);
        check(&occ("sm_86", 16, 0, 1, 32, 0), 16, 16, &[Blocks]);
        // sm_90 barrier rule: 2 x 32 / 4 barriers = 16 blocks; sm_80 has no such limit.
        check(&occ("sm_90", 16, 0, 4, 32, 0), 16, 16, &[Barriers]);
        check(&occ("sm_80", 16, 0, 4, 32, 0), 32, 32, &[Blocks]);
        // sm_89: 24 blocks, 48 warps.
        check(&occ("sm_89", 16, 0, 1, 32, 0), 24, 24, &[Blocks]);
        check(&occ("sm_89", 32, 0, 1, 256, 0), 6, 48, &[Warps]);
    }

    #[test]
    fn every_kernel_has_its_launch_block() {
        for name in crate::gpu::kernels::all_kernel_names() {
            assert!(launch_block(name).is_some(), "{name}: no launch block in ops::launch_block or train_ops::launch_block");
        }
        assert_eq!(launch_block("not_a_kernel"), None);
    }

    #[test]
    fn unknown_architectures_have_no_table() {
        assert!(limits("sm_100").is_none());
        assert_eq!(limits("sm_90a").unwrap().smem_per_sm, 228 * 1024);
    }
}
