//! The kernel emulator behaves like a GPU (barriers, shared memory, warp collectives, atomics, both
//! thread schedules agree on correct kernels) and its checks fail when they should (a race shows as
//! Forward != Reverse, out-of-bounds indices, barriers in divergent code). Kernels: kernels/testing/emu_checks.cu.
use std::time::Instant;

use deepis::error::Error;
use deepis::gpu::emu::{host_build_failures, kernel_file, kernel_names, EmuBuf, EmuDevice, Schedule};
use deepis::gpu::{Device, KArg, LaunchCfg};

const SCHEDULES: [Schedule; 2] = [Schedule::Forward, Schedule::Reverse];

fn cfg(grid: u32, block: u32, shmem: u32) -> LaunchCfg {
    LaunchCfg { grid: [grid, 1, 1], block: [block, 1, 1], shmem }
}

fn data(n: usize) -> Vec<f32> {
    // Small integers: float sums are exact in any order.
    (0..n).map(|i| ((i * 37 + 11) % 23) as f32 - 11.0).collect()
}

fn kernel_err(r: deepis::Result<()>) -> (String, String) {
    match r {
        Err(Error::Kernel { kernel, msg }) => (kernel, msg),
        other => panic!("expected a kernel error, got {other:?}"),
    }
}

fn bits(v: &[f32]) -> Vec<i32> {
    v.iter().map(|f| f.to_bits() as i32).collect()
}

#[test]
fn every_kernel_builds_for_the_host() {
    assert!(host_build_failures().is_empty(), "not compiled for the host: {:?}", host_build_failures());
    assert!(kernel_names().contains(&"emu_block_sum"));
    assert_eq!(kernel_file("emu_block_sum"), Some("kernels/testing/emu_checks.cu"));
    println!("{} emulated kernels: {:?}", kernel_names().len(), kernel_names());
}

#[test]
fn block_reduction_with_barriers() {
    let n = 256 * 7 + 100;
    let x = data(n);
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let xb = dev.htod(&x).unwrap();
        let out = dev.alloc_zeros(8).unwrap();
        dev.launch("emu_block_sum", cfg(8, 256, 0), &[KArg::Buf(&xb), KArg::Buf(&out), KArg::I32(n as i32)]).unwrap();
        let got = dev.dtoh(&out).unwrap();
        let want: Vec<f32> = x.chunks(256).map(|c| c.iter().sum()).collect();
        assert_eq!(got, want, "{s:?}");
    }
}

#[test]
fn missing_barrier_is_caught_as_a_race() {
    let n = 256 * 4;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 + 1.0).collect();
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let xb = dev.htod(&x).unwrap();
        let out = dev.alloc_zeros(4).unwrap();
        let r = dev.launch("emu_block_sum_nosync", cfg(4, 256, 0), &[KArg::Buf(&xb), KArg::Buf(&out), KArg::I32(n)]);
        let (k, msg) = kernel_err(r);
        println!("{k} ({s:?}): {msg}");
        assert_eq!(k, "emu_block_sum_nosync");
        assert!(msg.contains("race (no __syncthreads between") && msg.contains("static shared `s` byte"), "{msg}");
    }
}

#[test]
fn warp_shuffle_reductions_and_scan() {
    let n = 128 * 3;
    let x = data(n);
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let xb = dev.htod(&x).unwrap();
        let (a, b) = (dev.alloc_zeros(n / 32).unwrap(), dev.alloc_zeros(n / 32).unwrap());
        dev.launch("emu_warp_sum", cfg(3, 128, 0), &[KArg::Buf(&xb), KArg::Buf(&a), KArg::Buf(&b)]).unwrap();
        let want: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
        assert_eq!(dev.dtoh(&a).unwrap(), want, "xor {s:?}");
        assert_eq!(dev.dtoh(&b).unwrap(), want, "down {s:?}");

        let y = dev.alloc_zeros(n).unwrap();
        dev.launch("emu_warp_scan", cfg(6, 64, 0), &[KArg::Buf(&xb), KArg::Buf(&y)]).unwrap();
        let got = dev.dtoh(&y).unwrap();
        for (w, c) in x.chunks(32).enumerate() {
            let mut acc = 0.0;
            for (l, v) in c.iter().enumerate() {
                acc += v;
                let want = if l == 0 { acc + 1000.0 * c.iter().sum::<f32>() } else { acc };
                assert_eq!(got[w * 32 + l], want, "scan warp {w} lane {l} {s:?}");
            }
        }
    }
}

