//! nvrtc (in progress).
