//! The emulator's order check of its queues (compute, upload, download) and the host: every
//! conflicting pair of accesses (same bytes, one a write) on two agents must be ordered by events,
//! or the operation that comes second fails, naming both. The cases are the orders the GPU plan's
//! pipelined run relies on (tests/gpu_plan.rs runs the plan itself), each shown to fail without its
//! wait and to pass, with the right values, with it.
mod common;
use deepis::gpu::emu::EmuDevice;
use deepis::gpu::{Device, KArg, LaunchCfg, Queue};

const N: usize = 256;

fn x() -> Vec<f32> {
    (0..N).map(|i| i as f32 - 100.0).collect()
}

/// y = x reversed within each block of 128 (reads x, `gptr<const float>`; writes y).
fn reverse(dev: &EmuDevice, x: &deepis::gpu::emu::EmuBuf, y: &deepis::gpu::emu::EmuBuf) -> deepis::Result<()> {
    let cfg = LaunchCfg { grid: [2, 1, 1], block: [128, 1, 1], shmem: 128 * 4 };
    dev.launch("emu_dyn_smem_reverse", cfg, &[KArg::Buf(x), KArg::Buf(y), KArg::I32(N as i32)])
}

fn reversed(x: &[f32]) -> Vec<f32> {
    x.chunks(128).flat_map(|c| c.iter().rev().copied()).collect()
}

fn unordered(r: deepis::Result<impl std::fmt::Debug>, what: &str) -> String {
    let msg = match r {
        Err(e) => e.to_string(),
        Ok(v) => panic!("{what}: expected an unordered-access error, got Ok({v:?})"),
    };
    assert!(msg.contains("unordered access"), "{what}: {msg}");
    println!("{what}: {msg}");
    msg
}

/// Device buffers made and zeroed (on the compute queue), and the host synchronised after.
fn setup(dev: &EmuDevice) -> (deepis::gpu::emu::EmuPinned, deepis::gpu::emu::EmuBuf, deepis::gpu::emu::EmuBuf, deepis::gpu::emu::EmuPinned) {
    let (a, b) = (dev.alloc_zeros(N).unwrap(), dev.alloc_zeros(N).unwrap());
    dev.synchronize().unwrap();
    let mut pin = dev.alloc_pinned(N).unwrap();
    dev.pinned_mut(&mut pin).unwrap().copy_from_slice(&x());
    (pin, a, b, dev.alloc_pinned(N).unwrap())
}

#[test]
fn a_kernel_reading_an_upload_must_wait_for_it() {
    let dev = EmuDevice::new();
    let (mut pin, a, b, _) = setup(&dev);
    dev.upload(&mut pin, &a).unwrap();
    let msg = unordered(reverse(&dev, &a, &b), "kernel after an upload, no wait");
    assert!(msg.contains("emu_dyn_smem_reverse (the compute queue) reads") && msg.contains("an upload (the upload queue) wrote"), "{msg}");

    let dev = EmuDevice::new();
    let (mut pin, a, b, _) = setup(&dev);
    dev.upload(&mut pin, &a).unwrap();
    dev.wait(Queue::Compute, &dev.record(Queue::Upload).unwrap()).unwrap();
    reverse(&dev, &a, &b).unwrap();
    assert_eq!(dev.dtoh(&b).unwrap(), reversed(&x()));
}

#[test]
fn a_download_of_a_kernel_output_must_wait_for_it() {
    let dev = EmuDevice::new();
    let (_, a, b, mut out) = setup(&dev);
    reverse(&dev, &a, &b).unwrap();
    let msg = unordered(dev.download(&b, &mut out), "download after a kernel, no wait");
    assert!(msg.contains("a download (the download queue) reads") && msg.contains("emu_dyn_smem_reverse (the compute queue) wrote"), "{msg}");

    // And a kernel may not overwrite what a download still reads.
    let dev = EmuDevice::new();
    let (_, a, b, mut out) = setup(&dev);
    dev.download(&a, &mut out).unwrap();
    unordered(reverse(&dev, &b, &a), "kernel overwriting a buffer being downloaded");
}

#[test]
fn the_host_reads_a_download_only_after_waiting_for_it() {
    let dev = EmuDevice::new();
    let (mut pin, a, b, mut out) = setup(&dev);
    dev.upload(&mut pin, &a).unwrap();
    dev.wait(Queue::Compute, &dev.record(Queue::Upload).unwrap()).unwrap();
    reverse(&dev, &a, &b).unwrap();
    dev.wait(Queue::Download, &dev.record(Queue::Compute).unwrap()).unwrap();
    dev.download(&b, &mut out).unwrap();
    let done = dev.record(Queue::Download).unwrap();
    unordered(dev.pinned_ref(&out).map(|s| s.len()), "host read of a download, no wait");
    dev.host_wait(&done).unwrap();
    assert_eq!(dev.pinned_ref(&out).unwrap(), reversed(&x()).as_slice());
}

