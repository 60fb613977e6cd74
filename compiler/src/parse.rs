//! Parser for the op DSL, on `syn`'s token-stream primitives.
//!
//! ```text
//! block   := op+   (an op may `use` the passes of the ops before it in the block)
//! op      := doc* NAME "(" params ")" ["->" "(" tensors ")"] ["saves" "(" tensors ")"] "{" pass* [check] "}"
//! param   := ["mut"] NAME ":" ( "[" expr,* "]" DTYPE | DTYPE )
//! pass    := "forward" "for" loops block
//!          | "backward" [LABEL] "(" NAME,* ")" "->" "(" NAME,* ")" "for" loops block
//! loops   := NAME "in" expr ("," NAME "in" expr)*
//! stmt    := "let" NAME "=" expr ";" | store | "if" expr "{" store "}"
//!          | "use" OP "." PASS "(" (NAME "=" (NAME | "let" NAME)),* ")" ";"
//! store   := NAME "[" expr,* "]" "=" expr ";"
//! check   := "check" "{" (NAME ("in" expr ".." expr | "in" "[" expr,* "]" | "=" expr)),* "}"
//! expr    := C-like precedence: || && comparisons | & << >> + - * / % unary(- !)
//! primary := number | inf | NAME | NAME "[" expr,* "]" | NAME "(" expr,* ")"
//!          | REDUCE "(" NAME "," expr ")" | REDUCE "(" NAME "in" expr ".." expr "," expr ")" | "(" expr ")"
//! ```
use crate::ast::*;
use syn::parse::{Parse, ParseStream};
use syn::{braced, bracketed, parenthesized, Ident, LitFloat, LitInt, Token};

/// Parses one op; `library` holds the ops before it in the block (for `use`).
fn parse_op_def(input: ParseStream, library: &[OpDef]) -> syn::Result<OpDef> {
    {
        let doc = parse_doc(input)?;
        let name: Ident = input.parse()?;
        let params;
        parenthesized!(params in input);
        let mut inputs = Vec::new();
        let mut scalars = Vec::new();
        while !params.is_empty() {
            match parse_param(&params)? {
                Param::Tensor(t) => inputs.push(t),
                Param::Scalar(s) => scalars.push(s),
            }
            if !params.is_empty() {
                params.parse::<Token![,]>()?;
            }
        }
        let mut outputs = Vec::new();
        if input.peek(Token![->]) {
            input.parse::<Token![->]>()?;
            outputs = parse_tensor_list(input)?;
        }
        let mut saves = Vec::new();
        if input.peek(Ident) && input.fork().parse::<Ident>()? == "saves" {
            input.parse::<Ident>()?;
            saves = parse_tensor_list(input)?;
        }
        let body;
        braced!(body in input);
        let mut op = OpDef {
            name: name.to_string(),
            doc,
            inputs,
            scalars,
            outputs,
            saves,
            passes: vec![],
            check: vec![],
        };
        let mut passes = Vec::new();
        let mut check = Vec::new();
        while !body.is_empty() {
            let kw: Ident = body.parse()?;
            match kw.to_string().as_str() {
                "forward" => passes.push(parse_pass(&body, PassKind::Forward, &op, library)?),
                "backward" => passes.push(parse_pass(&body, PassKind::Backward, &op, library)?),
                "check" => check = parse_check(&body)?,
                other => {
                    return Err(syn::Error::new(
                        kw.span(),
                        format!("expected `forward`, `backward` or `check`, found `{other}`"),
                    ))
                }
            }
        }
        op.passes = passes;
        op.check = check;
        crate::validate::resolve_reductions(&mut op);
        Ok(op)
    }
}

/// The ops of one `op! { ... }` block, in order; an op may `use` the passes of ops before it.
pub struct OpBlock(pub Vec<OpDef>);

impl Parse for OpBlock {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut ops: Vec<OpDef> = Vec::new();
        while !input.is_empty() {
            let span = input.span();
            let op = parse_op_def(input, &ops)?;
            crate::validate::validate(&op)
                .map_err(|e| syn::Error::new(span, format!("op `{}`: {e}", op.name)))?;
            ops.push(op);
        }
        Ok(OpBlock(ops))
    }
}

