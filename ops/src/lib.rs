//! ftrt-ops
