//! Name resolution, typing and the checks that make a malformed op a compile error.
use crate::ast::*;
use std::collections::BTreeMap;

/// The value types of DSL expressions: arithmetic is f32 (CPU: the reference's `S`),
/// integers are 64-bit (index math never overflows), comparisons give booleans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Float,
    Int,
    Bool,
}

/// What a bare name refers to inside one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name {
    Index,
    Dim,
    Scalar(DType),
    Let(Ty),
    Tensor,
}

/// Builtin functions: name, arity, result type (None: same as the (promoted) arguments).
const BUILTINS: &[(&str, usize, Option<Ty>)] = &[
    ("T", 1, Some(Ty::Float)),
    ("f32", 1, Some(Ty::Float)),
    ("i32", 1, Some(Ty::Int)),
    ("exp", 1, Some(Ty::Float)),
    ("log", 1, Some(Ty::Float)),
    ("sqrt", 1, Some(Ty::Float)),
    ("rsqrt", 1, Some(Ty::Float)),
    ("tanh", 1, Some(Ty::Float)),
    ("erf", 1, Some(Ty::Float)),
    ("sigmoid", 1, Some(Ty::Float)),
    ("abs", 1, None),
    ("max", 2, None),
    ("min", 2, None),
    ("logaddexp", 2, Some(Ty::Float)),
    ("select", 3, None),
    ("signbit", 1, Some(Ty::Bool)),
    ("nf4_index", 1, Some(Ty::Int)),
    ("bnb_recip", 1, Some(Ty::Float)),
    ("mul_ftz", 2, Some(Ty::Float)),
    ("dynamic_index", 2, Some(Ty::Int)),
];

pub fn builtin(name: &str) -> Option<(usize, Option<Ty>)> {
    BUILTINS.iter().find(|b| b.0 == name).map(|b| (b.1, b.2))
}

/// Name of the gradient tensor of `t`: `d` + name.
pub fn grad_name(t: &str) -> String {
    format!("d{t}")
}

/// The declaration of a gradient tensor `dX`: X's shape and dtype.
pub fn grad_decl(op: &OpDef, grad: &str) -> Option<TensorDecl> {
    let base = grad.strip_prefix('d')?;
    let t = op.tensor(base)?;
    Some(TensorDecl {
        name: grad.to_string(),
        dims: t.dims.clone(),
        dtype: t.dtype,
        inout: false,
    })
}

/// Every tensor a pass may touch, with its declaration: the op's tensors plus the pass's grads.
pub fn pass_tensors(op: &OpDef, pass: &Pass) -> Vec<TensorDecl> {
    let mut all: Vec<TensorDecl> = op.tensors().cloned().collect();
    for g in pass.grads_in.iter().chain(&pass.grads_out) {
        if all.iter().all(|t| &t.name != g) {
            if let Some(d) = grad_decl(op, g) {
                all.push(d);
            }
        }
    }
    all
}

/// Names of the symbolic dims: identifiers in tensor shapes and loop extents that are not
/// scalars, in first-seen order.
pub fn dims(op: &OpDef) -> Vec<String> {
    let mut out = Vec::new();
    let scalars: Vec<&str> = op.scalars.iter().map(|s| s.name.as_str()).collect();
    let mut visit = |e: &Expr| {
        walk(e, &mut |x| {
            if let Expr::Var(v) = x {
                if !scalars.contains(&v.as_str()) && !out.contains(v) {
                    out.push(v.clone());
                }
            }
        })
    };
    for t in op.tensors() {
        t.dims.iter().for_each(&mut visit);
    }
    for p in &op.passes {
        for i in &p.indices {
            visit(&i.extent);
        }
    }
    out
}

/// Pre-order walk over an expression tree.
pub fn walk(e: &Expr, f: &mut dyn FnMut(&Expr)) {
    f(e);
    match e {
        Expr::Load { index, .. } => index.iter().for_each(|i| walk(i, f)),
        Expr::Unary { arg, .. } => walk(arg, f),
        Expr::Binary { lhs, rhs, .. } => {
            walk(lhs, f);
            walk(rhs, f)
        }
        Expr::Call { args, .. } => args.iter().for_each(|a| walk(a, f)),
        Expr::RowReduce { body, .. } => walk(body, f),
        Expr::SerialReduce { lo, hi, body, .. } => {
            walk(lo, f);
            walk(hi, f);
            walk(body, f)
        }
        Expr::Float(_) | Expr::Int(_) | Expr::Var(_) => {}
    }
}

