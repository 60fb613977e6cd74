//! ftrt-compiler: the op DSL's parser, IR and emitters.
//!
//! One `op! { ... }` definition yields a CUDA kernel family (and its HIP twin), a CPU
//! reference, a typed launcher and a finite-difference gradient check. `ops/build.rs` uses
//! [`pipeline`] to write `kernels-generated/`; the `op!` proc-macro uses [`emit_rust`].
pub mod ast;
pub mod emit_cuda;
pub mod emit_rust;
pub mod lower;
pub mod parse;
pub mod pipeline;
pub mod validate;
pub mod vectorize;

pub use ast::OpDef;

/// Parses one op from the tokens inside `op! { ... }`.
pub fn parse_op(tokens: proc_macro2::TokenStream) -> syn::Result<OpDef> {
    syn::parse2(tokens)
}
