//! The compiler's own checks: malformed ops are errors that say what is wrong, and the
//! emitted kernels have the structure the lowering promises.
use crate::parse_ops;
use quote::quote;

fn err_of(tokens: proc_macro2::TokenStream) -> String {
    match parse_ops(tokens) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_function_is_named() {
    let e = err_of(
        quote! { f(x: [N] T) -> (y: [N] T) { forward for i in N { y[i] = frobnicate(x[i]); } } },
    );
    assert!(e.contains("unknown function `frobnicate`"), "{e}");
}

#[test]
fn stores_only_to_outputs() {
    let e = err_of(quote! { f(x: [N] T) -> (y: [N] T) { forward for i in N { x[i] = 1.0; } } });
    assert!(
        e.contains("`x` is not written by this pass") && e.contains("writable here: y"),
        "{e}"
    );
}

#[test]
fn integer_inputs_need_a_check_range() {
    let e = err_of(quote! {
        f(ids: [N] i32, w: [V] T) -> (y: [N] T) {
            forward for i in N { y[i] = w[ids[i]]; }
            backward (dy) -> (dw) for v in V { dw[v] = sum(k in 0..N, select(ids[k] == v, dy[k], 0.0)); }
        }
    });
    assert!(e.contains("integer input `ids` needs a range"), "{e}");
}

#[test]
fn wrong_index_count_and_unknown_names() {
    let e = err_of(
        quote! { f(x: [R, C] T) -> (y: [R, C] T) { forward for r in R, c in C { y[r, c] = x[r]; } } },
    );
    assert!(e.contains("`x` has 2 dims but is indexed with 1"), "{e}");
    let e =
        err_of(quote! { f(x: [N] T) -> (y: [N] T) { forward for i in N { y[i] = x[i] * q; } } });
    assert!(e.contains("unknown name `q`"), "{e}");
}

#[test]
fn use_needs_an_earlier_op_and_every_binding() {
    let e = err_of(
        quote! { g(x: [N] T) -> (y: [N] T) { forward for i in N { use nothing.forward(x = x, y = y); } } },
    );
    assert!(e.contains("no op `nothing` earlier in this block"), "{e}");
    let e = err_of(quote! {
        f(x: [N] T) -> (y: [N] T) { forward for i in N { y[i] = x[i] * 2.0; } }
        g(a: [N] T) -> (b: [N] T) { forward for i in N { use f.forward(x = a); } }
    });
    assert!(e.contains("bind the callee's tensor `y`"), "{e}");
}

#[test]
fn composition_inlines_into_one_pass() {
    let ops = parse_ops(quote! {
        f(x: [N] T) -> (y: [N] T) { forward for i in N { y[i] = x[i] * 2.0; } }
        g(a: [N] T, b: [N] T) -> (c: [N] T) {
            forward for i in N { let s = a[i] + b[i]; use f.forward(x = s, y = c); }
        }
    })
    .unwrap();
    let g = &ops[1];
    let cu = crate::emit_cuda::emit_op(g);
    // One flat kernel reading a and b and writing c, with f's body inlined.
    assert!(cu.contains("g_forward_body"), "{cu}");
    assert!(cu.contains("* 2.0f"), "{cu}");
    assert!(!cu.contains("f_forward"), "{cu}");
}

#[test]
fn row_reductions_become_sweeps_with_vector_loads() {
    let ops = parse_ops(quote! {
        n(x: [R, C] T, w: [C] T) -> (y: [R, C] T) {
            forward for r in R, c in C {
                let s = rsqrt(mean(c, x[r, c] * x[r, c]) + 1e-5);
                y[r, c] = w[c] * T(x[r, c] * s);
            }
        }
    })
    .unwrap();
    let cu = crate::emit_cuda::emit_op(&ops[0]);
    assert!(cu.contains("ftrt_row_sum<TPR>"), "{cu}");
    assert!(cu.contains("ftrt_load_vec<VEC>(v0_, x + "), "{cu}");
    assert!(cu.contains("ftrt_store_vec<VEC>(y + "), "{cu}");
    // Two sweeps: the reduction, then the store.
    assert_eq!(cu.matches("for (I c0_ = (I)lane * VEC").count(), 2, "{cu}");
}

#[test]
fn guarded_stores_are_scalar_and_guarded() {
    let ops = parse_ops(quote! {
        g(x: [N] f32) -> (y: [N] f32) { forward for i in N { if i < N - 1 { y[i] = x[i + 1]; } } }
    })
    .unwrap();
    let cu = crate::emit_cuda::emit_op(&ops[0]);
    assert!(
        cu.contains("if (((i < (N - 1))))") || cu.contains("if ((i < (N - 1)))"),
        "{cu}"
    );
    assert!(!cu.contains("ftrt_store_vec<VEC>(y"), "{cu}");
}

#[test]
fn logsumexp_keeps_one_accumulator_per_thread() {
    let ops = parse_ops(quote! {
        l(x: [R, C] T, cap: f32) -> (y: [R] f32) {
            forward for r in R, c in C {
                y[r] = logsumexp(c, select(cap > 0.0, tanh(x[r, c]) * cap, x[r, c]));
            }
        }
    })
    .unwrap();
    let cu = crate::emit_cuda::emit_op(&ops[0]);
    // One (m, s) pair per thread, pushed once per loaded vector; no per-slot merges.
    assert!(
        cu.contains("float acc0_m = -INFINITY, acc0_s = 0.f;"),
        "{cu}"
    );
    assert!(cu.contains("acc0_x[k_] = "), "{cu}");
    assert!(
        cu.contains("ftrt_lse_push_vec<VEC>(acc0_m, acc0_s, acc0_x);"),
        "{cu}"
    );
    assert!(
        !cu.contains("acc0_m[VEC]") && !cu.contains("ftrt_lse_merge"),
        "{cu}"
    );
    assert!(cu.contains("ftrt_row_lse<TPR>(acc0_m, acc0_s)"), "{cu}");
    // The launch-constant select is one branch around two loops, each without the select.
    assert!(cu.contains("if ((cap > 0.0f)) {"), "{cu}");
    assert_eq!(cu.matches("for (I c0_ = (I)lane * VEC").count(), 2, "{cu}");
    assert_eq!(cu.matches("tanhf(").count(), 1, "{cu}");
    assert!(!cu.contains("? (float)"), "{cu}");
}

#[test]
fn lookup_tables_are_staged_and_packed_codes_loaded_wide() {
    let ops = parse_ops(quote! {
        d(packed: [N / 64, 32] u8, scale: [N / 64] f32, table: [16] f32) -> (w: [N / 64, 64] T) {
            forward for b in N / 64, j in 64 {
                let byte = packed[b, j / 2];
                let q = select(j % 2 == 0, byte >> 4, byte & 15);
                w[b, j] = table[q] * scale[b];
            }
        }
    })
    .unwrap();
    let cu = crate::emit_cuda::emit_op(&ops[0]);
    // The 16-entry table is read from shared memory, filled once per block.
    assert!(cu.contains("__shared__ float table_s_[16];"), "{cu}");
    assert!(cu.contains("table_s_[i_] = ftrt_ld(table[i_]);"), "{cu}");
    assert!(cu.contains("__syncthreads();"), "{cu}");
    assert!(
        cu.contains("table_s_[q]") && !cu.contains("ftrt_ld(table[q])"),
        "{cu}"
    );
    // The bytes of a chunk arrive in one load; each element picks its byte from registers.
    assert!(
        cu.contains("ftrt_load_u8<(VEC + 2 - 1) / 2>(p0_, packed + "),
        "{cu}"
    );
    assert!(cu.contains("const I byte = p0_[k_ / 2];"), "{cu}");
    // A table indexed only by loop indices stays in global memory.
    assert!(!cu.contains("scale_s_"), "{cu}");
}

/// A row pitch is a dim of its own: an output declared `[R, LY]` while the pass loops `c` over
/// `C` is stored at `r * LY + c` (the CPU reference too), and the launcher vectorizes only when
/// the pitch is a multiple of 8 (what the LoRA K-extension needs: a norm writing its rows into
/// a buffer wider than C, whose extra columns hold x A^T).
#[test]
fn pitched_output_rows() {
    let ops = parse_ops(quote! {
        f(x: [R, C] T) -> (y: [R, LY] T) {
            forward for r in R, c in C {
                let m = mean(c, x[r, c] * x[r, c]);
                y[r, c] = x[r, c] * m;
            }
        }
    })
    .unwrap();
    let cu = crate::emit_cuda::emit_op(&ops[0]);
    assert!(
        cu.contains("ftrt_store_vec<VEC>(y + (((r * LY) + c0_))"),
        "{cu}"
    );
    assert!(
        cu.contains("ftrt_load_vec<VEC>(v0_, x + (((r * C) + c0_)))"),
        "{cu}"
    );
    let rs = crate::emit_rust::emit_op(&ops[0]);
    assert!(rs.contains("y[(((r * LY) + c)) as usize]"), "{rs}");
    assert!(rs.contains("((LY % 8i64) == 0i64)"), "{rs}");
}
