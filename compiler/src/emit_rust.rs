//! Rust emitter: for each op a module with its `Dims`, the CPU reference of every pass
//! (generic over `S: Real`, f32 or f64, with explicit rounding points), the typed GPU launcher
//! of every pass, and the generated finite-difference gradient check.
//!
//! The generated code names `crate::dsl` (the `Real` trait, `Rounding`, the gradient-check
//! harness) and `ftrt_runtime`; the op's family module must bring its PTX module into scope
//! as `KERNELS`.
use crate::ast::*;
use crate::emit_cuda::{
    FEW_ROWS, FLAT_THREADS, ROW_VARIANTS, WARP_ROW_MAX_INNER, WARP_ROW_MAX_INNER_ONE_SWEEP,
};
use crate::lower::{flat_offset, lower, pass_args, pass_fn_name, Arg, Lowered, Shape, Step};
use crate::validate::{dims, grad_decl, Name, Scope, Ty};
use crate::vectorize::{packed_loads, vec_access, vec_conditions, vec_loads};
use std::fmt::Write;

/// The whole Rust module for one op, as source text.
pub fn emit_op(op: &OpDef) -> String {
    let mut o = String::new();
    for line in &op.doc {
        writeln!(o, "/// {line}").unwrap();
    }
    writeln!(
        o,
        "#[allow(non_snake_case, unused_variables, unused_mut, unused_parens, clippy::all)]"
    )
    .unwrap();
    writeln!(o, "pub mod {} {{", op.name).unwrap();
    writeln!(o, "use crate::dsl::{{Real, Rounding}};").unwrap();
    writeln!(o, "use ftrt_runtime::cudarc::driver::PushKernelArg;").unwrap();
    emit_dims(&mut o, op);
    for pass in &op.passes {
        emit_cpu_pass(&mut o, op, pass);
        emit_launcher(&mut o, op, pass);
    }
    if op.backwards().next().is_some() {
        emit_gradcheck(&mut o, op);
    }
    o.push_str("}\n");
    o
}