/// Rebuilds an expression bottom-up through `f`.
pub fn map(e: &Expr, f: &mut dyn FnMut(Expr) -> Expr) -> Expr {
    let rebuilt = match e {
        Expr::Load { tensor, index } => Expr::Load {
            tensor: tensor.clone(),
            index: index.iter().map(|i| map(i, f)).collect(),
        },
        Expr::Unary { op, arg } => Expr::Unary {
            op: *op,
            arg: Box::new(map(arg, f)),
        },
        Expr::Binary { op, lhs, rhs } => Expr::Binary {
            op: *op,
            lhs: Box::new(map(lhs, f)),
            rhs: Box::new(map(rhs, f)),
        },
        Expr::Call { func, args } => Expr::Call {
            func: func.clone(),
            args: args.iter().map(|a| map(a, f)).collect(),
        },
        Expr::RowReduce { op, body } => Expr::RowReduce {
            op: *op,
            body: Box::new(map(body, f)),
        },
        Expr::SerialReduce {
            op,
            var,
            lo,
            hi,
            body,
        } => Expr::SerialReduce {
            op: *op,
            var: var.clone(),
            lo: Box::new(map(lo, f)),
            hi: Box::new(map(hi, f)),
            body: Box::new(map(body, f)),
        },
        leaf => leaf.clone(),
    };
    f(rebuilt)
}

/// Turns the parser's tentative `@sum(c, e)` calls into row reductions over the pass's
/// innermost index, or back into elementwise `max(a, b)` / `min(a, b)`.
pub fn resolve_reductions(op: &mut OpDef) {
    for pass in &mut op.passes {
        let inner = pass
            .indices
            .last()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        let mut fix = |e: Expr| match e {
            Expr::Call { func, mut args } if func.starts_with('@') => {
                let name = &func[1..];
                let is_row = matches!(&args[0], Expr::Var(v) if *v == inner);
                if is_row {
                    let body = args.pop().expect("two args");
                    Expr::RowReduce {
                        op: ReduceOp::parse(name).expect("parsed"),
                        body: Box::new(body),
                    }
                } else {
                    Expr::Call {
                        func: name.to_string(),
                        args,
                    }
                }
            }
            other => other,
        };
        for s in &mut pass.body {
            match s {
                Stmt::Let { value, .. } => *value = map(value, &mut fix),
                Stmt::Store {
                    index,
                    value,
                    guard,
                    ..
                } => {
                    *value = map(value, &mut fix);
                    if let Some(g) = guard {
                        *g = map(g, &mut fix);
                    }
                    for i in index.iter_mut() {
                        *i = map(i, &mut fix);
                    }
                }
            }
        }
    }
}

/// Name environment of one pass, filled statement by statement.
#[derive(Clone, Debug)]
pub struct Scope {
    pub names: BTreeMap<String, Name>,
    pub tensors: BTreeMap<String, TensorDecl>,
    pub inner: String,
    /// `let`s of a flat pass whose value changes along the innermost index.
    pub varying: std::collections::BTreeSet<String>,
}

impl Scope {
    pub fn new(op: &OpDef, pass: &Pass) -> Scope {
        let mut names = BTreeMap::new();
        for d in dims(op) {
            names.insert(d, Name::Dim);
        }
        for s in &op.scalars {
            names.insert(s.name.clone(), Name::Scalar(s.dtype));
        }
        for i in &pass.indices {
            names.insert(i.name.clone(), Name::Index);
        }
        let tensors: BTreeMap<String, TensorDecl> = pass_tensors(op, pass)
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        for t in tensors.keys() {
            names.insert(t.clone(), Name::Tensor);
        }
        let inner = pass
            .indices
            .last()
            .map(|i| i.name.clone())
            .unwrap_or_default();
        Scope {
            names,
            tensors,
            inner,
            varying: Default::default(),
        }
    }

