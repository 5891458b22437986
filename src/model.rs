//! Model graph (in progress).