#[test]
fn warp_votes() {
    let x: Vec<f32> = (0..128).map(|i| if i < 32 { 1.0 } else if i < 64 { -1.0 } else if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
    let dev = EmuDevice::new();
    let xb = dev.htod(&x).unwrap();
    let out = dev.alloc_zeros(12).unwrap();
    dev.launch("emu_warp_vote", cfg(2, 64, 0), &[KArg::Buf(&xb), KArg::Buf(&out)]).unwrap();
    let got = bits(&dev.dtoh(&out).unwrap());
    let mut want = vec![];
    for c in x.chunks(32) {
        let b = c.iter().enumerate().fold(0u32, |m, (l, v)| if *v > 0.0 { m | 1 << l } else { m });
        want.extend([b as i32, (b != 0) as i32, (b == u32::MAX) as i32]);
    }
    assert_eq!(got, want);
}

#[test]
fn atomics_from_many_blocks() {
    let n = 100_003;
    let x = data(n);
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s).threads(4);
        let xb = dev.htod(&x).unwrap();
        let sum = dev.alloc_zeros(1).unwrap();
        let imax = dev.htod(&[f32::from_bits(i32::MIN as u32)]).unwrap();
        let count = dev.alloc_zeros(1).unwrap();
        let imin = dev.htod(&[f32::from_bits(i32::MAX as u32)]).unwrap();
        let args = [KArg::Buf(&xb), KArg::Buf(&sum), KArg::Buf(&imax), KArg::Buf(&count), KArg::Buf(&imin), KArg::I32(n as i32)];
        dev.launch("emu_atomics", LaunchCfg::linear(n, 128), &args).unwrap();
        assert_eq!(dev.dtoh(&sum).unwrap()[0], x.iter().sum::<f32>(), "{s:?}");
        assert_eq!(bits(&dev.dtoh(&imax).unwrap())[0], 11, "{s:?}");
        assert_eq!(bits(&dev.dtoh(&imin).unwrap())[0], -11, "{s:?}");
        assert_eq!(bits(&dev.dtoh(&count).unwrap())[0], n as i32, "{s:?}");
    }
}

#[test]
fn dynamic_shared_memory() {
    let n = 1000;
    let x = data(n);
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let xb = dev.htod(&x).unwrap();
        let y = dev.alloc_zeros(n).unwrap();
        let run = |shmem| dev.launch("emu_dyn_smem_reverse", cfg(8, 128, shmem), &[KArg::Buf(&xb), KArg::Buf(&y), KArg::I32(n as i32)]);
        run(128 * 4).unwrap();
        let got = dev.dtoh(&y).unwrap();
        for (i, g) in got.iter().enumerate() {
            let (b, t) = (i / 128, i % 128);
            let src = b * 128 + 127 - t;
            assert_eq!(*g, if src < n { x[src] } else { 0.0 }, "y[{i}] {s:?}");
        }
        // A launch with too little dynamic shared memory is caught.
        let (k, msg) = kernel_err(run(64 * 4));
        assert_eq!(k, "emu_dyn_smem_reverse");
        assert!(msg.contains("out-of-bounds access: dynamic shared memory index") && msg.contains("length 64"), "{msg}");
    }
}

