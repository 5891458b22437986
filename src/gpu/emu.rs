//! emu (in progress).
