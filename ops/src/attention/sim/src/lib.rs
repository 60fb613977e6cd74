//! The attention op's module compiled standalone (its CPU tests run here too), plus tests that
//! run the CUDA C kernels on the CPU emulator and compare them with the CPU reference.
pub mod kernels {
    pub static ATTENTION: ftrt_runtime::PtxModule = ftrt_runtime::PtxModule {
        name: "attention",
        arch: "compute_80",
        ptx: include_str!("../../../../../kernels-generated/attention.ptx"),
        cuda_source: include_str!("../../../../kernels/attention.cu"),
        cubins: &[],
    };
    pub static ATTENTION_SM90: ftrt_runtime::PtxModule = ftrt_runtime::PtxModule {
        name: "attention_sm90",
        arch: "compute_90a",
        ptx: include_str!("../../../../../kernels-generated/attention_sm90.ptx"),
        cuda_source: include_str!("../../../../kernels/attention_sm90.cu"),
        cubins: &[],
    };
}
#[path = "../../../dsl/real.rs"]
#[allow(dead_code)] // the whole scalar module; the attention module uses its trait only
mod real;
/// The one piece of `ftrt_ops::dsl` the attention module uses: its scalar trait.
pub mod dsl {
    pub use crate::real::Real;
}
#[path = "../../mod.rs"]
pub mod attention;
#[cfg(test)]
mod sim_tests;