#[test]
fn off_by_one_index_is_caught() {
    let n = 1000;
    let dev = EmuDevice::new();
    let (x, y): (EmuBuf, EmuBuf) = (dev.htod(&data(n)).unwrap(), dev.alloc_zeros(n).unwrap());
    let (k, msg) = kernel_err(dev.launch("emu_copy_off_by_one", LaunchCfg::linear(n + 1, 128), &[KArg::Buf(&x), KArg::Buf(&y), KArg::I32(n as i32)]));
    println!("{k}: {msg}");
    assert_eq!(k, "emu_copy_off_by_one");
    assert!(msg.contains("out-of-bounds access: argument 0 index 1000, length 1000"), "{msg}");
    assert!(msg.contains("block (7,0,0) thread (104,0,0)"), "{msg}");
}

#[test]
fn barrier_in_divergent_code_is_caught() {
    for s in SCHEDULES {
        let dev = EmuDevice::with_schedule(s);
        let y = dev.alloc_zeros(64).unwrap();
        let (k, msg) = kernel_err(dev.launch("emu_divergent_barrier", cfg(1, 64, 0), &[KArg::Buf(&y)]));
        println!("{k}: {msg}");
        assert_eq!(k, "emu_divergent_barrier");
        assert!(msg.contains("reached by 16 of 64 threads (48 exited)"), "{msg}");

        let (k, msg) = kernel_err(dev.launch("emu_divergent_shfl", cfg(1, 32, 0), &[KArg::Buf(&y)]));
        println!("{k}: {msg}");
        assert!(msg.contains("deadlock: __shfl_down_sync"), "{msg}");
    }
}

#[test]
fn different_barriers_are_caught_and_barrier_votes_count() {
    let dev = EmuDevice::new();
    let y = dev.alloc_zeros(64).unwrap();
    let (k, msg) = kernel_err(dev.launch("emu_mismatched_barriers", cfg(1, 64, 0), &[KArg::Buf(&y)]));
    println!("{k}: {msg}");
    assert!(msg.contains("threads wait at different barriers"), "{msg}");

    let x = data(96);
    let xb = dev.htod(&x).unwrap();
    let y = dev.alloc_zeros(96).unwrap();
    dev.launch("emu_sync_count", cfg(1, 96, 0), &[KArg::Buf(&xb), KArg::Buf(&y)]).unwrap();
    let c = x.iter().filter(|v| **v > 0.0).count() as f32;
    assert!(dev.dtoh(&y).unwrap().iter().all(|v| *v == c + 1000.0));
}

#[test]
fn launch_is_validated() {
    let dev = EmuDevice::new();
    let y = dev.alloc_zeros(64).unwrap();
    let (k, msg) = kernel_err(dev.launch("no_such_kernel", cfg(1, 32, 0), &[]));
    assert_eq!(k, "no_such_kernel");
    assert!(msg.contains("unknown kernel"), "{msg}");
    let bad = [
        (cfg(1, 2048, 0), "1..=1024"),
        (LaunchCfg { grid: [1, 1, 1], block: [32, 32, 2], shmem: 0 }, "2048 threads"),
        (cfg(0, 32, 0), "grid"),
        (cfg(1, 32, 228 * 1024), "dynamic shared memory"),
    ];
    for (c, want) in bad {
        let (_, msg) = kernel_err(dev.launch("emu_divergent_barrier", c, &[KArg::Buf(&y)]));
        assert!(msg.contains(want), "{c:?}: {msg}");
    }
    let (_, msg) = kernel_err(dev.launch("emu_divergent_barrier", cfg(1, 32, 0), &[]));
    assert!(msg.contains("takes 1 arguments"), "{msg}");
    let (_, msg) = kernel_err(dev.launch("emu_block_sum", cfg(1, 256, 0), &[KArg::Buf(&y), KArg::Buf(&y), KArg::F32(1.0)]));
    assert!(msg.contains("argument 2 must be an int"), "{msg}");
    assert_eq!(dev.name(), "emu");
}