/// Doc comments arrive as `#[doc = "..."]` attributes.
fn parse_doc(input: ParseStream) -> syn::Result<Vec<String>> {
    let attrs = input.call(syn::Attribute::parse_outer)?;
    let mut doc = Vec::new();
    for attr in attrs {
        if let syn::Meta::NameValue(nv) = &attr.meta {
            if nv.path.is_ident("doc") {
                if let syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) = &nv.value
                {
                    doc.push(s.value().trim().to_string());
                    continue;
                }
            }
        }
        return Err(syn::Error::new_spanned(
            attr,
            "only doc comments may precede an op",
        ));
    }
    Ok(doc)
}

enum Param {
    Tensor(TensorDecl),
    Scalar(ScalarDecl),
}

fn parse_param(input: ParseStream) -> syn::Result<Param> {
    let inout = input.peek(Token![mut]);
    if inout {
        input.parse::<Token![mut]>()?;
    }
    let name: Ident = input.parse()?;
    input.parse::<Token![:]>()?;
    if input.peek(syn::token::Bracket) {
        let dims;
        bracketed!(dims in input);
        let dims = parse_comma_exprs(&dims)?;
        let dtype = parse_dtype(input)?;
        Ok(Param::Tensor(TensorDecl {
            name: name.to_string(),
            dims,
            dtype,
            inout,
        }))
    } else {
        if inout {
            return Err(syn::Error::new(name.span(), "only tensors can be `mut`"));
        }
        let dtype = parse_dtype(input)?;
        Ok(Param::Scalar(ScalarDecl {
            name: name.to_string(),
            dtype,
        }))
    }
}

fn parse_dtype(input: ParseStream) -> syn::Result<DType> {
    let ty: Ident = input.parse()?;
    DType::parse(&ty.to_string())
        .ok_or_else(|| syn::Error::new(ty.span(), "expected a dtype: T, f32, i32 or u8"))
}

fn parse_tensor_list(input: ParseStream) -> syn::Result<Vec<TensorDecl>> {
    let list;
    parenthesized!(list in input);
    let mut out = Vec::new();
    while !list.is_empty() {
        match parse_param(&list)? {
            Param::Tensor(t) => out.push(t),
            Param::Scalar(s) => {
                return Err(syn::Error::new(
                    list.span(),
                    format!("output `{}` must be a tensor", s.name),
                ))
            }
        }
        if !list.is_empty() {
            list.parse::<Token![,]>()?;
        }
    }
    Ok(out)
}

fn parse_names(input: ParseStream) -> syn::Result<Vec<String>> {
    let list;
    parenthesized!(list in input);
    let names = list.parse_terminated(Ident::parse, Token![,])?;
    Ok(names.into_iter().map(|i| i.to_string()).collect())
}

fn parse_pass(
    input: ParseStream,
    kind: PassKind,
    op: &OpDef,
    library: &[OpDef],
) -> syn::Result<Pass> {
    let mut label = None;
    let (mut grads_in, mut grads_out) = (Vec::new(), Vec::new());
    if kind == PassKind::Backward {
        if input.peek(Ident) && !input.peek(Token![for]) {
            label = Some(input.parse::<Ident>()?.to_string());
        }
        grads_in = parse_names(input)?;
        input.parse::<Token![->]>()?;
        grads_out = parse_names(input)?;
    }
    input.parse::<Token![for]>()?;
    let mut indices = Vec::new();
    loop {
        let name: Ident = input.parse()?;
        input.parse::<Token![in]>()?;
        let extent = parse_expr(input)?;
        indices.push(LoopIndex {
            name: name.to_string(),
            extent,
        });
        if !input.peek(Token![,]) {
            break;
        }
        input.parse::<Token![,]>()?;
    }
    let block;
    braced!(block in input);
    let mut pass = Pass {
        kind,
        label,
        grads_in,
        grads_out,
        indices,
        body: Vec::new(),
    };
    while !block.is_empty() {
        if block.peek(Token![use]) {
            let span = block.span();
            let UseStmt {
                op: callee,
                pass: pass_name,
                bindings,
            } = parse_use(&block)?;
            let lib = library.iter().find(|o| o.name == callee).ok_or_else(|| {
                syn::Error::new(
                    span,
                    format!("`use {callee}.{pass_name}`: no op `{callee}` earlier in this block"),
                )
            })?;
            let stmts = crate::compose::inline(op, &pass, lib, &pass_name, &bindings)
                .map_err(|e| syn::Error::new(span, e))?;
            pass.body.extend(stmts);
        } else {
            pass.body.push(parse_stmt(&block)?);
        }
    }
    Ok(pass)
}

