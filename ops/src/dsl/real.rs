//! The scalar type of CPU references: f32 (matching the GPU's f32 arithmetic) or f64 (exact,
//! for finite differences), with the DSL's rounding points made explicit.
use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// A precision a value is rounded to at a DSL cast (`T(e)`, `f32(e)`) or a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prec {
    /// No rounding: the gradient check's exact arithmetic.
    Exact,
    Bf16,
    F32,
}

impl Prec {
    #[inline]
    pub fn round<S: Real>(self, v: S) -> S {
        v.round_to(self)
    }
}

/// Rounding of the op's float type `T` and of `f32` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rounding {
    pub t: Prec,
    pub f32: Prec,
}

impl Rounding {
    /// Exact arithmetic (f64 references, finite differences).
    pub const EXACT: Rounding = Rounding {
        t: Prec::Exact,
        f32: Prec::Exact,
    };
    /// The GPU's kernels: `T` is bf16, arithmetic f32.
    pub const BF16: Rounding = Rounding {
        t: Prec::Bf16,
        f32: Prec::F32,
    };
    /// An f32 model (Hugging Face parity in f32).
    pub const F32: Rounding = Rounding {
        t: Prec::F32,
        f32: Prec::F32,
    };
}

/// Arithmetic of CPU references.
pub trait Real:
    Copy
    + PartialOrd
    + Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + Send
    + Sync
    + 'static
{
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
    fn from_i64(v: i64) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    /// Truncation toward zero, as a C cast.
    fn to_i64(self) -> i64;
    fn zero() -> Self {
        Self::from_f64(0.0)
    }
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn rsqrt(self) -> Self {
        Self::from_f64(1.0) / self.sqrt()
    }
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn sigmoid(self) -> Self {
        Self::from_f64(1.0) / (Self::from_f64(1.0) + (-self).exp())
    }
    /// log(exp(a) + exp(b)), with -inf as the identity.
    fn logaddexp(self, o: Self) -> Self {
        let m = self.max(o);
        if m.to_f64() == f64::NEG_INFINITY {
            return m;
        }
        m + ((self - m).exp() + (o - m).exp()).ln()
    }
    fn round_to(self, p: Prec) -> Self;
}

impl Real for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_i64(v: i64) -> Self {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn max(self, o: Self) -> Self {
        f32::max(self, o)
    }
    fn min(self, o: Self) -> Self {
        f32::min(self, o)
    }
    #[inline]
    fn round_to(self, p: Prec) -> Self {
        match p {
            Prec::Exact | Prec::F32 => self,
            Prec::Bf16 => half::bf16::from_f32(self).to_f32(),
        }
    }
}

impl Real for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn from_i64(v: i64) -> Self {
        v as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn max(self, o: Self) -> Self {
        f64::max(self, o)
    }
    fn min(self, o: Self) -> Self {
        f64::min(self, o)
    }
    #[inline]
    fn round_to(self, p: Prec) -> Self {
        match p {
            Prec::Exact => self,
            Prec::F32 => self as f32 as f64,
            Prec::Bf16 => half::bf16::from_f64(self).to_f64(),
        }
    }
}
