//! CPU GEMM backend over host slices (f32 for the CPU training backend, f64 for tests),
//! implemented with `matrixmultiply` (ndarray's GEMM: packed, cache-blocked, SIMD-dispatched
//! microkernels, arbitrary row/column strides, so transposes cost nothing).

use super::GemmDesc;
use crate::error::RuntimeError;

/// Element types the CPU GEMM supports.
pub trait CpuGemmScalar:
    Copy + PartialEq + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self>
{
    const ZERO: Self;
    fn from_f32(x: f32) -> Self;
    /// `C = alpha·A·B + beta·C` for one `[m,k]·[k,n]` product with the given element strides.
    ///
    /// # Safety
    /// Every addressed element of `a`, `b` and `c` must be in bounds; `c` must not alias `a`/`b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl CpuGemmScalar for f32 {
    const ZERO: Self = 0.0;
    fn from_f32(x: f32) -> Self {
        x
    }
    unsafe fn kernel(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl CpuGemmScalar for f64 {
    const ZERO: Self = 0.0;
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    unsafe fn kernel(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// Runs `desc` on host slices: `c[b] = alpha·op(a[b])·op(b[b]) + beta·c[b] + bias` (row-major,
/// see [`GemmDesc`]). `bias` has length >= n. Slices are checked against the descriptor.
pub fn gemm<T: CpuGemmScalar>(
    desc: &GemmDesc,
    a: &[T],
    b: &[T],
    c: &mut [T],
    bias: Option<&[T]>,
) -> Result<(), RuntimeError> {
    desc.check_lens(a.len(), b.len(), c.len(), bias.map(<[T]>::len))?;
    if desc.m == 0 || desc.n == 0 {
        return Ok(());
    }
    let (rsa, csa) = if desc.transa {
        (1, desc.lda)
    } else {
        (desc.lda, 1)
    };
    let (rsb, csb) = if desc.transb {
        (1, desc.ldb)
    } else {
        (desc.ldb, 1)
    };
    let alpha = T::from_f32(desc.alpha);
    for batch in 0..desc.batch {
        let c_off = batch * desc.stride_c;
        let mut beta = T::from_f32(desc.beta);
        if let Some(bias) = bias {
            for i in 0..desc.m {
                let row = &mut c[c_off + i * desc.ldc..c_off + i * desc.ldc + desc.n];
                for (x, &bj) in row.iter_mut().zip(bias) {
                    *x = if beta == T::ZERO { bj } else { beta * *x + bj };
                }
            }
            beta = T::from_f32(1.0);
        }
        if desc.k == 0 {
            // alpha·A·B is empty: C = beta·C.
            for i in 0..desc.m {
                for x in &mut c[c_off + i * desc.ldc..c_off + i * desc.ldc + desc.n] {
                    *x = if beta == T::ZERO { T::ZERO } else { beta * *x };
                }
            }
            continue;
        }
        // SAFETY: check_lens proved every addressed element of a, b, c is in bounds; c is a
        // distinct &mut slice so it cannot alias a or b.
        unsafe {
            T::kernel(
                desc.m,
                desc.k,
                desc.n,
                alpha,
                a.as_ptr().add(batch * desc.stride_a),
                rsa as isize,
                csa as isize,
                b.as_ptr().add(batch * desc.stride_b),
                rsb as isize,
                csb as isize,
                beta,
                c.as_mut_ptr().add(c_off),
                desc.ldc as isize,
                1,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Naive f64 product plus an error scale per element (sum of |terms|).
    fn reference(
        d: &GemmDesc,
        a: &[f64],
        b: &[f64],
        c0: &[f64],
        bias: Option<&[f64]>,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut out = c0.to_vec();
        let mut scale = vec![0.0; c0.len()];
        for bt in 0..d.batch {
            for i in 0..d.m {
                for j in 0..d.n {
                    let (mut s, mut mag) = (0.0, 0.0);
                    for p in 0..d.k {
                        let av = if d.transa {
                            a[bt * d.stride_a + p * d.lda + i]
                        } else {
                            a[bt * d.stride_a + i * d.lda + p]
                        };
                        let bv = if d.transb {
                            b[bt * d.stride_b + j * d.ldb + p]
                        } else {
                            b[bt * d.stride_b + p * d.ldb + j]
                        };
                        s += av * bv;
                        mag += (av * bv).abs();
                    }
                    let idx = bt * d.stride_c + i * d.ldc + j;
                    let cterm = if d.beta == 0.0 {
                        0.0
                    } else {
                        d.beta as f64 * c0[idx]
                    };
                    let bterm = bias.map_or(0.0, |bb| bb[j]);
                    out[idx] = d.alpha as f64 * s + cterm + bterm;
                    scale[idx] = (d.alpha as f64).abs() * mag + cterm.abs() + bterm.abs();
                }
            }
        }
        (out, scale)
    }

    fn random_desc(rng: &mut SplitMix64) -> GemmDesc {
        let (m, n, k) = (rng.range(1, 37), rng.range(1, 37), rng.range(0, 41));
        let mut d = GemmDesc::new(m, n, k).transposed(rng.chance(0.5), rng.chance(0.5));
        // Padded leading dimensions sometimes.
        d.lda += rng.below(3);
        d.ldb += rng.below(3);
        d.ldc += rng.below(3);
        d.batch = rng.range(1, 3);
        let (ar, ac) = d.stored_a();
        let (br, bc) = d.stored_b();
        d.stride_a = if rng.chance(0.2) {
            0
        } else {
            ar.saturating_sub(1) * d.lda + ac + rng.below(4)
        };
        d.stride_b = if rng.chance(0.2) {
            0
        } else {
            br.saturating_sub(1) * d.ldb + bc + rng.below(4)
        };
        d.stride_c = (d.m - 1) * d.ldc + d.n + rng.below(4);
        d.alpha = [1.0, 0.5, -2.0][rng.below(3)];
        d.beta = [0.0, 1.0, 0.25][rng.below(3)];
        d
    }

    fn check<T: CpuGemmScalar + Into<f64>>(seed: u64, tol: f64) {
        let mut rng = SplitMix64::new(seed);
        let d = random_desc(&mut rng);
        let (la, lb, lc) = d.required_lens();
        let fill = |rng: &mut SplitMix64, n: usize| {
            (0..n).map(|_| rng.symmetric_f32()).collect::<Vec<f32>>()
        };
        let (a, b, c0) = (fill(&mut rng, la), fill(&mut rng, lb), fill(&mut rng, lc));
        let bias = rng.chance(0.5).then(|| fill(&mut rng, d.n));
        let conv = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
        let mut c = conv(&c0);
        gemm(
            &d,
            &conv(&a),
            &conv(&b),
            &mut c,
            bias.as_deref().map(conv).as_deref(),
        )
        .unwrap();
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (want, scale) = reference(
            &d,
            &f(&a),
            &f(&b),
            &f(&c0),
            bias.as_deref().map(f).as_deref(),
        );
        for bt in 0..d.batch {
            for i in 0..d.m {
                for j in 0..d.n {
                    let idx = bt * d.stride_c + i * d.ldc + j;
                    let got: f64 = c[idx].into();
                    assert!(
                        (got - want[idx]).abs() <= tol * (scale[idx] + 1e-30),
                        "seed {seed} {d:?} at ({bt},{i},{j}): {got} vs {}",
                        want[idx]
                    );
                }
            }
        }
    }

    #[test]
    fn f32_matches_naive_f64_on_random_shapes() {
        for seed in 0..300 {
            check::<f32>(seed, 1e-5);
        }
    }

    #[test]
    fn f64_matches_naive_f64_on_random_shapes() {
        for seed in 1000..1300 {
            check::<f64>(seed, 1e-12);
        }
    }

    #[test]
    fn beta_zero_ignores_nan_in_c() {
        let d = GemmDesc::new(2, 2, 2);
        let mut c = vec![f32::NAN; 4];
        gemm(
            &d,
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 0.0, 0.0, 1.0],
            &mut c,
            None,
        )
        .unwrap();
        assert_eq!(c, vec![1.0, 2.0, 3.0, 4.0]);
        let mut c = vec![f32::NAN; 4];
        gemm(
            &d,
            &[1.0, 2.0, 3.0, 4.0],
            &[1.0, 0.0, 0.0, 1.0],
            &mut c,
            Some(&[10.0, 20.0]),
        )
        .unwrap();
        assert_eq!(c, vec![11.0, 22.0, 13.0, 24.0]);
    }

    #[test]
    fn short_buffers_and_bad_strides_are_errors() {
        let d = GemmDesc::new(3, 3, 3);
        assert!(gemm(&d, &[0.0f32; 8], &[0.0; 9], &mut [0.0; 9], None).is_err());
        let mut d2 = GemmDesc::new(3, 3, 3).batched(2);
        d2.stride_c = 4;
        assert!(d2.validate().is_err());
    }
}