/// `use op.pass(name = binding, ...);`: the callee op, its pass and the bindings.
struct UseStmt {
    op: String,
    pass: String,
    bindings: Vec<(String, Binding)>,
}

fn parse_use(input: ParseStream) -> syn::Result<UseStmt> {
    {
        input.parse::<Token![use]>()?;
        let op: Ident = input.parse()?;
        input.parse::<Token![.]>()?;
        let pass: Ident = input.parse()?;
        let args;
        parenthesized!(args in input);
        let mut bindings = Vec::new();
        while !args.is_empty() {
            let name: Ident = args.parse()?;
            args.parse::<Token![=]>()?;
            let b = if args.peek(Token![let]) {
                args.parse::<Token![let]>()?;
                Binding::NewLet(args.parse::<Ident>()?.to_string())
            } else {
                Binding::Name(args.parse::<Ident>()?.to_string())
            };
            bindings.push((name.to_string(), b));
            if !args.is_empty() {
                args.parse::<Token![,]>()?;
            }
        }
        input.parse::<Token![;]>()?;
        Ok(UseStmt {
            op: op.to_string(),
            pass: pass.to_string(),
            bindings,
        })
    }
}

fn parse_stmt(input: ParseStream) -> syn::Result<Stmt> {
    if input.peek(Token![let]) {
        input.parse::<Token![let]>()?;
        let name: Ident = input.parse()?;
        input.parse::<Token![=]>()?;
        let value = parse_expr(input)?;
        input.parse::<Token![;]>()?;
        return Ok(Stmt::Let {
            name: name.to_string(),
            value,
        });
    }
    if input.peek(Token![if]) {
        input.parse::<Token![if]>()?;
        let guard = parse_expr(input)?;
        let inner;
        braced!(inner in input);
        let Stmt::Store {
            tensor,
            index,
            value,
            ..
        } = parse_stmt(&inner)?
        else {
            return Err(inner.error("an `if` may only guard one store"));
        };
        if !inner.is_empty() {
            return Err(inner.error("an `if` may only guard one store"));
        }
        return Ok(Stmt::Store {
            tensor,
            index,
            value,
            guard: Some(guard),
        });
    }
    let tensor: Ident = input.parse()?;
    let idx;
    bracketed!(idx in input);
    let index = parse_comma_exprs(&idx)?;
    input.parse::<Token![=]>()?;
    let value = parse_expr(input)?;
    input.parse::<Token![;]>()?;
    Ok(Stmt::Store {
        tensor: tensor.to_string(),
        index,
        value,
        guard: None,
    })
}

fn parse_check(input: ParseStream) -> syn::Result<Vec<(String, CheckRule)>> {
    let block;
    braced!(block in input);
    let mut rules = Vec::new();
    while !block.is_empty() {
        let name: Ident = block.parse()?;
        let rule = if block.peek(Token![=]) {
            block.parse::<Token![=]>()?;
            CheckRule::Fixed(parse_expr(&block)?)
        } else {
            block.parse::<Token![in]>()?;
            if block.peek(syn::token::Bracket) {
                let list;
                bracketed!(list in block);
                CheckRule::Choice(parse_comma_exprs(&list)?)
            } else {
                let lo = parse_expr(&block)?;
                block.parse::<Token![..]>()?;
                CheckRule::Range(lo, parse_expr(&block)?)
            }
        };
        rules.push((name.to_string(), rule));
        if !block.is_empty() {
            block.parse::<Token![,]>()?;
        }
    }
    Ok(rules)
}

