//! Which tensor accesses of a pass can move 16 bytes at a time.
//!
//! An access is vectorisable when only its last index moves along the innermost loop index
//! `c`, as `c` or `c + e` with `e` made of dims, scalars and literals: then `VEC` consecutive
//! `c`s touch `VEC` consecutive elements. Whether the launch may use `VEC = 8` also depends on
//! run-time values (extents and `e` multiples of 8, pointers 16-byte aligned), which the
//! launcher checks with [`vec_conditions`].
use crate::ast::*;
use crate::validate::{walk, Name, Scope};

/// A vectorisable access: `tensor[index]`, whose innermost offset is `c + shift`.
#[derive(Clone, Debug)]
pub struct VecAccess {
    pub tensor: String,
    pub index: Vec<Expr>,
    pub shift: Expr,
}

impl VecAccess {
    /// A stable name for the register array holding this access's `VEC` values.
    pub fn key(&self) -> String {
        format!("{}{:?}", self.tensor, self.index)
    }
}

/// The access `tensor[index]` if it is vectorisable in `scope`.
pub fn vec_access(scope: &Scope, tensor: &str, index: &[Expr]) -> Option<VecAccess> {
    let t = scope.tensors.get(tensor)?;
    if !t.dtype.is_float() {
        return None;
    }
    let (last, outer) = index.split_last()?;
    if outer.iter().any(|i| scope.varies(i)) {
        return None;
    }
    let is_inner = |e: &Expr| matches!(e, Expr::Var(v) if *v == scope.inner);
    let shift = match last {
        e if is_inner(e) => Expr::Int(0),
        Expr::Binary {
            op: BinOp::Add,
            lhs,
            rhs,
        } if is_inner(lhs) && launch_constant(scope, rhs) => (**rhs).clone(),
        Expr::Binary {
            op: BinOp::Add,
            lhs,
            rhs,
        } if is_inner(rhs) && launch_constant(scope, lhs) => (**lhs).clone(),
        _ => return None,
    };
    Some(VecAccess {
        tensor: tensor.to_string(),
        index: index.to_vec(),
        shift,
    })
}

/// Whether `e` is known at launch: only dims, scalar parameters and literals.
fn launch_constant(scope: &Scope, e: &Expr) -> bool {
    let mut ok = true;
    walk(e, &mut |x| match x {
        Expr::Var(v) => ok &= matches!(scope.names.get(v), Some(Name::Dim | Name::Scalar(_))),
        Expr::Load { .. } | Expr::RowReduce { .. } | Expr::SerialReduce { .. } => ok = false,
        _ => {}
    });
    ok
}

/// Every vectorisable load in `exprs` (not inside serial reductions), deduplicated.
pub fn vec_loads<'a>(scope: &Scope, exprs: impl IntoIterator<Item = &'a Expr>) -> Vec<VecAccess> {
    let mut out: Vec<VecAccess> = Vec::new();
    for e in exprs {
        collect_loads(scope, e, &mut out);
    }
    out
}

fn collect_loads(scope: &Scope, e: &Expr, out: &mut Vec<VecAccess>) {
    match e {
        Expr::Load { tensor, index } => {
            if let Some(a) = vec_access(scope, tensor, index) {
                if out.iter().all(|o| o.key() != a.key()) {
                    out.push(a);
                }
            }
            index.iter().for_each(|i| collect_loads(scope, i, out));
        }
        Expr::SerialReduce { lo, hi, .. } => {
            collect_loads(scope, lo, out);
            collect_loads(scope, hi, out);
        }
        Expr::Unary { arg, .. } => collect_loads(scope, arg, out),
        Expr::Binary { lhs, rhs, .. } => {
            collect_loads(scope, lhs, out);
            collect_loads(scope, rhs, out);
        }
        Expr::Call { args, .. } => args.iter().for_each(|a| collect_loads(scope, a, out)),
        Expr::RowReduce { body, .. } => collect_loads(scope, body, out),
        Expr::Float(_) | Expr::Int(_) | Expr::Var(_) => {}
    }
}

/// Run-time conditions (as expressions over dims and scalars) under which every access in
/// `accesses` may use 8-wide vectors: the innermost extent, each tensor's last dim and each
/// shift are multiples of 8. Pointer alignment is checked separately by the launcher.
pub fn vec_conditions(scope: &Scope, inner_extent: &Expr, accesses: &[VecAccess]) -> Vec<Expr> {
    let mult8 = |e: &Expr| Expr::Binary {
        op: BinOp::Eq,
        lhs: Box::new(Expr::Binary {
            op: BinOp::Rem,
            lhs: Box::new(e.clone()),
            rhs: Box::new(Expr::Int(8)),
        }),
        rhs: Box::new(Expr::Int(0)),
    };
    let mut conds = vec![mult8(inner_extent)];
    for a in accesses {
        let t = &scope.tensors[&a.tensor];
        conds.push(mult8(t.dims.last().expect("indexed tensors have dims")));
        if !matches!(a.shift, Expr::Int(0)) {
            conds.push(mult8(&a.shift));
        }
    }
    conds
}
