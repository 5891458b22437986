//! The GPU launch layer beyond the op table (tests/ops_table.rs compares every op of `GpuBackend`
//! with the CPU on every conv variant and both emulator schedules): its shape errors, and the
//! conv variants' throughput on a real GPU.
mod common;
use common::{cuda_device_or_skip, values};
use deepis::backend::{Backend, ConvSpec};
use deepis::gpu::cuda::{cuda_available, CudaDevice};
use deepis::gpu::emu::EmuDevice;
use deepis::gpu::ops::{ConvVariant, GpuBackend};
use deepis::gpu::Device;
use deepis::tensor::{Shape, Tensor};

#[test]
fn shape_errors_are_errors() {
    // The GPU launch layer's shape rules, on the emulator here and on the GPU when there is one.
    shape_errors_on(&GpuBackend::new(EmuDevice::new()), "emu");
    if cuda_available() {
        shape_errors_on(&GpuBackend::new(CudaDevice::new(0).unwrap()), "cuda");
    } else {
        common::skip("no GPU: shape errors checked on the emulator only");
    }
}

fn shape_errors_on<D: Device>(gpu: &GpuBackend<D>, what: &str) {
    let x = gpu.upload(&Tensor::zeros(Shape::new(1, [3, 3, 3], 4))).unwrap();
    let spec = ConvSpec { cin: 5, cout: 2, k: [1; 3], stride: [1; 3], pad: [0; 3] };
    let w = gpu.upload_param(&vec![0.0; spec.weight_len()]).unwrap();
    assert!(matches!(gpu.conv3d(&x, &w, None, &spec), Err(deepis::Error::Shape(_))), "{what}: conv with 5 input channels on 4");
    let other = gpu.upload(&Tensor::zeros(Shape::new(1, [3, 3, 2], 4))).unwrap();
    assert!(matches!(gpu.add(&x, &other, false), Err(deepis::Error::Shape(_))), "{what}: add of two shapes");
    println!("{what}: shape errors are Error::Shape");
}

/// Napkin-math throughput of the conv variants on the published model's widest full-resolution
/// shape (3x3x3, 64 -> 64 channels, 128 x 128 x 64). Run on a GPU: `cargo test --release --test
/// gpu_ops -- --ignored --nocapture`.
#[test]
#[ignore]
fn cuda_conv_throughput() {
    let Some(dev) = cuda_device_or_skip() else { return };
    let mut gpu = GpuBackend::new(dev);
    let shapes = [
        (ConvSpec { cin: 64, cout: 64, k: [3; 3], stride: [1; 3], pad: [1; 3] }, [128, 128, 64]),
        (ConvSpec { cin: 64, cout: 64, k: [1; 3], stride: [1; 3], pad: [0; 3] }, [128, 128, 64]),
        (ConvSpec { cin: 256, cout: 256, k: [3; 3], stride: [1; 3], pad: [1; 3] }, [32, 32, 16]),
        (ConvSpec { cin: 64, cout: 1, k: [1; 3], stride: [1; 3], pad: [0; 3] }, [128, 128, 64]),
    ];
    println!("{:<30} {:<8} {:>9} {:>9}", "conv", "variant", "ms", "TFLOP/s");
    for (spec, d) in shapes {
        let xs = Shape::new(1, d, spec.cin);
        let x = gpu.upload(&Tensor::new(xs, values(xs.len(), 1)).unwrap()).unwrap();
        let w = gpu.upload_param(&values(spec.weight_len(), 2)).unwrap();
        let b = gpu.upload_param(&values(spec.cout, 3)).unwrap();
        let out = Shape::new(1, spec.out_dims(d), spec.cout);
        for v in ConvVariant::ALL {
            gpu.set_conv_variant(Some(v));
            gpu.conv3d(&x, &w, Some(&b), &spec).unwrap();
            gpu.device().synchronize().unwrap();
            let reps = 5;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gpu.conv3d(&x, &w, Some(&b), &spec).unwrap();
            }
            gpu.device().synchronize().unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            let name = format!("{}x{}x{} {}->{} {:?}", spec.k[0], spec.k[1], spec.k[2], spec.cin, spec.cout, d);
            println!("{name:<30} {:<8} {ms:>9.3} {:>9.2}", format!("{v:?}"), spec.flops(out) / ms / 1e9);
        }
    }
}
