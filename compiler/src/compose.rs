//! Composition: `use rms_norm.forward(x = hv, w = w, eps = eps, y = y, rstd = rstd);` inlines
//! another op's pass into the caller's loop nest, so the composite compiles to one kernel.
//!
//! The callee's loop indices become the caller's (positionally), its `let`s are renamed
//! `<op>_<name>`, its dims are read off the shapes of what its tensors are bound to, and each
//! of its tensors is replaced by the caller's binding: a caller tensor (same indexing), a caller
//! `let` (a read at the current loop indices), or, for an output, `let g` (the value the callee
//! would store becomes the caller's new binding `g`).
use crate::ast::*;
use crate::validate::{grad_decl, map};
use std::collections::BTreeMap;

fn callee_pass<'a>(lib: &'a OpDef, name: &str) -> Option<&'a Pass> {
    lib.passes
        .iter()
        .find(|p| crate::lower::pass_fn_name(lib, p) == format!("{}_{name}", lib.name))
}

/// Declarations the callee's pass can name: its tensors and gradients.
fn callee_tensors(lib: &OpDef, pass: &Pass) -> BTreeMap<String, TensorDecl> {
    crate::validate::pass_tensors(lib, pass)
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

fn caller_tensor(op: &OpDef, pass: &Pass, name: &str) -> Option<TensorDecl> {
    op.tensor(name).cloned().or_else(|| {
        pass.grads_in
            .iter()
            .chain(&pass.grads_out)
            .find(|g| *g == name)
            .and_then(|g| grad_decl(op, g))
    })
}

/// The statements of `lib`'s pass `pass_name`, rewritten into the caller's pass (`op`'s header
/// and the pass's loop nest and gradients; its body may still be empty).
pub fn inline(
    op: &OpDef,
    pass: &Pass,
    lib: &OpDef,
    pass_name: &str,
    bindings: &[(String, Binding)],
) -> Result<Vec<Stmt>, String> {
    let what = format!("`use {}.{pass_name}`", lib.name);
    let cp = callee_pass(lib, pass_name)
        .ok_or_else(|| format!("{what}: `{}` has no pass `{pass_name}`", lib.name))?;
    if cp.indices.len() != pass.indices.len() {
        return Err(format!(
            "{what}: the callee loops over {} indices, this pass over {}",
            cp.indices.len(),
            pass.indices.len()
        ));
    }
    let tensors = callee_tensors(lib, cp);
    let bind: BTreeMap<&str, &Binding> = bindings.iter().map(|(k, v)| (k.as_str(), v)).collect();
    // Every name the callee's pass touches must be bound.
    let touched = crate::lower::touched_tensors(cp);
    for t in &touched {
        if !bind.contains_key(t.as_str()) {
            return Err(format!(
                "{what}: bind the callee's tensor `{t}` (e.g. `{t} = <tensor or let>`)"
            ));
        }
    }
    let mut rename: BTreeMap<String, Expr> = BTreeMap::new();
    for (ci, i) in cp.indices.iter().zip(&pass.indices) {
        rename.insert(ci.name.clone(), Expr::Var(i.name.clone()));
    }
    // Dims: from bound tensors' shapes, or the caller's loop extents for let-bound tensors.
    for t in &touched {
        let decl = &tensors[t];
        let caller_dims: Vec<Expr> = match bind[t.as_str()] {
            Binding::Name(n) => match caller_tensor(op, pass, n) {
                Some(ct) => ct.dims,
                None => pass.indices.iter().map(|i| i.extent.clone()).collect(),
            },
            Binding::NewLet(_) => pass.indices.iter().map(|i| i.extent.clone()).collect(),
        };
        for (cd, d) in decl.dims.iter().zip(caller_dims) {
            if let Expr::Var(v) = cd {
                rename.entry(v.clone()).or_insert(d);
            }
        }
    }
    for s in &lib.scalars {
        match bind.get(s.name.as_str()) {
            Some(Binding::Name(n)) => {
                rename.insert(s.name.clone(), Expr::Var(n.clone()));
            }
            Some(Binding::NewLet(_)) => {
                return Err(format!("{what}: scalar `{}` cannot be `let`", s.name))
            }
            None if crate::lower::pass_args(lib, cp)
                .iter()
                .any(|a| matches!(a, crate::lower::Arg::Scalar(x) if x.name == s.name)) =>
            {
                return Err(format!("{what}: bind the callee's scalar `{}`", s.name))
            }
            None => {}
        }
    }
    for s in &cp.body {
        if let Stmt::Let { name, .. } = s {
            rename.insert(name.clone(), Expr::Var(format!("{}_{name}", lib.name)));
        }
    }
    let loop_vars: Vec<&str> = cp.indices.iter().map(|i| i.name.as_str()).collect();
    let rewrite = |e: &Expr| -> Result<Expr, String> {
        let mut err = None;
        let out = map(e, &mut |x| match x {
            Expr::Var(v) => rename.get(&v).cloned().unwrap_or(Expr::Var(v)),
            Expr::Load { tensor, index } => match bind.get(tensor.as_str()) {
                Some(Binding::Name(n)) if caller_tensor(op, pass, n).is_some() => Expr::Load {
                    tensor: n.clone(),
                    index,
                },
                Some(Binding::Name(n)) => Expr::Var(n.clone()),
                _ => {
                    err = Some(format!(
                        "{what}: `{tensor}` is read but bound to no caller name"
                    ));
                    Expr::Int(0)
                }
            },
            Expr::Call { func, mut args } if func == "dynamic_index" => {
                if let Expr::Var(t) = &args[0] {
                    if let Some(Binding::Name(n)) = bind.get(t.as_str()) {
                        args[0] = Expr::Var(n.clone());
                    }
                }
                Expr::Call { func, args }
            }
            Expr::SerialReduce {
                op,
                var,
                lo,
                hi,
                body,
            } => Expr::SerialReduce {
                op,
                var,
                lo,
                hi,
                body,
            },
            other => other,
        });
        // A let-bound tensor must be read exactly at the callee's loop indices.
        let mut bad = None;
        crate::validate::walk(e, &mut |x| {
            if let Expr::Load { tensor, index } = x {
                if let Some(Binding::Name(n)) = bind.get(tensor.as_str()) {
                    let at_loop = index.len() == loop_vars.len()
                        && index
                            .iter()
                            .zip(&loop_vars)
                            .all(|(i, v)| matches!(i, Expr::Var(x) if x == v));
                    if caller_tensor(op, pass, n).is_none() && !at_loop {
                        bad = Some(format!("{what}: `{tensor}` is bound to the let `{n}` but read off the loop indices"));
                    }
                }
            }
        });
        match err.or(bad) {
            Some(e) => Err(e),
            None => Ok(out),
        }
    };
    let mut out = Vec::new();
    for s in &cp.body {
        match s {
            Stmt::Let { name, value } => out.push(Stmt::Let {
                name: format!("{}_{name}", lib.name),
                value: rewrite(value)?,
            }),
            Stmt::Store {
                tensor,
                index,
                value,
                guard,
            } => match bind.get(tensor.as_str()) {
                Some(Binding::Name(n)) => out.push(Stmt::Store {
                    tensor: n.clone(),
                    index: index.iter().map(&rewrite).collect::<Result<_, _>>()?,
                    value: rewrite(value)?,
                    guard: guard.as_ref().map(&rewrite).transpose()?,
                }),
                Some(Binding::NewLet(n)) => {
                    if guard.is_some() {
                        return Err(format!("{what}: a guarded store cannot become `let {n}`"));
                    }
                    out.push(Stmt::Let {
                        name: n.clone(),
                        value: rewrite(value)?,
                    })
                }
                None => return Err(format!("{what}: bind the callee's output `{tensor}`")),
            },
        }
    }
    Ok(out)
}
