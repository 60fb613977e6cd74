//! ftrt-ops: every op, forward and backward together, one file per family, written once in
//! the op DSL (`op!`). Each op expands here into its CPU reference, typed GPU launcher and
//! gradient check; `build.rs` compiles the same definitions to CUDA/HIP in `kernels-generated/`.
pub mod dsl;
pub mod kernels {
    //! Embedded PTX modules, one per kernel family.
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod decode;
pub mod embedding;
pub mod nf4;
pub mod norm;
pub mod quant_prelude;
pub mod rope;
pub mod selftest;
pub mod swiglu_lora;
