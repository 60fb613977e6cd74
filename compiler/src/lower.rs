//! Lowering a pass to kernel steps, shared by every emitter.
//!
//! A *flat* pass (no row reductions) runs each loop-nest element independently. A *row* pass
//! runs the outer indices as rows and splits its body into steps: one loop over the row per
//! group of independent reductions, one loop per run of vector stores, and per-row scalar
//! statements in between. `let`s that vary along the row are inlined into their uses, so each
//! loop recomputes them from registers it has just loaded.
use crate::ast::*;
use crate::validate::{map, walk, Name, Scope};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Flat,
    Row,
}

/// A reduction over the row, accumulated in `acc`.
#[derive(Clone, Debug)]
pub struct Reduction {
    pub acc: String,
    pub op: ReduceOp,
    pub body: Expr,
}

#[derive(Clone, Debug)]
pub enum Step {
    /// A per-row scalar statement (row passes) or a per-element statement (flat passes).
    Stmt(Stmt),
    /// One sweep over the row computing these reductions together.
    Reduce(Vec<Reduction>),
    /// One sweep over the row storing these values; every value is read before any is written.
    Stores(Vec<Stmt>),
}

#[derive(Clone, Debug)]
pub struct Lowered {
    pub shape: Shape,
    pub steps: Vec<Step>,
    /// The pass's scope with every `let` (and accumulator) typed.
    pub scope: Scope,
}

pub fn lower(op: &OpDef, pass: &Pass) -> Lowered {
    let mut scope = Scope::new(op, pass);
    let is_row = pass.body.iter().any(|s| {
        let mut found = false;
        let mut f = |e: &Expr| found |= matches!(e, Expr::RowReduce { .. });
        match s {
            Stmt::Let { value, .. } => walk(value, &mut f),
            Stmt::Store { value, .. } => walk(value, &mut f),
        }
        found
    });
    if !is_row {
        let mut steps = Vec::new();
        let mut stores = Vec::new();
        for s in &pass.body {
            match s {
                Stmt::Let { name, value } => {
                    flush_stores(&mut steps, &mut stores);
                    let t = scope.ty(value).expect("validated");
                    if scope.varies(value) {
                        scope.varying.insert(name.clone());
                    }
                    scope.names.insert(name.clone(), Name::Let(t));
                    steps.push(Step::Stmt(s.clone()));
                }
                Stmt::Store { .. } => stores.push(s.clone()),
            }
        }
        flush_stores(&mut steps, &mut stores);
        return Lowered {
            shape: Shape::Flat,
            steps,
            scope,
        };
    }

    let mut inlined: BTreeMap<String, Expr> = BTreeMap::new();
    let mut steps = Vec::new();
    let mut group: Vec<Reduction> = Vec::new();
    let mut post: Vec<Stmt> = Vec::new();
    let mut group_names: Vec<String> = Vec::new();
    let mut stores: Vec<Stmt> = Vec::new();
    let mut n_acc = 0;
    for s in &pass.body {
        let subst = |e: &Expr| {
            map(e, &mut |x| match x {
                Expr::Var(v) if inlined.contains_key(&v) => inlined[&v].clone(),
                other => other,
            })
        };
        let (value, index, guard) = match s {
            Stmt::Let { value, .. } => (subst(value), Vec::new(), None),
            Stmt::Store {
                value,
                index,
                guard,
                ..
            } => (
                subst(value),
                index.iter().map(subst).collect(),
                guard.as_ref().map(subst),
            ),
        };
        // Pull out the row reductions, each becoming an accumulator.
        let mut found = Vec::new();
        let value = map(&value, &mut |x| match x {
            Expr::RowReduce { op, body } => {
                let acc = format!("acc{n_acc}");
                n_acc += 1;
                found.push(Reduction {
                    acc: acc.clone(),
                    op,
                    body: *body,
                });
                Expr::Var(acc)
            }
            other => other,
        });
        if !found.is_empty() {
            flush_stores(&mut steps, &mut stores);
            let depends = found.iter().any(|r| mentions_any(&r.body, &group_names));
            if depends {
                flush_group(&mut steps, &mut group, &mut post, &mut group_names);
            }
            for r in &found {
                scope
                    .names
                    .insert(r.acc.clone(), Name::Let(crate::validate::Ty::Float));
                group_names.push(r.acc.clone());
            }
            group.extend(found);
        }
        let varies = scope.varies(&value)
            || index.iter().any(|i| scope.varies(i))
            || guard.as_ref().is_some_and(|g| scope.varies(g));
        match s {
            Stmt::Let { name, .. } => {
                let t = scope.ty(&value).expect("validated");
                scope.names.insert(name.clone(), Name::Let(t));
                if varies {
                    inlined.insert(name.clone(), value);
                } else if !group.is_empty() {
                    group_names.push(name.clone());
                    post.push(Stmt::Let {
                        name: name.clone(),
                        value,
                    });
                } else {
                    flush_stores(&mut steps, &mut stores);
                    steps.push(Step::Stmt(Stmt::Let {
                        name: name.clone(),
                        value,
                    }));
                }
            }
            Stmt::Store { tensor, .. } => {
                let st = Stmt::Store {
                    tensor: tensor.clone(),
                    index,
                    value,
                    guard,
                };
                if varies {
                    flush_group(&mut steps, &mut group, &mut post, &mut group_names);
                    stores.push(st);
                } else if !group.is_empty() {
                    post.push(st);
                } else {
                    flush_stores(&mut steps, &mut stores);
                    steps.push(Step::Stmt(st));
                }
            }
        }
    }
    flush_group(&mut steps, &mut group, &mut post, &mut group_names);
    flush_stores(&mut steps, &mut stores);
    Lowered {
        shape: Shape::Row,
        steps,
        scope,
    }
}

