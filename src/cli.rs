//! Command line (in progress).
