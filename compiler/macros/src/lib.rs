//! `op! { ... }`: expands a block of op definitions into their Rust products (CPU reference,
//! typed launcher, gradient check). The same text is compiled to CUDA by `ops/build.rs`.
use proc_macro::TokenStream;

#[proc_macro]
pub fn op(input: TokenStream) -> TokenStream {
    let ops = match ftrt_compiler::parse_ops(input.into()) {
        Ok(ops) => ops,
        Err(e) => return e.to_compile_error().into(),
    };
    let text: String = ops.iter().map(ftrt_compiler::emit_rust::emit_op).collect();
    match text.parse::<TokenStream>() {
        Ok(ts) => ts,
        Err(e) => {
            let msg = format!("ftrt-compiler emitted invalid Rust: {e}");
            quote::quote!(compile_error!(#msg);).into()
        }
    }
}