#[test]
fn the_host_refills_pinned_memory_only_after_its_upload() {
    let dev = EmuDevice::new();
    let (mut pin, a, _, _) = setup(&dev);
    dev.upload(&mut pin, &a).unwrap();
    let up = dev.record(Queue::Upload).unwrap();
    // Reading it is no conflict (both read); writing it is.
    assert_eq!(dev.pinned_ref(&pin).unwrap().len(), N);
    let msg = unordered(dev.pinned_mut(&mut pin).map(|s| s.len()), "host write of pinned memory being uploaded");
    assert!(msg.contains("a host write of pinned memory (the host) writes") && msg.contains("an upload (the upload queue) read"), "{msg}");
    dev.host_wait(&up).unwrap();
    dev.pinned_mut(&mut pin).unwrap().fill(1.0);
}

#[test]
fn an_upload_into_a_new_allocation_waits_for_its_zeroing() {
    let dev = EmuDevice::new();
    let a = dev.alloc_zeros(N).unwrap();
    let mut pin = dev.alloc_pinned(N).unwrap();
    unordered(dev.upload(&mut pin, &a), "upload into a buffer still being zeroed");
    dev.synchronize().unwrap();
    dev.upload(&mut pin, &a).unwrap();
}

#[test]
fn orders_chain_through_queues_and_the_host() {
    // The plan's slot reuse: upload -> forward -> download -> host wait; after that chain the host
    // may refill the pinned input and upload into the same device input, and the compute queue
    // may overwrite the output the download read, with no further event.
    let dev = EmuDevice::new();
    let (mut pin, a, b, mut out) = setup(&dev);
    for round in 0..3 {
        let host = dev.pinned_mut(&mut pin).unwrap();
        host.iter_mut().enumerate().for_each(|(i, v)| *v = (i + round) as f32);
        dev.upload(&mut pin, &a).unwrap();
        dev.wait(Queue::Compute, &dev.record(Queue::Upload).unwrap()).unwrap();
        reverse(&dev, &a, &b).unwrap();
        dev.wait(Queue::Download, &dev.record(Queue::Compute).unwrap()).unwrap();
        dev.download(&b, &mut out).unwrap();
        dev.host_wait(&dev.record(Queue::Download).unwrap()).unwrap();
        let want: Vec<f32> = reversed(&(0..N).map(|i| (i + round) as f32).collect::<Vec<_>>());
        assert_eq!(dev.pinned_ref(&out).unwrap(), want.as_slice(), "round {round}");
    }
    // Without the host's wait the chain is broken: the next upload's refill races the last one.
    dev.upload(&mut pin, &a).unwrap();
    unordered(dev.pinned_mut(&mut pin).map(|s| s.len()), "refill with the chain broken");
}

#[test]
fn disjoint_regions_of_one_arena_do_not_conflict() {
    let dev = EmuDevice::new();
    let arena = dev.alloc_arena(4 * 2 * N).unwrap();
    let lo = dev.region(&arena, 0, N, deepis::gpu::DType::F32).unwrap();
    let hi = dev.region(&arena, 4 * N, N, deepis::gpu::DType::F32).unwrap();
    dev.synchronize().unwrap();
    let mut pin = dev.alloc_pinned(N).unwrap();
    dev.pinned_mut(&mut pin).unwrap().copy_from_slice(&x());
    dev.upload(&mut pin, &lo).unwrap();
    dev.wait(Queue::Compute, &dev.record(Queue::Upload).unwrap()).unwrap();
    reverse(&dev, &lo, &hi).unwrap();
    // The next upload into `lo` conflicts with the kernel's read of it, not with its write of `hi`...
    unordered(dev.upload(&mut pin, &lo), "upload into a region a kernel reads");
    // ...and a download of `hi` with the kernel's write of it, at hi's bytes of the arena.
    let mut out = dev.alloc_pinned(N).unwrap();
    let msg = unordered(dev.download(&hi, &mut out), "download of a region a kernel writes");
    assert!(msg.contains(&format!("bytes {}..{}", 4 * N, 8 * N)), "{msg}");
}

