//! The op IR: what one `op! { ... }` item says, after parsing.
//!
//! An op declares typed tensor and scalar parameters, its outputs and the tensors its forward
//! saves for the backward, then one forward pass and any number of backward passes. Each pass is
//! a loop nest (`for r in R, c in C`) over a body of `let` bindings and stores written with
//! explicit indices (`y[r, c] = ...`). Reductions over the innermost index (`sum(c, ...)`) make a
//! pass a *row* kernel; a pass without them is *flat* (elementwise over the whole loop nest).

/// Element type of a tensor or scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// The op's floating type parameter: bf16 on the GPU, the reference's `S` on the CPU.
    T,
    F32,
    I32,
    U8,
}

impl DType {
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "T" => DType::T,
            "f32" => DType::F32,
            "i32" => DType::I32,
            "u8" => DType::U8,
            _ => return None,
        })
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::T | DType::F32)
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::T => "T",
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }
}

/// A declared tensor: `x: [R, C] T`, `mut lse: [R] f32`.
#[derive(Clone, Debug)]
pub struct TensorDecl {
    pub name: String,
    /// Extents, outermost first; each an expression over dims and literals.
    pub dims: Vec<Expr>,
    pub dtype: DType,
    /// Read and written in place by the forward (`mut`).
    pub inout: bool,
}

/// A declared scalar parameter: `eps: f32`, `v0: i32`.
#[derive(Clone, Debug)]
pub struct ScalarDecl {
    pub name: String,
    pub dtype: DType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    Forward,
    Backward,
}

/// One loop index of a pass: `c in C`.
#[derive(Clone, Debug)]
pub struct LoopIndex {
    pub name: String,
    pub extent: Expr,
}

/// One kernel: `forward for r in R, c in C { ... }` or
/// `backward dx (dy) -> (dx) for r in R, c in C { ... }`.
#[derive(Clone, Debug)]
pub struct Pass {
    pub kind: PassKind,
    /// Optional name of a backward pass (an op may have several).
    pub label: Option<String>,
    /// Upstream gradients read: `d<output>`.
    pub grads_in: Vec<String>,
    /// Gradients written: `d<input>`.
    pub grads_out: Vec<String>,
    /// Loop nest, outermost first; the last index is the innermost (vectorised) one.
    pub indices: Vec<LoopIndex>,
    pub body: Vec<Stmt>,
}

#[derive(Clone, Debug)]
pub enum Stmt {
    Let {
        name: String,
        value: Expr,
    },
    /// `t[i] = v;`, or `if g { t[i] = v; }`: a store that happens only where `guard` holds.
    Store {
        tensor: String,
        index: Vec<Expr>,
        value: Expr,
        guard: Option<Expr>,
    },
}

/// What a callee's tensor or scalar is bound to in a `use op.pass(...)` statement, which the
/// parser replaces by the callee's statements (see `compose`).
#[derive(Clone, Debug)]
pub enum Binding {
    /// A tensor, scalar or `let` of the caller.
    Name(String),
    /// `let g`: the callee's output becomes the caller's new `let g` (its value at the current
    /// loop indices) instead of being stored.
    NewLet(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    Shl,
    Shr,
    BitAnd,
    BitOr,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::And => "&&",
            BinOp::Or => "||",
            BinOp::Shl => "<<",
            BinOp::Shr => ">>",
            BinOp::BitAnd => "&",
            BinOp::BitOr => "|",
        }
    }
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne
        )
    }
    pub fn is_logical(self) -> bool {
        matches!(self, BinOp::And | BinOp::Or)
    }
    pub fn is_bitwise(self) -> bool {
        matches!(
            self,
            BinOp::Shl | BinOp::Shr | BinOp::BitAnd | BinOp::BitOr | BinOp::Rem
        )
    }
}

/// Reductions: over the innermost loop index across the threads of a row (`sum(c, e)`), or a
/// serial loop inside one thread (`sum(k in a..b, e)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    /// log(sum(exp(e))), computed online (running max and rescaled sum) in one pass.
    LogSumExp,
}

impl ReduceOp {
    pub fn parse(s: &str) -> Option<ReduceOp> {
        Some(match s {
            "sum" => ReduceOp::Sum,
            "mean" => ReduceOp::Mean,
            "max" => ReduceOp::Max,
            "min" => ReduceOp::Min,
            "logsumexp" => ReduceOp::LogSumExp,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug)]
pub enum Expr {
    Float(f64),
    Int(i64),
    /// A loop index, scalar parameter, dim or `let` binding.
    Var(String),
    /// `x[i, j]`: an element of a tensor.
    Load {
        tensor: String,
        index: Vec<Expr>,
    },
    Unary {
        op: UnOp,
        arg: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// A builtin function or cast: `exp(e)`, `T(e)`, `f32(e)`, `select(c, a, b)`.
    Call {
        func: String,
        args: Vec<Expr>,
    },
    /// Reduction over the innermost loop index (parallel across the row's threads).
    RowReduce {
        op: ReduceOp,
        body: Box<Expr>,
    },
    /// Reduction in one thread: `sum(k in lo..hi, e)`.
    SerialReduce {
        op: ReduceOp,
        var: String,
        lo: Box<Expr>,
        hi: Box<Expr>,
        body: Box<Expr>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

/// How the generated gradient check draws a dim, scalar or tensor.
#[derive(Clone, Debug)]
pub enum CheckRule {
    /// `R in 1..6`: uniform integer (dims, int tensors) or float (scalars) in [lo, hi).
    Range(Expr, Expr),
    /// `D in [4, 8, 16]`: one of these values.
    Choice(Vec<Expr>),
    /// `eps = 1e-5`, `lse = -inf`: fixed value (fills a tensor).
    Fixed(Expr),
}

#[derive(Clone, Debug)]
pub struct OpDef {
    pub name: String,
    /// The op's doc comment, carried into every generated product.
    pub doc: Vec<String>,
    pub inputs: Vec<TensorDecl>,
    pub scalars: Vec<ScalarDecl>,
    pub outputs: Vec<TensorDecl>,
    pub saves: Vec<TensorDecl>,
    pub passes: Vec<Pass>,
    pub check: Vec<(String, CheckRule)>,
}

impl OpDef {
    /// Every tensor the forward sees: inputs, then outputs, then saved tensors.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorDecl> {
        self.inputs.iter().chain(&self.outputs).chain(&self.saves)
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorDecl> {
        self.tensors().find(|t| t.name == name)
    }
    pub fn forward(&self) -> &Pass {
        self.passes
            .iter()
            .find(|p| p.kind == PassKind::Forward)
            .expect("validated: one forward")
    }
    pub fn backwards(&self) -> impl Iterator<Item = &Pass> {
        self.passes.iter().filter(|p| p.kind == PassKind::Backward)
    }
}
