//! Training: an autograd tape over any `TrainBackend`, the backward ops (CPU reference here),
//! the published losses, Adam, and the training loop.
//!
//! - `backend`: the `TrainBackend` trait the CUDA backend and the emulator implement.
//! - `cpu`: its CPU implementation.
//! - `tape`: records forward ops, walks them backwards.
//! - `loss`: `edge_weight`, `aux_labels`, `loss_weights`, `train_loss` on the host in float64.
//! - `net`: the network in training mode on the tape; `train_step`.
//! - `adam`: torch.optim.Adam with the published betas.
pub mod adam;
/// The backward-op trait lives below `train` (`crate::backward`) so that the GPU backends that
/// implement it do not depend on the trainer.
pub use crate::backward as backend;
pub mod cli;
pub mod cpu;
pub mod data;
pub mod loss;
pub mod net;
pub mod run;
pub mod tape;

pub use backend::{BnSaved, TrainBackend};
pub use net::{finish_step, forward_eval, forward_train, train_step, Params, Step};