fn flush_stores(steps: &mut Vec<Step>, stores: &mut Vec<Stmt>) {
    if !stores.is_empty() {
        steps.push(Step::Stores(std::mem::take(stores)));
    }
}

fn flush_group(
    steps: &mut Vec<Step>,
    group: &mut Vec<Reduction>,
    post: &mut Vec<Stmt>,
    names: &mut Vec<String>,
) {
    if !group.is_empty() {
        steps.push(Step::Reduce(std::mem::take(group)));
    }
    steps.extend(post.drain(..).map(Step::Stmt));
    names.clear();
}

fn mentions_any(e: &Expr, names: &[String]) -> bool {
    let mut hit = false;
    walk(e, &mut |x| {
        if let Expr::Var(v) = x {
            hit |= names.contains(v);
        }
    });
    hit
}

/// Tensors a pass reads or writes, by name.
pub fn touched_tensors(pass: &Pass) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string())
        }
    };
    for s in &pass.body {
        let (value, extra) = match s {
            Stmt::Let { value, .. } => (value, None),
            Stmt::Store {
                tensor,
                index,
                value,
                guard,
            } => (value, Some((tensor, index, guard))),
        };
        let mut f = |e: &Expr| match e {
            Expr::Load { tensor, .. } => add(tensor),
            Expr::Call { func, args } if func == "dynamic_index" => {
                if let Expr::Var(t) = &args[0] {
                    add(t)
                }
            }
            _ => {}
        };
        walk(value, &mut f);
        if let Some((t, index, guard)) = extra {
            index.iter().for_each(|i| walk(i, &mut f));
            guard.iter().for_each(|g| walk(g, &mut f));
            add(t);
        }
    }
    out
}

/// Every bare name a pass mentions (loop extents, bodies, indices and guards).
fn referenced_names(pass: &Pass) -> Vec<String> {
    let mut out = Vec::new();
    let mut f = |e: &Expr| {
        if let Expr::Var(v) = e {
            out.push(v.clone());
        }
    };
    for i in &pass.indices {
        walk(&i.extent, &mut f);
    }
    for s in &pass.body {
        match s {
            Stmt::Let { value, .. } => walk(value, &mut f),
            Stmt::Store {
                index,
                value,
                guard,
                ..
            } => {
                walk(value, &mut f);
                index.iter().for_each(|i| walk(i, &mut f));
                guard.iter().for_each(|g| walk(g, &mut f));
            }
        }
    }
    out
}

/// Tensors a pass writes.
pub fn written_tensors(pass: &Pass) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in &pass.body {
        if let Stmt::Store { tensor, .. } = s {
            if !out.contains(tensor) {
                out.push(tensor.clone());
            }
        }
    }
    out
}

/// One argument of a pass's kernel, CPU reference and launcher, in their shared order:
/// every dim, every scalar, then the touched tensors in declaration order.
#[derive(Clone, Debug)]
pub enum Arg {
    Dim(String),
    Scalar(ScalarDecl),
    Tensor { decl: TensorDecl, written: bool },
}

pub fn pass_args(op: &OpDef, pass: &Pass) -> Vec<Arg> {
    let mut args: Vec<Arg> = crate::validate::dims(op)
        .into_iter()
        .map(Arg::Dim)
        .collect();
    let used = referenced_names(pass);
    args.extend(
        op.scalars
            .iter()
            .filter(|s| used.contains(&s.name))
            .cloned()
            .map(Arg::Scalar),
    );
    let touched = touched_tensors(pass);
    let written = written_tensors(pass);
    for t in crate::validate::pass_tensors(op, pass) {
        if touched.contains(&t.name) {
            let w = written.contains(&t.name);
            args.push(Arg::Tensor {
                decl: t,
                written: w,
            });
        }
    }
    args
}

/// Name of a pass's kernel family member: `rms_norm_forward`, `rms_norm_backward_dw`.
pub fn pass_fn_name(op: &OpDef, pass: &Pass) -> String {
    match (&pass.kind, &pass.label) {
        (PassKind::Forward, _) => format!("{}_forward", op.name),
        (PassKind::Backward, Some(l)) => format!("{}_backward_{l}", op.name),
        (PassKind::Backward, None) => format!("{}_backward", op.name),
    }
}

/// Flattened offset of `t[index]`, row-major: `((i0 * d1 + i1) * d2 + i2) ...`, as an
/// expression tree (emitters print it in their own syntax).
pub fn flat_offset(t: &TensorDecl, index: &[Expr]) -> Expr {
    let mut off = index[0].clone();
    for (i, d) in index.iter().zip(&t.dims).skip(1) {
        off = Expr::Binary {
            op: BinOp::Add,
            lhs: Box::new(Expr::Binary {
                op: BinOp::Mul,
                lhs: Box::new(off),
                rhs: Box::new(d.clone()),
            }),
            rhs: Box::new(i.clone()),
        };
    }
    off
}

/// The value of a store, evaluated only where its guard holds (`select(g, v, 0)`), so a guarded
/// store never reads out of bounds to compute a value it will not write.
pub fn guarded(scope: &Scope, value: &Expr, guard: Option<&Expr>) -> Expr {
    match guard {
        None => value.clone(),
        Some(g) => {
            let zero = match scope.ty(value).expect("validated") {
                crate::validate::Ty::Float => Expr::Float(0.0),
                _ => Expr::Int(0),
            };
            Expr::Call {
                func: "select".into(),
                args: vec![g.clone(), value.clone(), zero],
            }
        }
    }
}
