//! `op! { ... }`: expands one op definition into its Rust products (CPU reference, typed
//! launcher, gradient check). The same text is compiled to CUDA by `ops/build.rs`.
use proc_macro::TokenStream;

#[proc_macro]
pub fn op(input: TokenStream) -> TokenStream {
    let op = match ftrt_compiler::parse_op(input.into()) {
        Ok(op) => op,
        Err(e) => return e.to_compile_error().into(),
    };
    let text = ftrt_compiler::emit_rust::emit_op(&op);
    match text.parse::<TokenStream>() {
        Ok(ts) => ts,
        Err(e) => {
            let msg = format!("ftrt-compiler emitted invalid Rust for `{}`: {e}", op.name);
            quote::quote!(compile_error!(#msg);).into()
        }
    }
}
