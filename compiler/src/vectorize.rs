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
pub fn launch_constant(scope: &Scope, e: &Expr) -> bool {
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
/// shift are multiples of 8; each packed tensor's last dim a multiple of its `8 / div` bytes.
/// Pointer alignment is checked separately by the launcher.
pub fn vec_conditions(
    scope: &Scope,
    inner_extent: &Expr,
    accesses: &[VecAccess],
    packed: &[PackedAccess],
) -> Vec<Expr> {
    let mult = |e: &Expr, n: i64| Expr::Binary {
        op: BinOp::Eq,
        lhs: Box::new(Expr::Binary {
            op: BinOp::Rem,
            lhs: Box::new(e.clone()),
            rhs: Box::new(Expr::Int(n)),
        }),
        rhs: Box::new(Expr::Int(0)),
    };
    let mult8 = |e: &Expr| mult(e, 8);
    let mut conds = vec![mult8(inner_extent)];
    for a in accesses {
        let t = &scope.tensors[&a.tensor];
        conds.push(mult8(t.dims.last().expect("indexed tensors have dims")));
        if !matches!(a.shift, Expr::Int(0)) {
            conds.push(mult8(&a.shift));
        }
    }
    for a in packed {
        let t = &scope.tensors[&a.tensor];
        let bytes = (8 / a.div).max(1);
        conds.push(mult(
            t.dims.last().expect("indexed tensors have dims"),
            bytes,
        ));
    }
    conds
}

/// A packed access: a u8 tensor whose last index is `c / div` along the innermost loop index
/// `c` (sub-byte codes, `div` of them per byte), the other indices fixed along the row. `VEC`
/// consecutive `c`s from a multiple of `VEC` read `VEC / div` consecutive bytes: one load
/// (a 32-bit load for 8 NF4 codes) instead of one per element.
#[derive(Clone, Debug)]
pub struct PackedAccess {
    pub tensor: String,
    pub index: Vec<Expr>,
    pub div: i64,
}

impl PackedAccess {
    /// A stable name for the register array holding this access's bytes.
    pub fn key(&self) -> String {
        format!("{}{:?}", self.tensor, self.index)
    }
}

/// The access `tensor[index]` if it is a packed access in `scope`.
pub fn packed_access(scope: &Scope, tensor: &str, index: &[Expr]) -> Option<PackedAccess> {
    let t = scope.tensors.get(tensor)?;
    if t.dtype != DType::U8 {
        return None;
    }
    let (last, outer) = index.split_last()?;
    if outer.iter().any(|i| scope.varies(i)) {
        return None;
    }
    match last {
        Expr::Binary {
            op: BinOp::Div,
            lhs,
            rhs,
        } if matches!(&**lhs, Expr::Var(v) if *v == scope.inner)
            && matches!(**rhs, Expr::Int(2 | 4 | 8)) =>
        {
            let Expr::Int(div) = **rhs else {
                unreachable!()
            };
            Some(PackedAccess {
                tensor: tensor.to_string(),
                index: index.to_vec(),
                div,
            })
        }
        _ => None,
    }
}

/// Every packed load in `exprs` (not inside serial reductions), deduplicated.
pub fn packed_loads<'a>(
    scope: &Scope,
    exprs: impl IntoIterator<Item = &'a Expr>,
) -> Vec<PackedAccess> {
    let mut out: Vec<PackedAccess> = Vec::new();
    for e in exprs {
        walk_loads(e, &mut |tensor, index| {
            if let Some(a) = packed_access(scope, tensor, index) {
                if out.iter().all(|o| o.key() != a.key()) {
                    out.push(a);
                }
            }
        });
    }
    out
}

/// Calls `f` on every load of `e` outside serial reductions' bodies.
fn walk_loads(e: &Expr, f: &mut impl FnMut(&str, &[Expr])) {
    match e {
        Expr::Load { tensor, index } => {
            f(tensor, index);
            index.iter().for_each(|i| walk_loads(i, f));
        }
        Expr::SerialReduce { lo, hi, .. } => {
            walk_loads(lo, f);
            walk_loads(hi, f);
        }
        Expr::Unary { arg, .. } => walk_loads(arg, f),
        Expr::Binary { lhs, rhs, .. } => {
            walk_loads(lhs, f);
            walk_loads(rhs, f);
        }
        Expr::Call { args, .. } => args.iter().for_each(|a| walk_loads(a, f)),
        Expr::RowReduce { body, .. } => walk_loads(body, f),
        Expr::Float(_) | Expr::Int(_) | Expr::Var(_) => {}
    }
}

/// Largest lookup table staged in shared memory, in elements.
pub const STAGED_TABLE_MAX: i64 = 256;

/// Lookup tables of a pass: read-only tensors of constant size (at most [`STAGED_TABLE_MAX`]
/// elements) gathered per element at an index computed from loaded data (NF4 code books,
/// 8-bit quantization maps). Kernels copy them into shared memory once per block.
pub fn staged_tables(scope: &Scope, exprs: &[&Expr], written: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in exprs {
        walk_loads(e, &mut |tensor, index| {
            let Some(t) = scope.tensors.get(tensor) else {
                return;
            };
            let size = t.dims.iter().try_fold(1i64, |n, d| match d {
                Expr::Int(k) => Some(n * k),
                _ => None,
            });
            let gathered = index.iter().any(|i| data_dependent(scope, i))
                && index.iter().any(|i| scope.varies(i));
            if size.is_some_and(|n| n <= STAGED_TABLE_MAX)
                && gathered
                && !written.iter().any(|w| w == tensor)
                && !out.iter().any(|o| o == tensor)
            {
                out.push(tensor.to_string());
            }
        });
    }
    out
}

/// Whether `e` depends on loaded data: it contains a load or names a `let`.
fn data_dependent(scope: &Scope, e: &Expr) -> bool {
    let mut dep = false;
    walk(e, &mut |x| match x {
        Expr::Load { .. } => dep = true,
        Expr::Var(v) => dep |= matches!(scope.names.get(v), Some(Name::Let(_))),
        _ => {}
    });
    dep
}