/// On a real GPU: many rounds of upload -> ReLU -> download through two pinned buffer pairs, each
/// ordered only by events (the plan's pipeline in small), every round's values checked. A wait
/// the GPU does not honour shows as a round with its neighbour's values.
#[test]
fn cuda_copies_on_their_queues_carry_each_rounds_values() {
    let Some(dev) = common::cuda_device_or_skip() else { return };
    rounds_through_two_slots(&dev, 1 << 20);
}

/// The same rounds on the emulator, where each order is also checked.
#[test]
fn copies_on_their_queues_carry_each_rounds_values() {
    rounds_through_two_slots(&EmuDevice::new(), 1000);
}

fn rounds_through_two_slots<D: Device>(dev: &D, n: usize) {
    let bufs: Vec<_> = (0..2).map(|_| (dev.alloc_zeros(n).unwrap(), dev.alloc_zeros(n).unwrap())).collect();
    dev.synchronize().unwrap();
    let mut pins: Vec<_> = (0..2).map(|_| (dev.alloc_pinned(n).unwrap(), dev.alloc_pinned(n).unwrap(), None)).collect();
    let value = |round: usize, i: usize| ((i * 7 + round * 13) % 101) as f32 - 50.0;
    let check = |round: usize, got: &[f32]| {
        let bad = (0..n).find(|&i| got[i] != value(round, i).max(0.0));
        assert!(bad.is_none(), "round {round}: element {bad:?} is {} (want {})", got[bad.unwrap()], value(round, bad.unwrap()).max(0.0));
    };
    let rounds = 12;
    for round in 0..rounds + 1 {
        if round >= 1 {
            let (_, out, done) = &pins[(round - 1) % 2];
            dev.host_wait(done.as_ref().unwrap()).unwrap();
            check(round - 1, dev.pinned_ref(out).unwrap());
        }
        if round == rounds {
            break;
        }
        let ((x, y), (pin, out, done)) = (&bufs[round % 2], &mut pins[round % 2]);
        dev.pinned_mut(pin).unwrap().iter_mut().enumerate().for_each(|(i, v)| *v = value(round, i));
        dev.upload(pin, x).unwrap();
        dev.wait(Queue::Compute, &dev.record(Queue::Upload).unwrap()).unwrap();
        dev.launch("relu_f32", LaunchCfg::linear(n, 256), &[KArg::Buf(y), KArg::Buf(x), KArg::I32(n as i32)]).unwrap();
        dev.wait(Queue::Download, &dev.record(Queue::Compute).unwrap()).unwrap();
        dev.download(y, out).unwrap();
        *done = Some(dev.record(Queue::Download).unwrap());
    }
    println!("{rounds} rounds of {n} values through two slots on three streams, every value checked");
}

