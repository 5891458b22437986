//! A NaN or infinite network output is an error, never a result. The finished output is checked
//! (one pass over one or a few channels, nothing per layer); only when it fails is the pass run
//! again with a check after every module, to name the first layer that produced the value.
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The first non-finite value of `v`: (flat index, value).
pub fn first_non_finite(v: &[f32]) -> Option<(usize, f32)> {
    v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))
}

/// A finished output as it is, or an error that says where it is not finite (for the fused
/// plan, whose steps have no names: `model::run_plan` names the layer).
pub fn plain(y: Tensor) -> Result<Tensor> {
    check(&y).map(|()| y)
}

/// [`plain`] on a borrowed output.
pub fn check(y: &Tensor) -> Result<()> {
    match first_non_finite(&y.data) {
        None => Ok(()),
        Some(_) => Err(non_finite(None, y, None)),
    }
}

/// [`check`] on the values of an output of `shape` (copied into a tensor only to say where one
/// is not finite).
pub fn check_values(shape: crate::tensor::Shape, v: &[f32]) -> Result<()> {
    match first_non_finite(v) {
        None => Ok(()),
        Some(_) => Err(non_finite(None, &Tensor { shape, data: v.to_vec() }, None)),
    }
}

pub fn non_finite(x: Option<&Tensor>, y: &Tensor, first: Option<(String, usize, f32)>) -> Error {
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
