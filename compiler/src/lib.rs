//! ftrt-compiler