/// Every op of the network and of training declares the buffers it only reads `gptr<const T>`, so
/// the order check lets a download read an input while the op runs (what the GPU plan's pipelined
/// copies do) and still catches an unordered read of what the op writes. A kernel that took an
/// input as a writable `gptr<T>` would fail the first check below, naming the op and the kernel.
#[test]
fn ops_only_read_their_inputs() {
    use deepis::backend::{Backend, ConvSpec, DevTensor};
    use deepis::gpu::emu::EmuBuf;
    use deepis::gpu::ops::{ConvVariant, GpuBackend};
    use deepis::train::TrainBackend;
    use deepis::tensor::Shape;
    type Op<'a> = Box<dyn Fn(&GpuBackend<EmuDevice>) -> deepis::Result<EmuBuf> + 'a>;

    let shape = Shape::new(1, [4, 6, 5], 3);
    let value = |i: usize| ((i * 37 % 29) as f32 - 14.0) / 7.0;
    let mut gpu = GpuBackend::new(EmuDevice::new());
    let dev = gpu.device();
    let t = |s: Shape| DevTensor { shape: s, data: dev.htod(&(0..s.len()).map(value).collect::<Vec<_>>()).unwrap() };
    let p = |n: usize| dev.htod(&(0..n).map(|i| value(i + 3).abs() + 0.5).collect::<Vec<_>>()).unwrap();
    let (x, dy, w, bias, gamma, beta) = (t(shape), t(shape), p(27 * 3 * 3), p(3), p(3), p(3));
    let small = t(Shape::new(1, [2, 3, 2], 3));
    let saved = gpu.batch_norm_train(&x, &gamma, &beta, 1e-5).unwrap().1;
    let spec = ConvSpec { cin: 3, cout: 3, k: [3; 3], stride: [1; 3], pad: [1; 3] };
    // the conv runs twice: on the direct, then on the tiled kernel (the loop sets the variant)
    let cases: Vec<(&str, Vec<&EmuBuf>, Op)> = vec![
        ("conv3d direct", vec![&x.data, &w, &bias], Box::new(|g| Ok(g.conv3d(&x, &w, Some(&bias), &spec)?.data))),
        ("conv3d tiled", vec![&x.data, &w, &bias], Box::new(|g| Ok(g.conv3d(&x, &w, Some(&bias), &spec)?.data))),
        ("channel_affine", vec![&x.data, &gamma, &beta], Box::new(|g| Ok(g.channel_affine(&x, &gamma, &beta, true)?.data))),
        ("relu", vec![&x.data], Box::new(|g| Ok(g.relu(&x)?.data))),
        ("add", vec![&x.data, &dy.data], Box::new(|g| Ok(g.add(&x, &dy, true)?.data))),
        ("maxpool2", vec![&x.data], Box::new(|g| Ok(g.maxpool2(&x)?.data))),
        ("upsample", vec![&small.data], Box::new(|g| Ok(g.upsample(&small, [4, 6, 5])?.data))),
        ("sigmoid", vec![&x.data], Box::new(|g| Ok(g.sigmoid(&x)?.data))),
        ("softmax", vec![&x.data], Box::new(|g| Ok(g.softmax(&x)?.data))),
        ("upsample_add", vec![&x.data, &small.data], Box::new(|g| {
            let y = DevTensor { shape, data: g.device().alloc_zeros(shape.len())? };
            g.upsample_add_into(&x, &small, &y)?;
            Ok(y.data)
        })),
        ("duplicate", vec![&x.data], Box::new(|g| Ok(g.duplicate(&x)?.data))),
        ("accumulate", vec![&dy.data], Box::new(|g| {
            let mut acc = g.duplicate(&x)?;
            g.accumulate(&mut acc, &dy)?;
            Ok(acc.data)
        })),
        ("mul", vec![&x.data, &dy.data], Box::new(|g| Ok(g.mul(&x, &dy)?.data))),
        ("conv3d_backward_input", vec![&dy.data, &w], Box::new(|g| Ok(g.conv3d_backward_input(&dy, &w, &spec, [4, 6, 5])?.data))),
        ("conv3d_backward_weight", vec![&x.data, &dy.data], Box::new(|g| g.conv3d_backward_weight(&x, &dy, &spec))),
        ("conv3d_backward_bias", vec![&dy.data], Box::new(|g| g.conv3d_backward_bias(&dy))),
        ("batch_norm_train", vec![&x.data, &gamma, &beta], Box::new(|g| Ok(g.batch_norm_train(&x, &gamma, &beta, 1e-5)?.0.data))),
        ("batch_norm_backward", vec![&dy.data, &x.data, &gamma, &saved.mean, &saved.invstd, &saved.var],
            Box::new(|g| Ok(g.batch_norm_backward(&dy, &x, &gamma, &saved)?.0.data))),
        ("relu_backward", vec![&dy.data, &x.data], Box::new(|g| Ok(g.relu_backward(&dy, &x)?.data))),
        ("maxpool2_backward", vec![&small.data, &x.data], Box::new(|g| Ok(g.maxpool2_backward(&small, &x)?.data))),
        ("upsample_backward", vec![&x.data], Box::new(|g| Ok(g.upsample_backward(&x, [2, 3, 2])?.data))),
        ("sigmoid_backward", vec![&dy.data, &x.data], Box::new(|g| Ok(g.sigmoid_backward(&dy, &x)?.data))),
        ("softmax_backward", vec![&dy.data, &x.data], Box::new(|g| Ok(g.softmax_backward(&dy, &x)?.data))),
    ];
    for (name, inputs, op) in &cases {
        gpu.set_conv_variant(Some(if *name == "conv3d direct" { ConvVariant::Direct } else { ConvVariant::Tiled }));
        let dev = gpu.device();
        dev.synchronize().unwrap();
        let mut pins: Vec<_> = inputs.iter().map(|b| dev.alloc_pinned(dev.buf_len(b)).unwrap()).collect();
        for (b, pin) in inputs.iter().zip(&mut pins) {
            dev.download(b, pin).unwrap();
        }
        // The downloads are still in flight: nothing orders the compute queue after them.
        let y = op(&gpu).unwrap_or_else(|e| panic!("{name} while its inputs are being downloaded: {e}"));
        let mut pin = dev.alloc_pinned(dev.buf_len(&y)).unwrap();
        unordered(dev.download(&y, &mut pin), &format!("{name}: a download of its output, no wait"));
    }
}