/// A captured graph (`Device::capture`, a CUDA graph on a GPU) runs nothing while recording, holds
/// its buffers by reference (a replay sees what was copied in since), replays in order, and refuses
/// what a graph cannot hold: a copy, an allocation, a synchronisation; a bad launch is refused
/// when recorded, not at the replay.
#[test]
fn graph_capture_records_launches_and_replays_them() {
    let dev = EmuDevice::new();
    let n: usize = 256 * 3 + 5;
    let second = (4 * n).div_ceil(64) * 64;
    let arena = dev.alloc_arena(second + 4 * n).unwrap();
    let x = dev.region(&arena, 0, n, deepis::gpu::DType::F32).unwrap();
    let y = dev.region(&arena, second, n, deepis::gpu::DType::F32).unwrap();
    let relu = |dst: &EmuBuf, src: &EmuBuf| dev.launch("relu_f32", LaunchCfg::linear(n, 256), &[KArg::Buf(dst), KArg::Buf(src), KArg::I32(n as i32)]);
    // y = relu(x), then x = relu(y) - a graph of two launches in order
    let graph = dev.capture(&mut || relu(&y, &x).and_then(|()| relu(&x, &y))).unwrap();
    assert_eq!(graph.len(), 2);
    let first = data(n);
    dev.htod_into(&first, &x).unwrap();
    assert_eq!(dev.dtoh(&y).unwrap(), vec![0.0; n], "recording ran a kernel");
    for round in 0..2 {
        let input: Vec<f32> = first.iter().map(|v| v * (1.0 - 2.0 * round as f32)).collect();
        dev.htod_into(&input, &x).unwrap();
        dev.replay(&graph).unwrap();
        let want: Vec<f32> = input.iter().map(|v| v.max(0.0)).collect();
        assert_eq!(dev.dtoh(&y).unwrap(), want, "round {round}: the replay did not read the new input");
        assert_eq!(dev.dtoh(&x).unwrap(), want, "round {round}: the second launch did not follow the first");
    }
    let host = vec![1.0f32; n];
    let refused: [(&str, &mut dyn FnMut() -> deepis::Result<()>); 4] = [
        ("a copy to the device", &mut || dev.htod_into(&host, &x)),
        ("a copy to the host", &mut || dev.dtoh(&x).map(drop)),
        ("an allocation", &mut || dev.alloc_zeros(4).map(drop)),
        ("a synchronisation", &mut || relu(&y, &x).and_then(|()| dev.synchronize())),
    ];
    for (what, body) in refused {
        let msg = dev.capture(body).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains(what) && msg.contains("while capturing a graph"), "{what}: {msg}");
    }
    let (_, msg) = kernel_err(dev.capture(&mut || relu(&y, &x).and_then(|()| dev.launch("relu_f32", cfg(1, 2048, 0), &[]))).map(drop));
    assert!(msg.contains("1..=1024"), "{msg}");
    // after a refused capture the device is out of capture mode
    dev.htod_into(&host, &x).unwrap();
}

/// 65,536 threads (256 blocks of 256), 2 barriers per round: prints the emulator's speed.
#[test]
fn throughput() {
    let (blocks, block) = (256u32, 256u32);
    let n = (blocks * block) as usize;
    for (rounds, threads) in [(5, 0), (5, 1), (0, 0)] {
        let dev = EmuDevice::new().threads(threads);
        let y = dev.alloc_zeros(n).unwrap();
        let run = || dev.launch("emu_bench_barriers", cfg(blocks, block, 0), &[KArg::Buf(&y), KArg::I32(rounds)]).unwrap();
        run();
        let t = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            run();
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        let switches = n as f64 * (2.0 * rounds as f64 + 1.0);
        println!(
            "emu throughput: {n} threads x {} barriers, {} OS threads: {:.1} ms per launch, {:.1} M thread-resumes/s",
            2 * rounds,
            if threads == 0 { "default".to_string() } else { threads.to_string() },
            dt * 1e3,
            switches / dt / 1e6
        );
        if rounds > 0 {
            let got = dev.dtoh(&y).unwrap();
            // After r rounds thread t of a block holds (block start + (t + r) % 256) + r.
            for i in [0usize, 255, 256 * 17 + 3, n - 1] {
                let (b, t) = (i / 256, i % 256);
                assert_eq!(got[i], (b * 256 + (t + rounds as usize) % 256) as f32 + rounds as f32);
            }
        }
    }
}
