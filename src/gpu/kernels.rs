//! kernels (in progress).
