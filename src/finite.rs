//! A NaN or infinite network output is an error, never a result. The finished output is checked
//! (one pass over one or a few channels, nothing per layer); only when it fails is the pass run
//! again with a check after every module, to name the first layer that produced the value.
use crate::backend::Backend;
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::model::Network;
use crate::tensor::Tensor;
use crate::weights::Weights;

/// The first non-finite value of `v`: (flat index, value).
pub fn first_non_finite(v: &[f32]) -> Option<(usize, f32)> {
    v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))
}

/// `y`, the output of `net` for `x`, when it is finite; otherwise the error naming the first
/// module whose output is not (the reference interpreter's hook).
pub fn checked<B: Backend>(net: &Network<B>, x: &Tensor, y: Tensor) -> Result<Tensor> {
    if first_non_finite(&y.data).is_none() {
        return Ok(y);
    }
    let mut first: Option<(String, usize, f32)> = None;
    let mut hook = |name: &str, t: &crate::backend::DevTensor<B::S>| -> Result<()> {
        let host = net.backend().download(t)?;
        if let Some((i, v)) = first_non_finite(&host.data) {
            first = Some((name.to_string(), i, v));
            return Err(Error::NonFinite(String::new()));
        }
        Ok(())
    };
    match net.forward_hooked(x, Some(&mut hook)) {
        Ok(_) | Err(Error::NonFinite(_)) => {}
        Err(e) => return Err(e),
    }
    Err(non_finite(Some(x), &y, first))
}

/// A finished output as it is, or an error that says where it is not finite (for the fused
/// plan, whose steps have no names: [`run_plan`] names the layer).
pub fn plain(y: Tensor) -> Result<Tensor> {
    match first_non_finite(&y.data) {
        None => Ok(y),
        Some(_) => Err(non_finite(None, &y, None)),
    }
}

/// Runs the fused plan; a non-finite output is an error naming the first layer, found by the
/// reference interpreter on the CPU.
pub fn run_plan(plan: &crate::plan::Plan, weights: &Weights, x: &Tensor) -> Result<Tensor> {
    match plan.run(x) {
        Err(Error::NonFinite(m)) => {
            let net = Network::new(CpuBackend::new(), weights)?;
            let y_ref = net.forward_hooked(x, None)?;
            checked(&net, x, y_ref).and(Err(Error::NonFinite(m)))
        }
        r => r,
    }
}

fn non_finite(x: Option<&Tensor>, y: &Tensor, first: Option<(String, usize, f32)>) -> Error {
    let (i, v) = first_non_finite(&y.data).unwrap_or((0, f32::NAN));
    let per = (y.shape.voxels() * y.shape.c).max(1);
    let layer = match first {
        Some((name, j, w)) => format!("; layer {name} is the first to produce a non-finite value ({w} at flat index {j})"),
        None => String::new(),
    };
    let input = match x {
        Some(x) => format!("; the input's largest magnitude is {:e}", x.data.iter().fold(0f32, |m, v| m.max(v.abs()))),
        None => String::new(),
    };
    Error::NonFinite(format!(
        "the network's output holds {v} (volume {}, flat index {}){layer}{input}: are the input values in the range the \
         network was trained on (input_offset / input_scale in `deepis info`), and are the weights sound?",
        i / per,
        i % per
    ))
}
