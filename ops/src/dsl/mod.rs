//! Support for the code `op!` generates: the scalar type of CPU references, the rounding
//! points that make them match the GPU's bf16 kernels (or be exact, for gradient checks), and
//! the finite-difference gradient-check harness.
#[cfg(test)]
pub mod fixtures;
pub mod gradcheck;
mod real;

pub use real::{Prec, Real, Rounding};
