//! Volume I/O (in progress).
