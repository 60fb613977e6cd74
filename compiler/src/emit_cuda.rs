//! CUDA C (and HIP C) emitter: one `template` body per pass plus `extern "C"` entry points for
//! each launch shape the launcher may pick.
//!
//! Row passes: `TPR` threads per row (32: a warp per row, 8 rows per block; 256: a block per
//! row), the row swept `VEC` elements per thread per step. Flat passes: one thread per `VEC`
//! consecutive elements of the loop nest, grid-stride. `VEC` is 8 (16-byte bf16 accesses) when
//! the launcher proves alignment, else 1.
use crate::ast::*;
use crate::lower::{
    flat_offset, lower, pass_args, pass_fn_name, Arg, Lowered, Reduction, Shape, Step,
};
use crate::validate::{Name, Scope, Ty};
use crate::vectorize::{
    launch_constant, packed_access, packed_loads, staged_tables, vec_access, vec_loads,
    PackedAccess, VecAccess,
};
use std::fmt::Write;

/// Threads per row of the row-kernel variants: a warp per row up to `WARP_ROW_MAX_INNER`
/// elements (`WARP_ROW_MAX_INNER_ONE_SWEEP` for a pass that only reduces over the row, reading
/// it once: no block reduction, and 8 rows per block keep the loads in flight; measured on the
/// H200 for the cross-entropy forward at 8192 x 4096: 74% of copy against 51% with a block of
/// 256), else a block of 256 per row, or of 1024 when there are too few rows (`FEW_ROWS`) to
/// keep enough loads in flight.
pub const ROW_VARIANTS: [u32; 3] = [32, 256, 1024];
pub const WARP_ROW_MAX_INNER: i64 = 1024;
pub const WARP_ROW_MAX_INNER_ONE_SWEEP: i64 = 8192;
pub const FEW_ROWS: i64 = 2048;
/// Threads per block of flat kernels.
pub const FLAT_THREADS: u32 = 256;

/// Index types of the variants: 32-bit when every tensor and the loop nest have fewer than
/// 2^31 elements (cheaper index math), else 64-bit.
pub const INDEX_TYPES: [(&str, &str); 2] = [("i32", "int"), ("i64", "long long")];

/// Entry-point name of one variant: `rms_norm_forward_i32_w32_v8`, `swiglu_forward_i64_v1`.
pub fn variant_name(base: &str, shape: Shape, index: &str, tpr: u32, vec: u32) -> String {
    match shape {
        Shape::Row => format!("{base}_{index}_w{tpr}_v{vec}"),
        Shape::Flat => format!("{base}_{index}_v{vec}"),
    }
}

/// The kernels of one op, as CUDA C (the prelude is added once per file by the pipeline).
pub fn emit_op(op: &OpDef) -> String {
    let mut out = String::new();
    writeln!(out, "// ==== op `{}` ====", op.name).unwrap();
    for line in &op.doc {
        writeln!(out, "// {line}").unwrap();
    }
    for pass in &op.passes {
        out.push('\n');
        emit_pass(&mut out, op, pass);
    }
    out
}

fn c_type(d: DType) -> &'static str {
    match d {
        DType::T => "ftrt_t",
        DType::F32 => "float",
        DType::I32 => "int",
        DType::U8 => "unsigned char",
    }
}

