//! Adam as torch.optim.Adam (L2 weight decay added to the gradient, not AdamW), float32 state,
//! the same order of operations as PyTorch's single-tensor implementation. Betas (0.5, 0.999) as
//! published. Deterministic: the update is element-wise.
use super::net::Params;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken.
    pub step: u64,
    /// First and second moments, indexed as `Params::specs` (None until the parameter has a gradient).
    pub m: Vec<Option<Vec<f32>>>,
    pub v: Vec<Option<Vec<f32>>>,
}

/// The published betas.
pub const BETAS: (f64, f64) = (0.5, 0.999);

impl Adam {
    pub fn new(n_params: usize, lr: f64, weight_decay: f64) -> Adam {
        Adam { lr, betas: BETAS, eps: 1e-8, weight_decay, step: 0, m: vec![None; n_params], v: vec![None; n_params] }
    }

    /// One update of every trainable parameter that has a gradient.
    #[allow(clippy::needless_range_loop)]
    pub fn update(&mut self, p: &mut Params, grads: &[Option<Vec<f32>>]) -> Result<()> {
        if grads.len() != p.data.len() || self.m.len() != p.data.len() {
            return Err(Error::Other(format!("adam: {} gradients and {} moments for {} parameters", grads.len(), self.m.len(), p.data.len())));
        }
        self.step += 1;
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let step_size = (self.lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (wd, eps) = (self.weight_decay as f32, self.eps as f32);
        let (one_b1, b2f, one_b2) = ((1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32);
        for i in 0..p.data.len() {
            let Some(g) = grads[i].as_ref() else { continue };
            if !p.trainable(i) {
                continue;
            }
            let w = &mut p.data[i];
            if g.len() != w.len() {
                return Err(Error::Other(format!("adam: gradient of {} has {} values, the parameter {}", p.specs[i].name, g.len(), w.len())));
            }
            let m = self.m[i].get_or_insert_with(|| vec![0.0; w.len()]);
            let v = self.v[i].get_or_insert_with(|| vec![0.0; w.len()]);
            for k in 0..w.len() {
                let gk = if wd != 0.0 { g[k] + wd * w[k] } else { g[k] };
                m[k] += one_b1 * (gk - m[k]);
                v[k] = v[k] * b2f + one_b2 * gk * gk;
                let denom = v[k].sqrt() / bc2_sqrt + eps;
                w[k] -= step_size * m[k] / denom;
            }
        }
        Ok(())
    }
}