fn parse_comma_exprs(input: ParseStream) -> syn::Result<Vec<Expr>> {
    let mut out = Vec::new();
    while !input.is_empty() {
        out.push(parse_expr(input)?);
        if !input.is_empty() {
            input.parse::<Token![,]>()?;
        }
    }
    Ok(out)
}

/// Binary operators by precedence level, loosest first.
const LEVELS: &[&[BinOp]] = &[
    &[BinOp::Or],
    &[BinOp::And],
    &[
        BinOp::Lt,
        BinOp::Le,
        BinOp::Gt,
        BinOp::Ge,
        BinOp::Eq,
        BinOp::Ne,
    ],
    &[BinOp::BitOr],
    &[BinOp::BitAnd],
    &[BinOp::Shl, BinOp::Shr],
    &[BinOp::Add, BinOp::Sub],
    &[BinOp::Mul, BinOp::Div, BinOp::Rem],
];

pub fn parse_expr(input: ParseStream) -> syn::Result<Expr> {
    parse_level(input, 0)
}

fn parse_level(input: ParseStream, level: usize) -> syn::Result<Expr> {
    if level == LEVELS.len() {
        return parse_unary(input);
    }
    let mut lhs = parse_level(input, level + 1)?;
    while let Some(op) = peek_binop(input, LEVELS[level]) {
        eat_binop(input, op)?;
        let rhs = parse_level(input, level + 1)?;
        lhs = Expr::Binary {
            op,
            lhs: Box::new(lhs),
            rhs: Box::new(rhs),
        };
    }
    Ok(lhs)
}

fn peek_binop(input: ParseStream, ops: &[BinOp]) -> Option<BinOp> {
    ops.iter().copied().find(|op| match op {
        BinOp::Or => input.peek(Token![||]),
        BinOp::And => input.peek(Token![&&]),
        BinOp::Le => input.peek(Token![<=]),
        BinOp::Ge => input.peek(Token![>=]),
        BinOp::Shl => input.peek(Token![<<]),
        BinOp::Shr => input.peek(Token![>>]),
        BinOp::Lt => input.peek(Token![<]) && !input.peek(Token![<=]) && !input.peek(Token![<<]),
        BinOp::Gt => input.peek(Token![>]) && !input.peek(Token![>=]) && !input.peek(Token![>>]),
        BinOp::Eq => input.peek(Token![==]),
        BinOp::Ne => input.peek(Token![!=]),
        BinOp::BitOr => input.peek(Token![|]) && !input.peek(Token![||]),
        BinOp::BitAnd => input.peek(Token![&]) && !input.peek(Token![&&]),
        BinOp::Add => input.peek(Token![+]),
        BinOp::Sub => input.peek(Token![-]),
        BinOp::Mul => input.peek(Token![*]),
        BinOp::Div => input.peek(Token![/]),
        BinOp::Rem => input.peek(Token![%]),
    })
}

fn eat_binop(input: ParseStream, op: BinOp) -> syn::Result<()> {
    match op {
        BinOp::Or => drop(input.parse::<Token![||]>()?),
        BinOp::And => drop(input.parse::<Token![&&]>()?),
        BinOp::Le => drop(input.parse::<Token![<=]>()?),
        BinOp::Ge => drop(input.parse::<Token![>=]>()?),
        BinOp::Shl => drop(input.parse::<Token![<<]>()?),
        BinOp::Shr => drop(input.parse::<Token![>>]>()?),
        BinOp::Lt => drop(input.parse::<Token![<]>()?),
        BinOp::Gt => drop(input.parse::<Token![>]>()?),
        BinOp::Eq => drop(input.parse::<Token![==]>()?),
        BinOp::Ne => drop(input.parse::<Token![!=]>()?),
        BinOp::BitOr => drop(input.parse::<Token![|]>()?),
        BinOp::BitAnd => drop(input.parse::<Token![&]>()?),
        BinOp::Add => drop(input.parse::<Token![+]>()?),
        BinOp::Sub => drop(input.parse::<Token![-]>()?),
        BinOp::Mul => drop(input.parse::<Token![*]>()?),
        BinOp::Div => drop(input.parse::<Token![/]>()?),
        BinOp::Rem => drop(input.parse::<Token![%]>()?),
    }
    Ok(())
}

