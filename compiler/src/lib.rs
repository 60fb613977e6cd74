//! ftrt-compiler: the op DSL's parser, IR and emitters.
//!
//! One `op! { ... }` definition yields a CUDA kernel family (and its HIP twin), a CPU
//! reference, a typed launcher and a finite-difference gradient check. `ops/build.rs` uses
//! [`pipeline`] to write `kernels-generated/`; the `op!` proc-macro uses [`emit_rust`].
pub mod ast;
pub mod compose;
pub mod emit_cuda;
pub mod emit_rust;
pub mod lower;
pub mod parse;
pub mod pipeline;
pub mod validate;
pub mod vectorize;

#[cfg(test)]
mod tests;

pub use ast::OpDef;

/// Appends `s` as one line of generated source, indented `indent` levels of four spaces (both
/// emitters write their code through this).
pub(crate) fn push_line(out: &mut String, indent: usize, s: &str) {
    for _ in 0..indent {
        out.push_str("    ");
    }
    out.push_str(s);
    out.push('\n');
}

/// Parses the ops inside one `op! { ... }` block (later ops may `use` earlier ones).
pub fn parse_ops(tokens: proc_macro2::TokenStream) -> syn::Result<Vec<OpDef>> {
    syn::parse2::<parse::OpBlock>(tokens).map(|b| b.0)
}
