//! ftrt-runtime