fn parse_unary(input: ParseStream) -> syn::Result<Expr> {
    if input.peek(Token![-]) {
        input.parse::<Token![-]>()?;
        return Ok(Expr::Unary {
            op: UnOp::Neg,
            arg: Box::new(parse_unary(input)?),
        });
    }
    if input.peek(Token![!]) {
        input.parse::<Token![!]>()?;
        return Ok(Expr::Unary {
            op: UnOp::Not,
            arg: Box::new(parse_unary(input)?),
        });
    }
    parse_primary(input)
}

fn parse_primary(input: ParseStream) -> syn::Result<Expr> {
    if input.peek(syn::token::Paren) {
        let inner;
        parenthesized!(inner in input);
        return parse_expr(&inner);
    }
    if input.peek(LitInt) {
        let lit: LitInt = input.parse()?;
        return Ok(Expr::Int(lit.base10_parse()?));
    }
    if input.peek(LitFloat) {
        let lit: LitFloat = input.parse()?;
        return Ok(Expr::Float(lit.base10_parse()?));
    }
    let name: Ident = input.parse()?;
    let name = name.to_string();
    if name == "inf" {
        return Ok(Expr::Float(f64::INFINITY));
    }
    if input.peek(syn::token::Bracket) {
        let idx;
        bracketed!(idx in input);
        return Ok(Expr::Load {
            tensor: name,
            index: parse_comma_exprs(&idx)?,
        });
    }
    if input.peek(syn::token::Paren) {
        let args;
        parenthesized!(args in input);
        if let Some(op) = ReduceOp::parse(&name) {
            if let Some(r) = parse_reduction(&args, op)? {
                return Ok(r);
            }
        }
        return Ok(Expr::Call {
            func: name,
            args: parse_comma_exprs(&args)?,
        });
    }
    Ok(Expr::Var(name))
}

/// `sum(c, e)` (row reduction over the innermost index) or `sum(k in lo..hi, e)` (serial).
/// Returns None for a two-argument `max(a, b)` / `min(a, b)` call, which is elementwise.
fn parse_reduction(args: ParseStream, op: ReduceOp) -> syn::Result<Option<Expr>> {
    if args.peek(Ident) && args.peek2(Token![in]) {
        let var: Ident = args.parse()?;
        args.parse::<Token![in]>()?;
        let lo = parse_expr(args)?;
        args.parse::<Token![..]>()?;
        let hi = parse_expr(args)?;
        args.parse::<Token![,]>()?;
        let body = parse_expr(args)?;
        return Ok(Some(Expr::SerialReduce {
            op,
            var: var.to_string(),
            lo: Box::new(lo),
            hi: Box::new(hi),
            body: Box::new(body),
        }));
    }
    // `sum(c, e)`: recorded as a call to `@sum` and resolved once the pass's innermost index is
    // known (`max(a, b)` with a plain variable first is an ordinary elementwise max).
    let fork = args.fork();
    if fork.peek(Ident) && fork.peek2(Token![,]) {
        let var: Ident = fork.parse()?;
        fork.parse::<Token![,]>()?;
        let body = parse_expr(&fork)?;
        if fork.is_empty() {
            use syn::parse::discouraged::Speculative;
            args.advance_to(&fork);
            return Ok(Some(Expr::Call {
                func: format!("@{}", reduce_name(op)),
                args: vec![Expr::Var(var.to_string()), body],
            }));
        }
    }
    Ok(None)
}

fn reduce_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum => "sum",
        ReduceOp::Mean => "mean",
        ReduceOp::Max => "max",
        ReduceOp::Min => "min",
        ReduceOp::LogSumExp => "logsumexp",
    }
}