fn c_param_list(args: &[Arg]) -> String {
    args.iter()
        .map(|a| match a {
            Arg::Dim(d) => format!("long long {d}_"),
            Arg::Scalar(s) if s.dtype.is_float() => format!("float {}", s.name),
            Arg::Scalar(s) => format!("long long {}_", s.name),
            Arg::Tensor {
                decl,
                written: true,
            } => format!("{}* __restrict__ {}", c_type(decl.dtype), decl.name),
            Arg::Tensor {
                decl,
                written: false,
            } => {
                format!("const {}* __restrict__ {}", c_type(decl.dtype), decl.name)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn c_arg_names(args: &[Arg]) -> String {
    args.iter()
        .map(|a| match a {
            Arg::Dim(d) => format!("{d}_"),
            Arg::Scalar(s) if s.dtype.is_float() => s.name.clone(),
            Arg::Scalar(s) => format!("{}_", s.name),
            Arg::Tensor { decl, .. } => decl.name.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn emit_pass(out: &mut String, op: &OpDef, pass: &Pass) {
    let lowered = lower(op, pass);
    let args = pass_args(op, pass);
    let base = pass_fn_name(op, pass);
    let params = c_param_list(&args);
    let names = c_arg_names(&args);
    let title = crate::validate::pass_title(pass);
    writeln!(
        out,
        "// {} {title}: {} pass over ({})",
        op.name,
        shape_word(lowered.shape),
        loop_desc(pass)
    )
    .unwrap();
    let mut e = Emitter {
        out: String::new(),
        scope: lowered.scope.clone(),
        vregs: Vec::new(),
        hoisted: Vec::new(),
        staged: Vec::new(),
        n_locals: 0,
        indent: 1,
    };
    // Small constant tables read at data-dependent indices live in shared memory, staged
    // before any thread may leave the kernel.
    e.stage_tables(pass, &lowered);
    // Dims and integer scalars arrive as 64-bit and are narrowed to the index type I.
    for a in &args {
        match a {
            Arg::Dim(d) => e.line(&format!("const I {d} = (I){d}_;")),
            Arg::Scalar(s) if !s.dtype.is_float() => {
                e.line(&format!("const I {0} = (I){0}_;", s.name))
            }
            _ => {}
        }
    }
    // One templated body, then an entry point per variant: (launch bounds, name, template
    // arguments).
    let mut entries: Vec<(String, String, String)> = Vec::new();
    let template = match lowered.shape {
        Shape::Row => {
            // A row of known short extent only ever takes the warp-per-row variant.
            let short = matches!(pass.indices.last().map(|i| &i.extent), Some(Expr::Int(n)) if *n <= WARP_ROW_MAX_INNER);
            let tprs: &[u32] = if short {
                &ROW_VARIANTS[..1]
            } else {
                &ROW_VARIANTS
            };
            for (iname, ity) in INDEX_TYPES {
                for &tpr in tprs {
                    for vec in [8, 1] {
                        // A 1024-thread row gets one block per SM's worth of registers (64 each).
                        let bounds = match tpr {
                            32 => "256".to_string(),
                            1024 => "1024, 1".to_string(),
                            t => t.to_string(),
                        };
                        let name = variant_name(&base, Shape::Row, iname, tpr, vec);
                        entries.push((bounds, name, format!("{ity}, {tpr}, {vec}")));
                    }
                }
            }
            e.row_body(pass, &lowered);
            "typename I, int TPR, int VEC"
        }
        Shape::Flat => {
            for (iname, ity) in INDEX_TYPES {
                for vec in [8, 1] {
                    let name = variant_name(&base, Shape::Flat, iname, 0, vec);
                    entries.push((FLAT_THREADS.to_string(), name, format!("{ity}, {vec}")));
                }
            }
            e.flat_body(pass, &lowered);
            "typename I, int VEC"
        }
    };
    writeln!(out, "template <{template}>").unwrap();
    writeln!(
        out,
        "__device__ __forceinline__ void {base}_body({params}) {{"
    )
    .unwrap();
    out.push_str(&e.out);
    out.push_str("}\n");
    for (bounds, name, targs) in entries {
        writeln!(
            out,
            "extern \"C\" __global__ void __launch_bounds__({bounds}) {name}({params}) {{ {base}_body<{targs}>({names}); }}"
        )
        .unwrap();
    }
}

fn shape_word(s: Shape) -> &'static str {
    match s {
        Shape::Row => "row",
        Shape::Flat => "flat",
    }
}

fn loop_desc(pass: &Pass) -> String {
    pass.indices
        .iter()
        .map(|i| format!("{} in {}", i.name, expr_text(&i.extent)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Plain text of an expression, for comments.
pub fn expr_text(e: &Expr) -> String {
    match e {
        Expr::Float(v) => format!("{v:?}"),
        Expr::Int(v) => v.to_string(),
        Expr::Var(v) => v.clone(),
        Expr::Load { tensor, index } => {
            format!(
                "{tensor}[{}]",
                index.iter().map(expr_text).collect::<Vec<_>>().join(", ")
            )
        }
        Expr::Unary { op: UnOp::Neg, arg } => format!("-{}", expr_text(arg)),
        Expr::Unary { op: UnOp::Not, arg } => format!("!{}", expr_text(arg)),
        Expr::Binary { op, lhs, rhs } => {
            format!("({} {} {})", expr_text(lhs), op.symbol(), expr_text(rhs))
        }
        Expr::Call { func, args } => {
            format!(
                "{func}({})",
                args.iter().map(expr_text).collect::<Vec<_>>().join(", ")
            )
        }
        Expr::RowReduce { op, body } => format!("{op:?}(row, {})", expr_text(body)),
        Expr::SerialReduce {
            op,
            var,
            lo,
            hi,
            body,
        } => {
            format!(
                "{op:?}({var} in {}..{}, {})",
                expr_text(lo),
                expr_text(hi),
                expr_text(body)
            )
        }
    }
}

struct Emitter {
    out: String,
    scope: Scope,
    /// Register arrays of the vector accesses live in the current sweep: (key, array name).
    vregs: Vec<(String, String)>,
    /// Loop-invariant subexpressions computed before the current sweep: (key, local name).
    hoisted: Vec<(String, String)>,
    /// Tensors copied into the shared-memory array `{name}_s_` at the start of the kernel.
    staged: Vec<String>,
    /// Locals named so far (hoisted names stay unique across sweeps).
    n_locals: usize,
    indent: usize,
}

impl Emitter {
    fn line(&mut self, s: &str) {
        crate::push_line(&mut self.out, self.indent, s);
    }

    /// Decomposes `flat` into the given loop indices (innermost last) as C locals.
    fn decompose(&mut self, flat: &str, indices: &[LoopIndex]) {
        self.line(&format!("I rem_ = {flat};"));
        for (i, idx) in indices.iter().enumerate().rev() {
            let ext = self.expr(&idx.extent);
            if i == 0 {
                self.line(&format!("const I {} = rem_;", idx.name));
            } else {
                self.line(&format!("const I {} = rem_ % ({ext});", idx.name));
                self.line(&format!("rem_ /= ({ext});"));
            }
        }
        self.line("(void)rem_;");
    }

    fn row_body(&mut self, pass: &Pass, lowered: &Lowered) {
        let (outer, inner) = pass.indices.split_at(pass.indices.len() - 1);
        let inner = &inner[0];
        let nrows = if outer.is_empty() {
            "1".to_string()
        } else {
            outer
                .iter()
                .map(|i| format!("({})", self.expr(&i.extent)))
                .collect::<Vec<_>>()
                .join(" * ")
        };
        self.line("const int lane = threadIdx.x;");
        self.line("const I row = (I)((long long)blockIdx.x * blockDim.y + threadIdx.y);");
        self.line(&format!("if (row >= {nrows}) return;"));
        if !outer.is_empty() {
            self.decompose("row", outer);
        }
        let inner_ext = self.expr(&inner.extent);
        for step in &lowered.steps {
            match step {
                Step::Stmt(s) => self.scalar_stmt(s, true),
                Step::Reduce(reds) => self.reduce_sweep(reds, &inner.name, &inner_ext),
                Step::Stores(stores) => {
                    self.store_sweep(stores, &inner.name, &inner_ext, "lane", "TPR")
                }
            }
        }
    }

    fn flat_body(&mut self, pass: &Pass, lowered: &Lowered) {
        let total = pass
            .indices
            .iter()
            .map(|i| format!("({})", self.expr(&i.extent)))
            .collect::<Vec<_>>()
            .join(" * ");
        let (outer, inner) = pass.indices.split_at(pass.indices.len() - 1);
        let inner = &inner[0];
        self.line(&format!("const I nchunks = ({total}) / VEC;"));
        self.line("for (I chunk = (I)blockIdx.x * blockDim.x + threadIdx.x; chunk < nchunks;");
        self.line("     chunk += (I)gridDim.x * blockDim.x) {");
        self.indent += 1;
        let mut idx: Vec<LoopIndex> = outer.to_vec();
        idx.push(LoopIndex {
            name: format!("{}0_", inner.name),
            extent: inner.extent.clone(),
        });
        self.decompose("chunk * VEC", &idx);
        // Lets that do not move along the row are computed once per chunk.
        let mut per_elem = Vec::new();
        for step in &lowered.steps {
            match step {
                Step::Stmt(s @ Stmt::Let { name, .. }) if !self.scope.varying.contains(name) => {
                    self.scalar_stmt(s, false)
                }
                Step::Stmt(s) => per_elem.push(s.clone()),
                Step::Stores(st) => per_elem.extend(st.iter().cloned()),
                Step::Reduce(_) => unreachable!("flat passes have no row reductions"),
            }
        }
        let exprs = self.stmt_exprs(&per_elem);
        self.hoist(&exprs.iter().collect::<Vec<_>>());
        self.element_loop(&per_elem, &inner.name, &format!("{}0_", inner.name));
        self.hoisted.clear();
        self.indent -= 1;
        self.line("}");
    }

    fn scalar_stmt(&mut self, s: &Stmt, lane0_stores: bool) {
        match s {
            Stmt::Let { name, value } => {
                let ty = if self.scope.ty(value).expect("validated") == Ty::Float {
                    "float"
                } else {
                    "I"
                };
                let v = self.expr(value);
                self.line(&format!("const {ty} {name} = {v};"));
            }
            Stmt::Store {
                tensor,
                index,
                value,
                guard,
            } => {
                let mut st = self.store_expr(tensor, index, value);
                if let Some(g) = guard {
                    st = format!("if ({}) {{ {st} }}", self.expr(g));
                }
                if lane0_stores {
                    self.line(&format!("if (lane == 0) {{ {st} }}"));
                } else {
                    self.line(&st);
                }
            }
        }
    }

    fn store_expr(&mut self, tensor: &str, index: &[Expr], value: &Expr) -> String {
        let t = self.scope.tensors[tensor].clone();
        let off = self.expr(&flat_offset(&t, index));
        let v = self.expr(value);
        format!("{tensor}[{off}] = {};", convert_to(t.dtype, &v))
    }

    /// Loads the bytes of every packed access for the `VEC` elements starting at `c0` (a
    /// multiple of `VEC`): element `c0 + k` reads byte `k / div` of the array.
    fn preload_packed(&mut self, accesses: &[PackedAccess], inner: &str, c0: &str) {
        for a in accesses {
            let name = format!("p{}_", self.vregs.len());
            let t = self.scope.tensors[&a.tensor].clone();
            let index = at_chunk_start(&a.index, inner, c0);
            let off = self.expr(&flat_offset(&t, &index));
            let n = format!("(VEC + {0} - 1) / {0}", a.div);
            self.line(&format!(
                "int {name}[{n}]; ftrt_load_u8<{n}>({name}, {} + ({off}));",
                a.tensor
            ));
            self.vregs
                .push((a.key(), format!("{name}[k_ / {}]", a.div)));
        }
    }

    /// Loads every vector access of `exprs` for the `VEC` elements starting at `c0`.
    fn preload(&mut self, accesses: &[VecAccess], inner: &str, c0: &str) {
        for a in accesses {
            let name = format!("v{}_", self.vregs.len());
            let t = self.scope.tensors[&a.tensor].clone();
            let index = at_chunk_start(&a.index, inner, c0);
            let off = self.expr(&flat_offset(&t, &index));
            self.line(&format!(
                "float {name}[VEC]; ftrt_load_vec<VEC>({name}, {} + ({off}));",
                a.tensor
            ));
            self.vregs.push((a.key(), format!("{name}[k_]")));
        }
    }

    /// Declares every staged lookup table (see [`staged_tables`]) as a shared-memory copy
    /// `{name}_s_`, filled by the whole block before any thread works or leaves.
    fn stage_tables(&mut self, pass: &Pass, lowered: &Lowered) {
        let exprs = step_exprs(&lowered.steps);
        let written = crate::lower::written_tensors(pass);
        let tables = staged_tables(&self.scope, &exprs.iter().collect::<Vec<_>>(), &written);
        for t in &tables {
            let decl = self.scope.tensors[t].clone();
            let n = decl
                .dims
                .iter()
                .map(|d| match d {
                    Expr::Int(k) => *k,
                    _ => unreachable!("staged tables have constant dims"),
                })
                .product::<i64>();
            let ty = if decl.dtype.is_float() {
                "float"
            } else {
                "int"
            };
            self.line(&format!("__shared__ {ty} {t}_s_[{n}];"));
            self.line(&format!(
                "for (int i_ = threadIdx.y * blockDim.x + threadIdx.x; i_ < {n}; i_ += blockDim.x * blockDim.y) {t}_s_[i_] = ftrt_ld({t}[i_]);"
            ));
        }
        if !tables.is_empty() {
            self.line("__syncthreads();");
        }
        self.staged = tables;
    }

    fn reduce_sweep(&mut self, reds: &[Reduction], inner: &str, inner_ext: &str) {
        for r in reds {
            match r.op {
                // One online (max, sum) pair per thread, updated once per loaded vector.
                ReduceOp::LogSumExp => {
                    self.line(&format!("float {0}_m = -INFINITY, {0}_s = 0.f;", r.acc))
                }
                op => self.line(&format!("float {}_p = {};", r.acc, reduce_init(op))),
            }
        }
        self.reduce_loops(reds, inner, inner_ext, 0);
        for r in reds {
            let fin = match r.op {
                ReduceOp::Sum => format!("ftrt_row_sum<TPR>({}_p)", r.acc),
                ReduceOp::Mean => format!("ftrt_row_sum<TPR>({}_p) / (float)({inner_ext})", r.acc),
                ReduceOp::Max => format!("ftrt_row_max<TPR>({}_p)", r.acc),
                ReduceOp::Min => format!("ftrt_row_min<TPR>({}_p)", r.acc),
                ReduceOp::LogSumExp => format!("ftrt_row_lse<TPR>({0}_m, {0}_s)", r.acc),
            };
            self.line(&format!("const float {} = {fin};", r.acc));
        }
    }

    /// The loop of a reduction sweep. A `select` whose condition is known at launch (say
    /// `cap > 0.0`) becomes one branch around two copies of the loop, each with the select
    /// resolved, so no element pays for it (at most [`MAX_UNSWITCH`] such conditions).
    fn reduce_loops(&mut self, reds: &[Reduction], inner: &str, inner_ext: &str, depth: usize) {
        let bodies: Vec<&Expr> = reds.iter().map(|r| &r.body).collect();
        if depth < MAX_UNSWITCH {
            if let Some(cond) = uniform_condition(&self.scope, &bodies) {
                let c = self.expr(&cond);
                for (i, taken) in [true, false].into_iter().enumerate() {
                    let resolved: Vec<Reduction> = reds
                        .iter()
                        .map(|r| Reduction {
                            body: resolve_select(&r.body, &cond, taken),
                            ..r.clone()
                        })
                        .collect();
                    self.line(
                        if i == 0 {
                            format!("if ({c}) {{")
                        } else {
                            "} else {".to_string()
                        }
                        .as_str(),
                    );
                    self.indent += 1;
                    self.reduce_loops(&resolved, inner, inner_ext, depth + 1);
                    self.indent -= 1;
                }
                self.line("}");
                return;
            }
        }
        self.hoist(&bodies);
        // Two sweep steps per iteration keep twice the loads in flight.
        self.line("#pragma unroll 2");
        self.line(&format!(
            "for (I {inner}0_ = (I)lane * VEC; {inner}0_ < ({inner_ext}); {inner}0_ += (I)TPR * VEC) {{"
        ));
        self.indent += 1;
        let c0 = format!("{inner}0_");
        let accesses = vec_loads(&self.scope, reds.iter().map(|r| &r.body));
        let packed = packed_loads(&self.scope, reds.iter().map(|r| &r.body));
        self.preload(&accesses, inner, &c0);
        self.preload_packed(&packed, inner, &c0);
        for r in reds.iter().filter(|r| r.op == ReduceOp::LogSumExp) {
            self.line(&format!("float {}_x[VEC];", r.acc));
        }
        self.line("#pragma unroll");
        self.line("for (int k_ = 0; k_ < VEC; ++k_) {");
        self.indent += 1;
        self.line(&format!("const I {inner} = {c0} + k_; (void){inner};"));
        let body_exprs: Vec<Expr> = reds.iter().map(|r| r.body.clone()).collect();
        self.cse(&body_exprs);
        for r in reds {
            let b = self.expr(&r.body);
            let upd = match r.op {
                ReduceOp::Sum | ReduceOp::Mean => format!("{0}_p += {b};", r.acc),
                ReduceOp::Max => format!("{0}_p = fmaxf({0}_p, {b});", r.acc),
                ReduceOp::Min => format!("{0}_p = fminf({0}_p, {b});", r.acc),
                ReduceOp::LogSumExp => format!("{0}_x[k_] = {b};", r.acc),
            };
            self.line(&upd);
        }
        self.indent -= 1;
        self.line("}");
        for r in reds.iter().filter(|r| r.op == ReduceOp::LogSumExp) {
            self.line(&format!(
                "ftrt_lse_push_vec<VEC>({0}_m, {0}_s, {0}_x);",
                r.acc
            ));
        }
        self.vregs.clear();
        self.hoisted.clear();
        self.indent -= 1;
        self.line("}");
    }

    fn store_sweep(
        &mut self,
        stores: &[Stmt],
        inner: &str,
        inner_ext: &str,
        lane: &str,
        step: &str,
    ) {
        let exprs = self.stmt_exprs(stores);
        self.hoist(&exprs.iter().collect::<Vec<_>>());
        self.line(&format!(
            "for (I {inner}0_ = (I){lane} * VEC; {inner}0_ < ({inner_ext}); {inner}0_ += (I){step} * VEC) {{"
        ));
        self.indent += 1;
        self.element_loop(stores, inner, &format!("{inner}0_"));
        self.hoisted.clear();
        self.indent -= 1;
        self.line("}");
    }

    /// Computes, once before a sweep, every maximal subexpression of `exprs` that does not
    /// change along the row and does real work (a load or a call). Never looks inside a
    /// varying `select`'s branches or a serial reduction, whose loads may be guarded.
    fn hoist(&mut self, exprs: &[&Expr]) {
        let mut found: Vec<Expr> = Vec::new();
        for e in exprs {
            self.collect_hoistable(e, &mut found);
        }
        for e in found {
            let key = format!("{e:?}");
            if self.hoisted.iter().any(|(k, _)| *k == key) {
                continue;
            }
            self.bind_local(&e, key, 'h');
        }
    }

    /// `const T {prefix}{n}_ = e;` (T float or the index type), remembered in `hoisted` under
    /// `key` so later uses of `e` read the local.
    fn bind_local(&mut self, e: &Expr, key: String, prefix: char) {
        let ty = if self.ty(e) == Ty::Float {
            "float"
        } else {
            "I"
        };
        let v = self.expr(e);
        let name = format!("{prefix}{}_", self.n_locals);
        self.n_locals += 1;
        self.line(&format!("const {ty} {name} = {v};"));
        self.hoisted.push((key, name));
    }

    /// Common subexpressions of one element's work, computed once into locals (post-order, so
    /// larger ones reuse smaller ones): only those some element evaluates unconditionally, so
    /// no guarded load moves out of its `select`. They live in `hoisted` until the sweep ends.
    fn cse(&mut self, exprs: &[Expr]) {
        let mut counts: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
        for e in exprs {
            count_subexprs(e, &mut counts, false);
        }
        let mut order = Vec::new();
        for e in exprs {
            post_order(e, &mut order);
        }
        for e in order {
            let key = format!("{e:?}");
            // Shared, and evaluated unconditionally somewhere: computing it first is safe.
            let repeated = counts
                .get(&key)
                .is_some_and(|(n, free)| *n >= 2 && *free >= 1);
            if !repeated || self.hoisted.iter().any(|(k, _)| *k == key) || self.ty(&e) == Ty::Bool {
                continue;
            }
            self.bind_local(&e, key, 'e');
        }
    }

    /// The expressions of a run of statements: indices, and values under their guards.
    fn stmt_exprs(&self, stmts: &[Stmt]) -> Vec<Expr> {
        let mut out = Vec::new();
        for s in stmts {
            match s {
                Stmt::Let { value, .. } => out.push(value.clone()),
                Stmt::Store {
                    index,
                    value,
                    guard,
                    ..
                } => {
                    out.extend(index.iter().cloned());
                    out.push(crate::lower::guarded(&self.scope, value, guard.as_ref()));
                }
            }
        }
        out
    }

    fn collect_hoistable(&self, e: &Expr, out: &mut Vec<Expr>) {
        if !self.scope.varies(e) {
            let mut work = false;
            crate::validate::walk(e, &mut |x| {
                work |= matches!(x, Expr::Load { .. } | Expr::Call { .. })
            });
            let bool_ty = self.scope.ty(e).map_or(true, |t| t == Ty::Bool);
            if work && !bool_ty && !matches!(e, Expr::Var(_)) {
                out.push(e.clone());
            }
            return;
        }
        match e {
            Expr::Call { func, args } if func == "select" => self.collect_hoistable(&args[0], out),
            Expr::Call { args, .. } => args.iter().for_each(|a| self.collect_hoistable(a, out)),
            Expr::Load { index, .. } => index.iter().for_each(|i| self.collect_hoistable(i, out)),
            Expr::Unary { arg, .. } => self.collect_hoistable(arg, out),
            Expr::Binary { lhs, rhs, .. } => {
                self.collect_hoistable(lhs, out);
                self.collect_hoistable(rhs, out);
            }
            _ => {}
        }
    }

    /// The `VEC` elements from `c0`: vector loads, then per element every statement (values
    /// first, writes last), then vector stores.
    fn element_loop(&mut self, stmts: &[Stmt], inner: &str, c0: &str) {
        let exprs: Vec<&Expr> = stmts
            .iter()
            .flat_map(|s| match s {
                Stmt::Let { value, .. } => vec![value],
                Stmt::Store {
                    index,
                    value,
                    guard,
                    ..
                } => index
                    .iter()
                    .chain(std::iter::once(value))
                    .chain(guard.iter())
                    .collect(),
            })
            .collect();
        let packed = packed_loads(&self.scope, exprs.iter().copied());
        let accesses = vec_loads(&self.scope, exprs);
        self.preload(&accesses, inner, c0);
        self.preload_packed(&packed, inner, c0);
        // Vectorised stores collect into register arrays.
        let mut vstores: Vec<(usize, VecAccess, String)> = Vec::new();
        for (i, s) in stmts.iter().enumerate() {
            if let Stmt::Store {
                tensor,
                index,
                guard: None,
                ..
            } = s
            {
                if let Some(a) = vec_access(&self.scope, tensor, index) {
                    let name = format!("s{i}_");
                    self.line(&format!("float {name}[VEC];"));
                    vstores.push((i, a, name));
                }
            }
        }
        self.line("#pragma unroll");
        self.line("for (int k_ = 0; k_ < VEC; ++k_) {");
        self.indent += 1;
        self.line(&format!("__builtin_assume({c0} % VEC == 0);"));
        self.line(&format!("const I {inner} = {c0} + k_; (void){inner};"));
        // Store sweeps of row passes (no per-element lets) share repeated subexpressions.
        if stmts.iter().all(|s| matches!(s, Stmt::Store { .. })) {
            let values = self.stmt_exprs(stmts);
            self.cse(&values);
        }
        let mut writes = Vec::new();
        for (i, s) in stmts.iter().enumerate() {
            match s {
                Stmt::Let { .. } => self.scalar_stmt(s, false),
                Stmt::Store {
                    tensor,
                    index,
                    value,
                    guard,
                } => {
                    let v = self.expr(&crate::lower::guarded(&self.scope, value, guard.as_ref()));
                    let ty = if self.ty(value) == Ty::Float {
                        "float"
                    } else {
                        "I"
                    };
                    self.line(&format!("const {ty} w{i}_ = {v};"));
                    match vstores.iter().find(|(j, _, _)| *j == i) {
                        Some((_, _, name)) => writes.push(format!("{name}[k_] = w{i}_;")),
                        None => {
                            let t = self.scope.tensors[tensor].clone();
                            let off = self.expr(&flat_offset(&t, index));
                            let mut w = format!(
                                "{tensor}[{off}] = {};",
                                convert_to(t.dtype, &format!("w{i}_"))
                            );
                            if let Some(g) = guard {
                                w = format!("if ({}) {{ {w} }}", self.expr(g));
                            }
                            writes.push(w);
                        }
                    }
                }
            }
        }
        for w in writes {
            self.line(&w);
        }
        self.indent -= 1;
        self.line("}");
        for (_, a, name) in vstores {
            let t = self.scope.tensors[&a.tensor].clone();
            let index = at_chunk_start(&a.index, inner, c0);
            let off = self.expr(&flat_offset(&t, &index));
            self.line(&format!(
                "ftrt_store_vec<VEC>({} + ({off}), {name});",
                a.tensor
            ));
        }
        self.vregs.clear();
    }

    fn ty(&self, e: &Expr) -> Ty {
        self.scope.ty(e).expect("validated")
    }

    fn expr(&mut self, e: &Expr) -> String {
        if !self.hoisted.is_empty() {
            let key = format!("{e:?}");
            if let Some((_, name)) = self.hoisted.iter().find(|(k, _)| *k == key) {
                return name.clone();
            }
        }
        match e {
            Expr::Float(v) if v.is_infinite() => {
                (if *v > 0.0 { "INFINITY" } else { "-INFINITY" }).into()
            }
            Expr::Float(v) => format!("{v:?}f"),
            Expr::Int(v) if i32::try_from(*v).is_ok() => v.to_string(),
            Expr::Int(v) => format!("{v}LL"),
            Expr::Var(v) => v.clone(),
            Expr::Load { tensor, index } => {
                let key = vec_access(&self.scope, tensor, index)
                    .map(|a| a.key())
                    .or_else(|| packed_access(&self.scope, tensor, index).map(|a| a.key()));
                if let Some(key) = key {
                    if let Some((_, reg)) = self.vregs.iter().find(|(k, _)| *k == key) {
                        return reg.clone();
                    }
                }
                let t = self.scope.tensors[tensor].clone();
                let off = self.expr(&flat_offset(&t, index));
                if self.staged.contains(tensor) {
                    return format!("{tensor}_s_[{off}]");
                }
                format!("ftrt_ld({tensor}[{off}])")
            }
            Expr::Unary { op: UnOp::Neg, arg } => format!("(-{})", self.expr(arg)),
            Expr::Unary { op: UnOp::Not, arg } => format!("(!{})", self.expr(arg)),
            Expr::Binary { op, lhs, rhs } => {
                let (l, r) = (self.expr(lhs), self.expr(rhs));
                // Mixed int/float arithmetic promotes the int in f32, as C does.
                format!("({l} {} {r})", op.symbol())
            }
            Expr::Call { func, args } => self.call(func, args),
            Expr::RowReduce { .. } => unreachable!("row reductions are lowered to sweeps"),
            Expr::SerialReduce {
                op,
                var,
                lo,
                hi,
                body,
            } => {
                let (lo, hi) = (self.expr(lo), self.expr(hi));
                let saved = self.scope.clone();
                self.scope.names.insert(var.clone(), Name::Index);
                let b = self.expr(body);
                self.scope = saved;
                let (init, upd, fin) = match op {
                    ReduceOp::Sum => (
                        "float a_ = 0.f;".to_string(),
                        format!("a_ += {b};"),
                        "a_".to_string(),
                    ),
                    ReduceOp::Mean => (
                        "float a_ = 0.f;".to_string(),
                        format!("a_ += {b};"),
                        format!("a_ / (float)(({hi}) - ({lo}))"),
                    ),
                    ReduceOp::Max => (
                        "float a_ = -INFINITY;".into(),
                        format!("a_ = fmaxf(a_, {b});"),
                        "a_".into(),
                    ),
                    ReduceOp::Min => (
                        "float a_ = INFINITY;".into(),
                        format!("a_ = fminf(a_, {b});"),
                        "a_".into(),
                    ),
                    ReduceOp::LogSumExp => (
                        "float m_ = -INFINITY, s_ = 0.f;".into(),
                        format!("ftrt_lse_push(m_, s_, {b});"),
                        "(m_ + logf(s_))".into(),
                    ),
                };
                format!("([&]() {{ {init} for (I {var} = {lo}; {var} < {hi}; ++{var}) {{ {upd} }} return {fin}; }}())")
            }
        }
    }

    fn call(&mut self, func: &str, args: &[Expr]) -> String {
        let float_result = self.ty(&Expr::Call {
            func: func.into(),
            args: args.to_vec(),
        }) == Ty::Float;
        if func == "dynamic_index" {
            let Expr::Var(code) = &args[0] else {
                unreachable!("validated")
            };
            let x = self.expr(&args[1]);
            return format!("((I)ftrt_dynamic_index({code}, {x}))");
        }
        let a: Vec<String> = args.iter().map(|x| self.expr(x)).collect();
        match func {
            "T" => format!("ftrt_round_t({})", a[0]),
            "f32" => format!("((float)({}))", a[0]),
            "i32" => format!("((I)({}))", a[0]),
            "exp" => format!("__expf({})", a[0]),
            "log" => format!("__logf({})", a[0]),
            "sqrt" => format!("sqrtf({})", a[0]),
            "rsqrt" => format!("rsqrtf({})", a[0]),
            "tanh" => format!("tanhf({})", a[0]),
            "erf" => format!("erff({})", a[0]),
            "sigmoid" => format!("ftrt_sigmoid({})", a[0]),
            "abs" if float_result => format!("fabsf({})", a[0]),
            "abs" => format!("ftrt_abs_i({})", a[0]),
            "max" if float_result => format!("fmaxf({}, {})", a[0], a[1]),
            "min" if float_result => format!("fminf({}, {})", a[0], a[1]),
            "max" => format!("ftrt_max_i({}, {})", a[0], a[1]),
            "min" => format!("ftrt_min_i({}, {})", a[0], a[1]),
            "logaddexp" => format!("ftrt_logaddexp({}, {})", a[0], a[1]),
            "select" if float_result => {
                format!("(({}) ? (float)({}) : (float)({}))", a[0], a[1], a[2])
            }
            "select" => format!("(({}) ? ({}) : ({}))", a[0], a[1], a[2]),
            "nf4_index" => format!("((I)ftrt_nf4_index({}))", a[0]),
            "signbit" => format!("signbit({})", a[0]),
            "bnb_recip" => format!("ftrt_bnb_recip({})", a[0]),
            "mul_ftz" => format!("ftrt_mul_ftz({}, {})", a[0], a[1]),
            other => unreachable!("validated builtin `{other}`"),
        }
    }
}

fn reduce_init(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => "0.f",
        ReduceOp::Max => "-INFINITY",
        ReduceOp::Min => "INFINITY",
        ReduceOp::LogSumExp => unreachable!("online"),
    }
}

/// C expression converting the f32/int value `v` to a stored element of `d`.
fn convert_to(d: DType, v: &str) -> String {
    match d {
        DType::T => format!("ftrt_to_t({v})"),
        DType::F32 => format!("(float)({v})"),
        DType::I32 => format!("(int)({v})"),
        DType::U8 => format!("(unsigned char)({v})"),
    }
}

/// Counts the non-trivial subexpressions of `e` (calls, loads, arithmetic): (all uses, uses
/// outside any `select` branch). Serial reductions are opaque.
fn count_subexprs(
    e: &Expr,
    counts: &mut std::collections::BTreeMap<String, (usize, usize)>,
    guarded: bool,
) {
    if matches!(
        e,
        Expr::Call { .. } | Expr::Load { .. } | Expr::Binary { .. }
    ) {
        let c = counts.entry(format!("{e:?}")).or_insert((0, 0));
        c.0 += 1;
        c.1 += usize::from(!guarded);
    }
    match e {
        Expr::Call { func, args } if func == "select" => {
            count_subexprs(&args[0], counts, guarded);
            count_subexprs(&args[1], counts, true);
            count_subexprs(&args[2], counts, true);
        }
        Expr::Call { args, .. } => args.iter().for_each(|a| count_subexprs(a, counts, guarded)),
        Expr::Load { index, .. } => index
            .iter()
            .for_each(|i| count_subexprs(i, counts, guarded)),
        Expr::Unary { arg, .. } => count_subexprs(arg, counts, guarded),
        Expr::Binary { lhs, rhs, .. } => {
            count_subexprs(lhs, counts, guarded);
            count_subexprs(rhs, counts, guarded);
        }
        _ => {}
    }
}

/// Subexpressions in post-order (serial reductions opaque).
fn post_order(e: &Expr, out: &mut Vec<Expr>) {
    match e {
        Expr::Call { args, .. } => args.iter().for_each(|a| post_order(a, out)),
        Expr::Load { index, .. } => index.iter().for_each(|i| post_order(i, out)),
        Expr::Unary { arg, .. } => post_order(arg, out),
        Expr::Binary { lhs, rhs, .. } => {
            post_order(lhs, out);
            post_order(rhs, out);
        }
        _ => {}
    }
    if matches!(
        e,
        Expr::Call { .. } | Expr::Load { .. } | Expr::Binary { .. }
    ) {
        out.push(e.clone());
    }
}

/// `index` with the innermost loop index `inner` replaced by the chunk's first index `c0`.
fn at_chunk_start(index: &[Expr], inner: &str, c0: &str) -> Vec<Expr> {
    index
        .iter()
        .map(|i| {
            crate::validate::map(i, &mut |x| match x {
                Expr::Var(v) if v == inner => Expr::Var(c0.to_string()),
                o => o,
            })
        })
        .collect()
}

/// Every expression of a lowered pass: values, indices and guards of its statements, and the
/// bodies of its reductions.
fn step_exprs(steps: &[Step]) -> Vec<Expr> {
    let mut out = Vec::new();
    let stmt = |s: &Stmt, out: &mut Vec<Expr>| match s {
        Stmt::Let { value, .. } => out.push(value.clone()),
        Stmt::Store {
            index,
            value,
            guard,
            ..
        } => {
            out.extend(index.iter().cloned());
            out.push(value.clone());
            out.extend(guard.iter().cloned());
        }
    };
    for step in steps {
        match step {
            Step::Stmt(s) => stmt(s, &mut out),
            Step::Stores(st) => st.iter().for_each(|s| stmt(s, &mut out)),
            Step::Reduce(reds) => out.extend(reds.iter().map(|r| r.body.clone())),
        }
    }
    out
}

/// How many launch-constant `select` conditions a reduction sweep is specialized on (2^n loops).
const MAX_UNSWITCH: usize = 1;

/// The first `select` condition in `exprs` made only of dims, scalars and literals, which every
/// element of a launch evaluates the same.
fn uniform_condition(scope: &Scope, exprs: &[&Expr]) -> Option<Expr> {
    let mut found = None;
    for e in exprs {
        crate::validate::walk(e, &mut |x| {
            if let Expr::Call { func, args } = x {
                if func == "select" && found.is_none() && launch_constant(scope, &args[0]) {
                    found = Some(args[0].clone());
                }
            }
        });
    }
    found
}

/// `e` with every `select(cond, a, b)` replaced by `a` (`taken`) or `b`.
fn resolve_select(e: &Expr, cond: &Expr, taken: bool) -> Expr {
    let key = format!("{cond:?}");
    crate::validate::map(e, &mut |x| match x {
        Expr::Call { func, mut args } if func == "select" && format!("{:?}", args[0]) == key => {
            args.swap_remove(if taken { 1 } else { 2 })
        }
        o => o,
    })
}
