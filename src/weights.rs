//! Weights (in progress).
