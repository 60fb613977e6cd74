//! ftrt-macros