fn emit_dims(o: &mut String, op: &OpDef) {
    let ds = dims(op);
    writeln!(o, "/// Sizes of `{}`'s symbolic dims.", op.name).unwrap();
    writeln!(o, "#[derive(Clone, Copy, Debug, PartialEq, Eq)]").unwrap();
    writeln!(
        o,
        "pub struct Dims {{ {} }}",
        ds.iter()
            .map(|d| format!("pub {d}: usize"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    writeln!(o, "impl Dims {{").unwrap();
    writeln!(
        o,
        "    /// Number of elements of the tensor (or gradient `d<name>`) called `name`."
    )
    .unwrap();
    writeln!(o, "    pub fn numel(&self, name: &str) -> usize {{").unwrap();
    bind_dims(o, op, "self");
    writeln!(o, "        let n: i64 = match name {{").unwrap();
    let mut all: Vec<TensorDecl> = op.tensors().cloned().collect();
    for t in op.tensors() {
        all.extend(grad_decl(op, &crate::validate::grad_name(&t.name)));
    }
    let scope = dims_scope(op);
    for t in &all {
        let n = t
            .dims
            .iter()
            .map(|d| format!("({})", rx(&scope, d)))
            .collect::<Vec<_>>()
            .join(" * ");
        writeln!(o, "            {:?} => {n},", t.name).unwrap();
    }
    writeln!(
        o,
        "            other => panic!(\"`{}` has no tensor `{{other}}`\"),",
        op.name
    )
    .unwrap();
    writeln!(o, "        }};").unwrap();
    writeln!(o, "        n as usize").unwrap();
    writeln!(o, "    }}").unwrap();
    writeln!(o, "}}").unwrap();
}

/// `let R: i64 = d.R as i64;` for every dim.
fn bind_dims(o: &mut String, op: &OpDef, d: &str) {
    for n in dims(op) {
        writeln!(o, "        let {n}: i64 = {d}.{n} as i64;").unwrap();
    }
}

/// A scope that knows only dims and scalars (for shape expressions).
fn dims_scope(op: &OpDef) -> Scope {
    let pass = Pass {
        kind: PassKind::Forward,
        label: None,
        grads_in: vec![],
        grads_out: vec![],
        indices: vec![],
        body: vec![],
    };
    Scope::new(op, &pass)
}

fn rust_elem(d: DType) -> &'static str {
    match d {
        DType::T | DType::F32 => "S",
        DType::I32 => "i32",
        DType::U8 => "u8",
    }
}

fn cpu_params(args: &[Arg]) -> String {
    let mut p = vec!["d: &Dims".to_string()];
    for a in args {
        match a {
            Arg::Dim(_) => {}
            Arg::Scalar(s) if s.dtype.is_float() => p.push(format!("{}: f32", s.name)),
            Arg::Scalar(s) => p.push(format!("{}: i32", s.name)),
            Arg::Tensor { decl, written } => {
                let m = if *written { "&mut " } else { "&" };
                p.push(format!("{}: {m}[{}]", decl.name, rust_elem(decl.dtype)))
            }
        }
    }
    p.push("rt: Rounding".into());
    p.join(", ")
}

fn emit_cpu_pass(o: &mut String, op: &OpDef, pass: &Pass) {
    let lowered = lower(op, pass);
    let args = pass_args(op, pass);
    let name = pass_fn_name(op, pass)
        .trim_start_matches(&format!("{}_", op.name))
        .to_string();
    writeln!(
        o,
        "/// CPU reference of the {} pass.",
        crate::validate::pass_title(pass)
    )
    .unwrap();
    writeln!(o, "pub fn {name}_cpu<S: Real>({}) {{", cpu_params(&args)).unwrap();
    bind_dims(o, op, "d");
    for s in args.iter().filter_map(|a| {
        if let Arg::Scalar(s) = a {
            Some(s)
        } else {
            None
        }
    }) {
        if s.dtype.is_float() {
            writeln!(o, "        let {0}: S = S::from_f32({0});", s.name).unwrap();
        } else {
            writeln!(o, "        let {0}: i64 = {0} as i64;", s.name).unwrap();
        }
    }
    let scope0 = dims_scope(op);
    for a in &args {
        if let Arg::Tensor { decl, .. } = a {
            let n = decl
                .dims
                .iter()
                .map(|d| format!("({})", rx(&scope0, d)))
                .collect::<Vec<_>>()
                .join(" * ");
            writeln!(
                o,
                "        assert_eq!({0}.len() as i64, {n}, \"`{0}` of `{1}` has the wrong length\");",
                decl.name, op.name
            )
            .unwrap();
        }
    }
    // Code tables for `dynamic_index` as f32, once.
    for t in dynamic_tables(pass) {
        writeln!(
            o,
            "        let {t}_f32: Vec<f32> = {t}.iter().map(|v| v.to_f32()).collect();"
        )
        .unwrap();
    }
    let mut e = RustEmitter {
        out: String::new(),
        scope: lowered.scope.clone(),
        indent: 2,
    };
    match lowered.shape {
        Shape::Flat => e.flat(pass, &lowered),
        Shape::Row => e.row(pass, &lowered),
    }
    o.push_str(&e.out);
    writeln!(o, "}}").unwrap();
}

fn dynamic_tables(pass: &Pass) -> Vec<String> {
    let mut out = Vec::new();
    for s in &pass.body {
        let v = match s {
            Stmt::Let { value, .. } | Stmt::Store { value, .. } => value,
        };
        crate::validate::walk(v, &mut |x| {
            if let Expr::Call { func, args } = x {
                if func == "dynamic_index" {
                    if let Expr::Var(t) = &args[0] {
                        if !out.contains(t) {
                            out.push(t.clone())
                        }
                    }
                }
            }
        });
    }
    out
}

struct RustEmitter {
    out: String,
    scope: Scope,
    indent: usize,
}

impl RustEmitter {
    fn line(&mut self, s: &str) {
        crate::push_line(&mut self.out, self.indent, s);
    }

    fn open_loops(&mut self, idx: &[LoopIndex]) {
        for i in idx {
            let ext = rx(&self.scope, &i.extent);
            self.line(&format!("for {} in 0..({ext}) {{", i.name));
            self.indent += 1;
        }
    }

    fn close_loops(&mut self, n: usize) {
        for _ in 0..n {
            self.indent -= 1;
            self.line("}");
        }
    }

    fn flat(&mut self, pass: &Pass, lowered: &Lowered) {
        self.open_loops(&pass.indices);
        let mut stmts = Vec::new();
        for s in &lowered.steps {
            match s {
                Step::Stmt(s) => stmts.push(s.clone()),
                Step::Stores(st) => stmts.extend(st.iter().cloned()),
                Step::Reduce(_) => unreachable!(),
            }
        }
        self.element(&stmts);
        self.close_loops(pass.indices.len());
    }

    /// Statements of one element: values first, writes last (as the GPU does).
    fn element(&mut self, stmts: &[Stmt]) {
        let mut writes = Vec::new();
        for (i, s) in stmts.iter().enumerate() {
            match s {
                Stmt::Let { name, value } => {
                    let v = rx(&self.scope, value);
                    self.line(&format!("let {name} = {v};"));
                }
                Stmt::Store {
                    tensor,
                    index,
                    value,
                    guard,
                } => {
                    let v = rx(
                        &self.scope,
                        &crate::lower::guarded(&self.scope, value, guard.as_ref()),
                    );
                    self.line(&format!("let w{i}_ = {v};"));
                    let mut w = self.store(tensor, index, &format!("w{i}_"), value);
                    if let Some(g) = guard {
                        w = format!("if {} {{ {w} }}", rx(&self.scope, g));
                    }
                    writes.push(w);
                }
            }
        }
        for w in writes {
            self.line(&w);
        }
    }

    fn store(&self, tensor: &str, index: &[Expr], v: &str, value: &Expr) -> String {
        let t = &self.scope.tensors[tensor];
        let off = rx(&self.scope, &flat_offset(t, index));
        let is_float = self.scope.ty(value).expect("validated") == Ty::Float;
        let conv = match t.dtype {
            DType::T => format!("rt.t.round({v})"),
            DType::F32 => format!("rt.f32.round({v})"),
            DType::I32 if is_float => format!("{v}.to_i64() as i32"),
            DType::I32 => format!("{v} as i32"),
            DType::U8 => format!("{v} as u8"),
        };
        format!("{tensor}[({off}) as usize] = {conv};")
    }

    fn row(&mut self, pass: &Pass, lowered: &Lowered) {
        let (outer, inner) = pass.indices.split_at(pass.indices.len() - 1);
        let inner = inner[0].clone();
        self.open_loops(outer);
        for step in &lowered.steps {
            match step {
                Step::Stmt(s) => self.element(std::slice::from_ref(s)),
                Step::Reduce(reds) => {
                    for r in reds {
                        let b = rx(&self.scope, &r.body);
                        let ext = rx(&self.scope, &inner.extent);
                        let red = serial(r.op, &inner.name, "0i64", &ext, &b);
                        self.line(&format!("let {} = {red};", r.acc));
                    }
                }
                Step::Stores(st) => {
                    self.open_loops(std::slice::from_ref(&inner));
                    self.element(st);
                    self.close_loops(1);
                }
            }
        }
        self.close_loops(outer.len());
    }
}

/// A serial reduction of `body` over `var in lo..hi`, as a Rust block expression.
fn serial(op: ReduceOp, var: &str, lo: &str, hi: &str, body: &str) -> String {
    let lp = format!("for {var} in ({lo})..({hi})");
    match op {
        ReduceOp::Sum => format!("{{ let mut a_ = S::zero(); {lp} {{ a_ = a_ + {body}; }} a_ }}"),
        ReduceOp::Mean => format!(
            "{{ let mut a_ = S::zero(); {lp} {{ a_ = a_ + {body}; }} a_ / S::from_i64(({hi}) - ({lo})) }}"
        ),
        ReduceOp::Max => format!("{{ let mut a_ = S::from_f64(f64::NEG_INFINITY); {lp} {{ a_ = a_.max({body}); }} a_ }}"),
        ReduceOp::Min => format!("{{ let mut a_ = S::from_f64(f64::INFINITY); {lp} {{ a_ = a_.min({body}); }} a_ }}"),
        // Online: running max m and sum s of exp(x - m), as the GPU kernel computes it.
        ReduceOp::LogSumExp => format!(
            "{{ let ninf = S::from_f64(f64::NEG_INFINITY); let (mut m_, mut s_) = (ninf, S::zero()); \
             {lp} {{ let x_ = {body}; if x_ > m_ {{ s_ = s_ * (m_ - x_).exp() + S::from_f64(1.0); m_ = x_; }} \
             else if x_ > ninf {{ s_ = s_ + (x_ - m_).exp(); }} }} if m_ > ninf {{ m_ + s_.ln() }} else {{ m_ }} }}"
        ),
    }
}

/// Rust text of an expression: floats are `S`, integers `i64`.
fn rx(scope: &Scope, e: &Expr) -> String {
    match e {
        Expr::Float(v) if v.is_infinite() => {
            format!(
                "S::from_f64(f64::{})",
                if *v > 0.0 { "INFINITY" } else { "NEG_INFINITY" }
            )
        }
        Expr::Float(v) => format!("S::from_f64({v:?})"),
        Expr::Int(v) => format!("{v}i64"),
        Expr::Var(v) => v.clone(),
        Expr::Load { tensor, index } => {
            let t = &scope.tensors[tensor];
            let off = rx(scope, &flat_offset(t, index));
            if t.dtype.is_float() {
                format!("{tensor}[({off}) as usize]")
            } else {
                format!("({tensor}[({off}) as usize] as i64)")
            }
        }
        Expr::Unary { op: UnOp::Neg, arg } => format!("(-{})", rx(scope, arg)),
        Expr::Unary { op: UnOp::Not, arg } => format!("(!{})", rx(scope, arg)),
        Expr::Binary { op, lhs, rhs } => {
            let (lt, rt) = (
                scope.ty(lhs).expect("validated"),
                scope.ty(rhs).expect("validated"),
            );
            let mixed = (lt == Ty::Float) != (rt == Ty::Float) && lt != Ty::Bool && rt != Ty::Bool;
            let l = if mixed && lt == Ty::Int {
                format!("S::from_i64({})", rx(scope, lhs))
            } else {
                rx(scope, lhs)
            };
            let r = if mixed && rt == Ty::Int {
                format!("S::from_i64({})", rx(scope, rhs))
            } else {
                rx(scope, rhs)
            };
            format!("({l} {} {r})", op.symbol())
        }
        Expr::Call { func, args } => rcall(scope, func, args),
        Expr::RowReduce { .. } => unreachable!("lowered"),
        Expr::SerialReduce {
            op,
            var,
            lo,
            hi,
            body,
        } => {
            let mut inner = scope.clone();
            inner.names.insert(var.clone(), Name::Index);
            serial(
                *op,
                var,
                &rx(scope, lo),
                &rx(scope, hi),
                &as_float(&inner, body),
            )
        }
    }
}

/// An expression as `S` (converting integers).
fn as_float(scope: &Scope, e: &Expr) -> String {
    if scope.ty(e).expect("validated") == Ty::Int {
        format!("S::from_i64({})", rx(scope, e))
    } else {
        rx(scope, e)
    }
}

fn rcall(scope: &Scope, func: &str, args: &[Expr]) -> String {
    let call = Expr::Call {
        func: func.into(),
        args: args.to_vec(),
    };
    let float_result = scope.ty(&call).expect("validated") == Ty::Float;
    if func == "dynamic_index" {
        let Expr::Var(code) = &args[0] else {
            unreachable!()
        };
        return format!(
            "(crate::quant_prelude::dynamic_index(&{code}_f32, {}.to_f32()) as i64)",
            rx(scope, &args[1])
        );
    }
    let f = |i: usize| as_float(scope, &args[i]);
    match func {
        "T" => format!("rt.t.round({})", f(0)),
        "f32" => format!("rt.f32.round({})", f(0)),
        "i32" if scope.ty(&args[0]).expect("validated") == Ty::Float => {
            format!("{}.to_i64()", rx(scope, &args[0]))
        }
        "i32" => rx(scope, &args[0]),
        "exp" | "sqrt" | "rsqrt" | "tanh" | "erf" | "sigmoid" => format!("{}.{func}()", f(0)),
        "log" => format!("{}.ln()", f(0)),
        "abs" if float_result => format!("{}.abs()", f(0)),
        "abs" => format!("{}.abs()", rx(scope, &args[0])),
        "max" | "min" if float_result => format!("{}.{func}({})", f(0), f(1)),
        "max" | "min" => format!("{}.{func}({})", rx(scope, &args[0]), rx(scope, &args[1])),
        "logaddexp" => format!("{}.logaddexp({})", f(0), f(1)),
        "select" if float_result => {
            format!(
                "(if {} {{ {} }} else {{ {} }})",
                rx(scope, &args[0]),
                f(1),
                f(2)
            )
        }
        "select" => format!(
            "(if {} {{ {} }} else {{ {} }})",
            rx(scope, &args[0]),
            rx(scope, &args[1]),
            rx(scope, &args[2])
        ),
        "nf4_index" => format!(
            "(crate::quant_prelude::nf4_index({}.to_f32()) as i64)",
            f(0)
        ),
        "signbit" => format!("{}.to_f64().is_sign_negative()", f(0)),
        "bnb_recip" => format!(
            "S::from_f32(crate::quant_prelude::bnb_recip({}.to_f32()))",
            f(0)
        ),
        "mul_ftz" => format!(
            "S::from_f32(crate::quant_prelude::mul_ftz({}.to_f32(), {}.to_f32()))",
            f(0),
            f(1)
        ),
        other => unreachable!("validated builtin `{other}`"),
    }
}

fn gpu_elem(d: DType) -> &'static str {
    match d {
        DType::T => "half::bf16",
        DType::F32 => "f32",
        DType::I32 => "i32",
        DType::U8 => "u8",
    }
}

fn emit_launcher(o: &mut String, op: &OpDef, pass: &Pass) {
    let lowered = lower(op, pass);
    let args = pass_args(op, pass);
    let base = pass_fn_name(op, pass);
    let fname = base
        .trim_start_matches(&format!("{}_", op.name))
        .to_string();
    let mut params = vec![
        "gpu: &ftrt_runtime::Gpu".to_string(),
        "d: &Dims".to_string(),
    ];
    for a in &args {
        match a {
            Arg::Dim(_) => {}
            Arg::Scalar(s) if s.dtype.is_float() => params.push(format!("{}: f32", s.name)),
            Arg::Scalar(s) => params.push(format!("{}: i32", s.name)),
            Arg::Tensor { decl, .. } => params.push(format!(
                "{}: ftrt_runtime::DevPtr<{}>",
                decl.name,
                gpu_elem(decl.dtype)
            )),
        }
    }
    writeln!(
        o,
        "/// Launches the {} pass on the GPU's stream.",
        crate::validate::pass_title(pass)
    )
    .unwrap();
    writeln!(
        o,
        "pub fn {fname}({}) -> Result<(), ftrt_runtime::RuntimeError> {{",
        params.join(", ")
    )
    .unwrap();
    bind_dims(o, op, "d");
    for s in args.iter().filter_map(|a| {
        if let Arg::Scalar(s) = a {
            Some(s)
        } else {
            None
        }
    }) {
        if !s.dtype.is_float() {
            writeln!(o, "        let {0}: i64 = {0} as i64;", s.name).unwrap();
        }
    }
    let scope = &lowered.scope;
    let (outer, inner) = pass.indices.split_at(pass.indices.len() - 1);
    let inner = &inner[0];
    let prod = |ix: &[LoopIndex]| {
        if ix.is_empty() {
            "1i64".to_string()
        } else {
            ix.iter()
                .map(|i| format!("({})", rx(scope, &i.extent)))
                .collect::<Vec<_>>()
                .join(" * ")
        }
    };
    writeln!(o, "        let inner: i64 = {};", rx(scope, &inner.extent)).unwrap();
    writeln!(o, "        let outer: i64 = {};", prod(outer)).unwrap();
    writeln!(
        o,
        "        if inner <= 0 || outer <= 0 {{ return Ok(()); }}"
    )
    .unwrap();
    // Vector width: every vectorisable access aligned.
    let mut exprs: Vec<&Expr> = Vec::new();
    let mut stores = Vec::new();
    for s in &pass.body {
        match s {
            Stmt::Let { value, .. } => exprs.push(value),
            Stmt::Store {
                tensor,
                index,
                value,
                guard,
            } => {
                exprs.push(value);
                exprs.extend(index.iter());
                exprs.extend(guard.iter());
                if guard.is_none() {
                    stores.extend(vec_access(scope, tensor, index));
                }
            }
        }
    }
    let packed = packed_loads(scope, exprs.iter().copied());
    let mut accesses = vec_loads(scope, exprs);
    accesses.extend(stores);
    let mut conds: Vec<String> = vec_conditions(scope, &inner.extent, &accesses, &packed)
        .iter()
        .map(|c| rx(scope, c))
        .collect();
    let aligns = accesses
        .iter()
        .map(|a| (&a.tensor, 16))
        .chain(packed.iter().map(|a| (&a.tensor, (8 / a.div).max(1))));
    for (t, bytes) in aligns {
        let c = format!("{t}.addr % {bytes} == 0");
        if !conds.contains(&c) {
            conds.push(c);
        }
    }
    writeln!(
        o,
        "        let vec: u32 = if {} {{ 8 }} else {{ 1 }};",
        conds.join(" && ")
    )
    .unwrap();
    // 32-bit index math unless a tensor or the loop nest reaches 2^31 elements.
    let sizes: Vec<String> = args
        .iter()
        .filter_map(|a| match a {
            Arg::Tensor { decl, .. } => Some(format!("d.numel({:?}) as i64", decl.name)),
            _ => None,
        })
        .chain(std::iter::once("inner * outer".to_string()))
        .collect();
    writeln!(o, "        let idx = if [{}].iter().all(|n| *n < (1i64 << 31)) {{ \"i32\" }} else {{ \"i64\" }};", sizes.join(", ")).unwrap();
    match lowered.shape {
        Shape::Row => {
            let [w, b, big] = ROW_VARIANTS;
            // A pass that stores nothing along the row reads it once (reductions only).
            let writes_row = pass.body.iter().any(|s| {
                matches!(s, Stmt::Store { tensor, index, .. } if vec_access(scope, tensor, index).is_some())
            });
            let warp_max = if writes_row {
                WARP_ROW_MAX_INNER
            } else {
                WARP_ROW_MAX_INNER_ONE_SWEEP
            };
            writeln!(
                o,
                "        let tpr: u32 = if inner <= {warp_max} {{ {w} }} else if outer >= {FEW_ROWS} {{ {b} }} else {{ {big} }};"
            )
            .unwrap();
            writeln!(
                o,
                "        let rows_per_block: u32 = if tpr == {w} {{ 8 }} else {{ 1 }};"
            )
            .unwrap();
            writeln!(o, "        let grid = ((outer + rows_per_block as i64 - 1) / rows_per_block as i64) as u32;").unwrap();
            writeln!(o, "        let block = (tpr, rows_per_block, 1);").unwrap();
            writeln!(
                o,
                "        let name = format!(\"{base}_{{idx}}_w{{tpr}}_v{{vec}}\");"
            )
            .unwrap();
        }
        Shape::Flat => {
            writeln!(o, "        let chunks = inner * outer / vec as i64;").unwrap();
            writeln!(
                o,
                "        let grid = ((chunks + {FLAT_THREADS} - 1) / {FLAT_THREADS}).min(1 << 20) as u32;"
            )
            .unwrap();
            writeln!(o, "        let block = ({FLAT_THREADS}u32, 1u32, 1u32);").unwrap();
            writeln!(
                o,
                "        let name = format!(\"{base}_{{idx}}_v{{vec}}\");"
            )
            .unwrap();
        }
    }
    writeln!(o, "        let f = gpu.function(&super::KERNELS, &name)?;").unwrap();
    writeln!(o, "        let mut b = gpu.stream().launch_builder(&f);").unwrap();
    for a in &args {
        match a {
            Arg::Dim(n) => writeln!(o, "        b.arg(&{n});").unwrap(),
            Arg::Scalar(s) => writeln!(o, "        b.arg(&{});", s.name).unwrap(),
            Arg::Tensor { decl, .. } => writeln!(o, "        b.arg(&{}.addr);", decl.name).unwrap(),
        }
    }
    writeln!(
        o,
        "        let cfg = ftrt_runtime::cudarc::driver::LaunchConfig {{ grid_dim: (grid.max(1), 1, 1), block_dim: block, shared_mem_bytes: 0 }};"
    )
    .unwrap();
    writeln!(o, "        // SAFETY: argument order and types match the kernel's signature, generated from the same op.").unwrap();
    writeln!(o, "        unsafe {{ b.launch(cfg) }}?;").unwrap();
    writeln!(o, "        Ok(())").unwrap();
    writeln!(o, "}}").unwrap();
}

/// The generated gradient check: f64 central differences of the CPU forward against the
/// backward passes on random inputs, through `crate::dsl::gradcheck`.
fn emit_gradcheck(o: &mut String, op: &OpDef) {
    // All buffers: the op's tensors, then every gradient the backward passes touch.
    let mut bufs: Vec<TensorDecl> = op.tensors().cloned().collect();
    for p in op.backwards() {
        for g in p.grads_in.iter().chain(&p.grads_out) {
            if bufs.iter().all(|b| &b.name != g) {
                bufs.push(grad_decl(op, g).expect("validated"));
            }
        }
    }
    let idx = |n: &str| bufs.iter().position(|b| b.name == n).expect("known buffer");
    let rule = |n: &str| {
        op.check
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, r)| r.clone())
    };
    let scope = dims_scope(op);
    let draw_int = |r: &Option<CheckRule>, default: &str| -> String {
        match r {
            Some(CheckRule::Range(lo, hi)) => {
                format!("rng.int_in({}, {})", rx(&scope, lo), rx(&scope, hi))
            }
            Some(CheckRule::Choice(v)) => {
                format!(
                    "rng.choose(&[{}])",
                    v.iter()
                        .map(|e| rx(&scope, e))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            Some(CheckRule::Fixed(e)) => rx(&scope, e),
            None => default.to_string(),
        }
    };
    writeln!(o, "#[cfg(test)]").unwrap();
    writeln!(o, "mod gradcheck {{").unwrap();
    writeln!(o, "    use super::*;").unwrap();
    writeln!(o, "    use crate::dsl::gradcheck::{{Buf, Check, Rng}};").unwrap();
    writeln!(o, "    #[test]").unwrap();
    writeln!(o, "    fn finite_differences_match_backward() {{").unwrap();
    writeln!(o, "        let mut rng = Rng::fresh({:?});", op.name).unwrap();
    writeln!(o, "        for _trial in 0..4 {{").unwrap();
    for d in dims(op) {
        writeln!(
            o,
            "        let {d}: i64 = {};",
            draw_int(&rule(&d), "rng.int_in(1, 9)")
        )
        .unwrap();
    }
    let dims_init = dims(op)
        .iter()
        .map(|d| format!("{d}: {d} as usize"))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(o, "        let d = Dims {{ {dims_init} }};").unwrap();
    for s in &op.scalars {
        let v = match (rule(&s.name), s.dtype.is_float()) {
            (Some(CheckRule::Fixed(e)), true) => format!("({}) as f32", const_f64(&e)),
            (Some(CheckRule::Range(lo, hi)), true) => {
                format!("rng.uniform({}, {}) as f32", const_f64(&lo), const_f64(&hi))
            }
            (None, true) => "rng.uniform(0.5, 1.5) as f32".into(),
            (Some(CheckRule::Choice(v)), true) => {
                format!(
                    "rng.choose_f(&[{}]) as f32",
                    v.iter().map(const_f64).collect::<Vec<_>>().join(", ")
                )
            }
            (r, false) => format!("({}) as i32", draw_int(&r, "0i64")),
        };
        let ty = if s.dtype.is_float() { "f32" } else { "i32" };
        writeln!(o, "        let {}: {ty} = {v};", s.name).unwrap();
    }
    writeln!(o, "        let mut bufs: Vec<Buf> = Vec::new();").unwrap();
    for b in &bufs {
        let n = format!("d.numel({:?})", b.name);
        let init = match (b.dtype, rule(&b.name)) {
            (DType::I32, r) => format!("Buf::I(rng.ints({n}, {}))", int_range(&scope, &r)),
            (DType::U8, r) => format!(
                "Buf::U(rng.ints({n}, {}).into_iter().map(|v| v as u8).collect())",
                int_range(&scope, &r)
            ),
            (_, Some(CheckRule::Fixed(e))) => format!("Buf::F(vec![{}; {n}])", const_f64(&e)),
            (_, Some(CheckRule::Range(lo, hi))) => {
                format!(
                    "Buf::F(rng.uniforms({n}, {}, {}))",
                    const_f64(&lo),
                    const_f64(&hi)
                )
            }
            _ if op.inputs.iter().any(|i| i.name == b.name) => format!("Buf::F(rng.normals({n}))"),
            _ => format!("Buf::F(vec![0.0; {n}])"),
        };
        writeln!(o, "        bufs.push({init});").unwrap();
    }
    // Forward and backward over the buffer list.
    let call = |pass: &Pass| -> String {
        let args = pass_args(op, pass);
        let fname = pass_fn_name(op, pass)
            .trim_start_matches(&format!("{}_", op.name))
            .to_string();
        let mut take = String::new();
        let mut put = String::new();
        let mut call_args = vec!["&d".to_string()];
        for a in &args {
            match a {
                Arg::Dim(_) => {}
                Arg::Scalar(s) => call_args.push(s.name.clone()),
                Arg::Tensor { decl, written } => {
                    let i = idx(&decl.name);
                    let (take_fn, ctor) = match decl.dtype {
                        DType::I32 => ("take_i", "I"),
                        DType::U8 => ("take_u", "U"),
                        _ => ("take_f", "F"),
                    };
                    write!(take, "let mut t{i} = b[{i}].{take_fn}(); ").unwrap();
                    write!(put, "b[{i}] = Buf::{ctor}(t{i}); ").unwrap();
                    call_args.push(if *written {
                        format!("&mut t{i}")
                    } else {
                        format!("&t{i}")
                    });
                }
            }
        }
        call_args.push("Rounding::EXACT".into());
        format!("{take}{fname}_cpu::<f64>({}); {put}", call_args.join(", "))
    };
    writeln!(
        o,
        "        let forward = |b: &mut Vec<Buf>| {{ {} }};",
        call(op.forward())
    )
    .unwrap();
    let bwd: String = op.backwards().map(call).collect::<Vec<_>>().join(" ");
    writeln!(o, "        let backward = |b: &mut Vec<Buf>| {{ {bwd} }};").unwrap();
    let mut outs = Vec::new();
    let mut wrt = Vec::new();
    for p in op.backwards() {
        for g in &p.grads_in {
            let pair = (idx(&g[1..]), idx(g));
            if !outs.contains(&pair) {
                outs.push(pair);
            }
        }
        for g in &p.grads_out {
            let pair = (idx(&g[1..]), idx(g));
            if !wrt.contains(&pair) {
                wrt.push(pair);
            }
        }
    }
    writeln!(
        o,
        "        Check {{ op: {:?}, outputs: &{outs:?}, inputs: &{wrt:?} }}.run(&mut rng, bufs, &forward, &backward);",
        op.name
    )
    .unwrap();
    writeln!(o, "        }}").unwrap();
    writeln!(o, "    }}").unwrap();
    writeln!(o, "}}").unwrap();
}

fn int_range(scope: &Scope, r: &Option<CheckRule>) -> String {
    match r {
        Some(CheckRule::Range(lo, hi)) => format!("{}, {}", rx(scope, lo), rx(scope, hi)),
        _ => "0, 4".into(),
    }
}

/// A literal check value as f64 text (`-inf`, `1e-5`).
fn const_f64(e: &Expr) -> String {
    match e {
        Expr::Float(v) if v.is_infinite() => (if *v > 0.0 {
            "f64::INFINITY"
        } else {
            "f64::NEG_INFINITY"
        })
        .into(),
        Expr::Float(v) => format!("{v:?}"),
        Expr::Int(v) => format!("{v}.0"),
        Expr::Unary { op: UnOp::Neg, arg } => format!("-{}", const_f64(arg)),
        other => panic!("check values must be literals, got {other:?}"),
    }
}