    /// Type of an expression; errors name the first problem.
    pub fn ty(&self, e: &Expr) -> Result<Ty, String> {
        Ok(match e {
            Expr::Float(_) => Ty::Float,
            Expr::Int(_) => Ty::Int,
            Expr::Var(v) => match self.names.get(v) {
                Some(Name::Index | Name::Dim) => Ty::Int,
                Some(Name::Scalar(d)) => dtype_ty(*d),
                Some(Name::Let(t)) => *t,
                Some(Name::Tensor) => return Err(format!("tensor `{v}` used without an index")),
                None => return Err(format!("unknown name `{v}`")),
            },
            Expr::Load { tensor, index } => {
                let t = self
                    .tensors
                    .get(tensor)
                    .ok_or_else(|| format!("unknown tensor `{tensor}`"))?;
                self.check_index(t, index)?;
                dtype_ty(t.dtype)
            }
            Expr::Unary { op: UnOp::Neg, arg } => match self.ty(arg)? {
                Ty::Bool => return Err("cannot negate a boolean".into()),
                t => t,
            },
            Expr::Unary { op: UnOp::Not, arg } => {
                expect(self.ty(arg)?, Ty::Bool, "`!`")?;
                Ty::Bool
            }
            Expr::Binary { op, lhs, rhs } => {
                let (a, b) = (self.ty(lhs)?, self.ty(rhs)?);
                if op.is_logical() {
                    expect(a, Ty::Bool, op.symbol())?;
                    expect(b, Ty::Bool, op.symbol())?;
                    Ty::Bool
                } else if op.is_bitwise() {
                    expect(a, Ty::Int, op.symbol())?;
                    expect(b, Ty::Int, op.symbol())?;
                    Ty::Int
                } else if (a == Ty::Bool) != (b == Ty::Bool)
                    || (a == Ty::Bool && !matches!(op, BinOp::Eq | BinOp::Ne))
                {
                    return Err(format!("`{}` on a boolean", op.symbol()));
                } else if op.is_comparison() {
                    Ty::Bool
                } else {
                    promote(a, b)
                }
            }
            Expr::Call { func, args } => self.ty_call(func, args)?,
            Expr::RowReduce { body, .. } => {
                expect_num(self.ty(body)?, "a reduction")?;
                Ty::Float
            }
            Expr::SerialReduce {
                var, lo, hi, body, ..
            } => {
                expect(self.ty(lo)?, Ty::Int, "a serial reduction's bound")?;
                expect(self.ty(hi)?, Ty::Int, "a serial reduction's bound")?;
                let mut inner = self.clone();
                inner.names.insert(var.clone(), Name::Index);
                expect_num(inner.ty(body)?, "a reduction")?;
                Ty::Float
            }
        })
    }

    fn ty_call(&self, func: &str, args: &[Expr]) -> Result<Ty, String> {
        let (arity, result) = builtin(func).ok_or_else(|| format!("unknown function `{func}`"))?;
        if args.len() != arity {
            return Err(format!(
                "`{func}` takes {arity} argument(s), got {}",
                args.len()
            ));
        }
        if func == "dynamic_index" {
            match &args[0] {
                Expr::Var(t) if self.tensors.contains_key(t) => {}
                _ => return Err("`dynamic_index(code, x)` needs a code tensor first".into()),
            }
            expect(self.ty(&args[1])?, Ty::Float, "`dynamic_index`")?;
            return Ok(Ty::Int);
        }
        let tys = args
            .iter()
            .map(|a| self.ty(a))
            .collect::<Result<Vec<_>, _>>()?;
        if func == "select" {
            expect(tys[0], Ty::Bool, "`select`'s condition")?;
            return Ok(promote(tys[1], tys[2]));
        }
        for t in &tys {
            expect_num(*t, &format!("`{func}`"))?;
        }
        Ok(match result {
            Some(r) => r,
            None => tys.into_iter().reduce(promote).expect("arity >= 1"),
        })
    }

    fn check_index(&self, t: &TensorDecl, index: &[Expr]) -> Result<(), String> {
        if index.len() != t.dims.len() {
            return Err(format!(
                "`{}` has {} dims but is indexed with {}",
                t.name,
                t.dims.len(),
                index.len()
            ));
        }
        for i in index {
            expect(self.ty(i)?, Ty::Int, &format!("an index of `{}`", t.name))?;
        }
        Ok(())
    }

    /// Whether `e` varies with the innermost loop index (outside row reductions, which bind it).
    pub fn varies(&self, e: &Expr) -> bool {
        match e {
            Expr::Var(v) => *v == self.inner || self.varying.contains(v),
            Expr::RowReduce { .. } => false,
            Expr::Load { index, .. } => index.iter().any(|i| self.varies(i)),
            Expr::Unary { arg, .. } => self.varies(arg),
            Expr::Binary { lhs, rhs, .. } => self.varies(lhs) || self.varies(rhs),
            Expr::Call { args, .. } => args.iter().any(|a| self.varies(a)),
            Expr::SerialReduce { lo, hi, body, .. } => {
                self.varies(lo) || self.varies(hi) || self.varies(body)
            }
            Expr::Float(_) | Expr::Int(_) => false,
        }
    }
}

pub fn dtype_ty(d: DType) -> Ty {
    if d.is_float() {
        Ty::Float
    } else {
        Ty::Int
    }
}

