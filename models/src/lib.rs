//! ftrt-models