fn promote(a: Ty, b: Ty) -> Ty {
    if a == Ty::Float || b == Ty::Float {
        Ty::Float
    } else {
        a
    }
}

fn expect(got: Ty, want: Ty, what: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what} needs {want:?}, got {got:?}"))
    }
}

fn expect_num(got: Ty, what: &str) -> Result<(), String> {
    if got == Ty::Bool {
        Err(format!("{what} needs a number, got a boolean"))
    } else {
        Ok(())
    }
}

fn contains_row_reduce(e: &Expr) -> bool {
    let mut found = false;
    walk(e, &mut |x| found |= matches!(x, Expr::RowReduce { .. }));
    found
}

/// Checks an op; the error says what is wrong in words a kernel author can act on.
pub fn validate(op: &OpDef) -> Result<(), String> {
    let forwards = op
        .passes
        .iter()
        .filter(|p| p.kind == PassKind::Forward)
        .count();
    if forwards != 1 {
        return Err(format!(
            "an op needs exactly one `forward` pass, found {forwards}"
        ));
    }
    let mut seen = Vec::new();
    for n in op
        .tensors()
        .map(|t| &t.name)
        .chain(op.scalars.iter().map(|s| &s.name))
    {
        if seen.contains(&n) {
            return Err(format!("`{n}` is declared twice"));
        }
        seen.push(n);
    }
    for pass in &op.passes {
        validate_pass(op, pass).map_err(|e| format!("{} pass: {e}", pass_title(pass)))?;
    }
    // The gradient check must be able to draw every integer tensor.
    if op.backwards().next().is_some() {
        for t in op.inputs.iter().filter(|t| !t.dtype.is_float()) {
            if !op.check.iter().any(|(n, _)| *n == t.name) {
                return Err(format!(
                    "integer input `{}` needs a range in `check {{ {} in lo..hi }}` for the gradient check",
                    t.name, t.name
                ));
            }
        }
    }
    Ok(())
}

pub fn pass_title(pass: &Pass) -> String {
    match (&pass.kind, &pass.label) {
        (PassKind::Forward, _) => "forward".into(),
        (PassKind::Backward, Some(l)) => format!("backward {l}"),
        (PassKind::Backward, None) => "backward".into(),
    }
}

fn validate_pass(op: &OpDef, pass: &Pass) -> Result<(), String> {
    if pass.indices.is_empty() {
        return Err("a pass needs at least one loop index".into());
    }
    for g in pass.grads_in.iter().chain(&pass.grads_out) {
        if grad_decl(op, g).is_none() {
            return Err(format!("`{g}` is not `d` + the name of a tensor of the op"));
        }
    }
    let mut scope = Scope::new(op, pass);
    for i in &pass.indices {
        expect(scope.ty(&i.extent)?, Ty::Int, "a loop extent")?;
    }
    let writable: Vec<String> = match pass.kind {
        PassKind::Forward => op
            .outputs
            .iter()
            .chain(&op.saves)
            .chain(op.inputs.iter().filter(|t| t.inout))
            .map(|t| t.name.clone())
            .collect(),
        PassKind::Backward => pass.grads_out.clone(),
    };
    for s in &pass.body {
        match s {
            Stmt::Let { name, value } => {
                if scope.names.contains_key(name) {
                    return Err(format!("`let {name}` shadows an existing name"));
                }
                let t = scope.ty(value)?;
                if t == Ty::Bool {
                    return Err(format!("`let {name}` is a boolean; use it inside `select`"));
                }
                scope.names.insert(name.clone(), Name::Let(t));
            }
            Stmt::Store {
                tensor,
                index,
                value,
                guard,
            } => {
                if let Some(g) = guard {
                    expect(scope.ty(g)?, Ty::Bool, "a store's `if` condition")?;
                }
                if !writable.contains(tensor) {
                    return Err(format!(
                        "`{tensor}` is not written by this pass (writable here: {})",
                        writable.join(", ")
                    ));
                }
                let t = &scope.tensors[tensor];
                scope.check_index(t, index)?;
                let vt = scope.ty(value)?;
                if vt == Ty::Bool || (vt == Ty::Float && !t.dtype.is_float()) {
                    return Err(format!(
                        "store to `{tensor}` ({}) of a {vt:?}",
                        t.dtype.name()
                    ));
                }
                if index.iter().any(contains_row_reduce) {
                    return Err(format!("an index of `{tensor}` contains a reduction"));
                }
            }
        }
    }
    Ok(())
}
