//! cuBLASLt GEMM backend: bf16 A and B, f32 accumulation and scale, bf16 or f32 C, bias and
//! accumulate (beta = 1) epilogues, strided batches. The row-major problem is handed to
//! column-major cuBLASLt as `C^T = op(B)^T · op(A)^T`, i.e. with A and B swapped.
//!
//! Each distinct problem (shape, layout, output dtype, bias, pointer alignment, workspace size)
//! gets its descriptors built and its algorithm picked by `cublasLtMatmulAlgoGetHeuristic`
//! once; the result is cached in a `HashMap`, so a repeated GEMM costs one `cublasLtMatmul`.
//! With `FTRT_GEMM_AUTOTUNE=1` ([`AUTOTUNE_ENV`]) a problem's first call instead times the
//! heuristic's first [`AUTOTUNE_CANDIDATES`] algorithms on its own operands and keeps the
//! fastest (C saved and restored around the timing): off by default, since the choice, and
//! with it the rounding, may differ from one run to the next.

use super::GemmDesc;
use crate::device::{DevPtr, DeviceBuffer, Gpu};
use crate::driver_probe::probe_cublaslt;
use crate::error::RuntimeError;
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaContext, CudaStream};
use half::bf16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// cuBLASLt workspace NVIDIA recommends on Hopper (32 MiB); carve it from the arena.
pub const DEFAULT_WORKSPACE_BYTES: usize = 32 << 20;

/// Set to `1` to autotune every GEMM problem on its first call (see the module docs).
pub const AUTOTUNE_ENV: &str = "FTRT_GEMM_AUTOTUNE";
/// Algorithms timed per problem when autotuning (the heuristic's first ones).
pub const AUTOTUNE_CANDIDATES: usize = 8;
/// Largest C (bytes) autotuning saves and restores; bigger problems keep the heuristic's pick.
const AUTOTUNE_MAX_C_BYTES: usize = 256 << 20;
/// Timed calls per candidate, after one untimed.
const AUTOTUNE_REPS: usize = 3;

/// Device scratch memory cuBLASLt may use during a GEMM.
#[derive(Debug, Clone, Copy)]
pub struct GemmWorkspace {
    pub ptr: DevPtr<u8>,
    pub bytes: usize,
}

/// Output (and bias) element type of a cuBLASLt GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OutType {
    Bf16,
    F32,
}

impl OutType {
    /// Bytes per element.
    fn bytes(self) -> usize {
        match self {
            Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }

    fn cuda(self) -> sys::cudaDataType {
        match self {
            Self::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            Self::F32 => sys::cudaDataType_t::CUDA_R_32F,
        }
    }
}

/// Everything the algorithm choice depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    transa: bool,
    transb: bool,
    lda: usize,
    ldb: usize,
    ldc: usize,
    batch: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    accumulate: bool,
    out: OutType,
    bias: bool,
    /// Power-of-two alignment (capped at 256) of A, B, C and bias.
    align: [u32; 4],
    workspace: usize,
}

/// Descriptors plus the chosen algorithm for one [`PlanKey`]; destroyed on drop.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layout_a: sys::cublasLtMatrixLayout_t,
    layout_b: sys::cublasLtMatrixLayout_t,
    layout_c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// The heuristic's candidates, best first (`algo` is the first until autotuned).
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by Plan::build and is destroyed once here.
        // Errors cannot be reported from Drop; destruction of host descriptors does not fail
        // in practice.
        unsafe {
            for layout in [self.layout_a, self.layout_b, self.layout_c] {
                if !layout.is_null() {
                    let _ = lt::destroy_matrix_layout(layout);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

// SAFETY: the descriptors are plain host structures only touched under the cache mutex.
unsafe impl Send for Plan {}

fn check(call: &'static str, r: Result<(), CublasError>) -> Result<(), RuntimeError> {
    r.map_err(|e| RuntimeError::Cublas(call.to_string(), e))
}

fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        256
    } else {
        (1u32 << addr.trailing_zeros().min(8)).min(256)
    }
}

/// A cuBLASLt handle bound to a [`Gpu`]'s compute stream, with the per-shape plan cache.
pub struct CublasLt {
    handle: sys::cublasLtHandle_t,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    plans: Mutex<HashMap<PlanKey, Plan>>,
    /// [`AUTOTUNE_ENV`] was set to 1 when the handle was opened.
    autotune: bool,
}

// SAFETY: a cublasLt handle may be used from any thread; the plan cache is behind a mutex.
unsafe impl Send for CublasLt {}
unsafe impl Sync for CublasLt {}

impl Drop for CublasLt {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created once in new(), destroyed once here.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl CublasLt {
    /// Opens cuBLASLt (clear error when the library is missing) on `gpu`'s compute stream.
    pub fn new(gpu: &Gpu) -> Result<Self, RuntimeError> {
        probe_cublaslt()?;
        gpu.context().bind_to_thread()?;
        let handle =
            lt::create_handle().map_err(|e| RuntimeError::Cublas("cublasLtCreate".into(), e))?;
        Ok(Self {
            handle,
            ctx: gpu.context().clone(),
            stream: gpu.stream().clone(),
            plans: Mutex::new(HashMap::new()),
            autotune: std::env::var(AUTOTUNE_ENV).is_ok_and(|v| v == "1"),
        })
    }

    /// Number of distinct problems whose algorithm has been chosen so far.
    pub fn cached_plans(&self) -> usize {
        self.plans.lock().expect("plan cache poisoned").len()
    }

    /// `C(bf16) = alpha·op(A)·op(B) + beta·C (+ bias)`, bf16 inputs, f32 accumulation.
    /// Pointers must address buffers of at least [`GemmDesc::required_lens`] elements.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(
        &self,
        desc: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: DevPtr<bf16>,
        bias: Option<DevPtr<bf16>>,
        workspace: GemmWorkspace,
    ) -> Result<(), RuntimeError> {
        self.run(
            desc,
            a,
            b,
            c.addr,
            bias.map(|p| p.addr),
            OutType::Bf16,
            workspace,
        )
    }

    /// As [`Self::gemm_bf16`] with an f32 C and f32 bias (e.g. accumulating gradients).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_f32(
        &self,
        desc: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: DevPtr<f32>,
        bias: Option<DevPtr<f32>>,
        workspace: GemmWorkspace,
    ) -> Result<(), RuntimeError> {
        self.run(
            desc,
            a,
            b,
            c.addr,
            bias.map(|p| p.addr),
            OutType::F32,
            workspace,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        d: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: u64,
        bias: Option<u64>,
        out: OutType,
        ws: GemmWorkspace,
    ) -> Result<(), RuntimeError> {
        d.validate()?;
        if d.m == 0 || d.n == 0 {
            return Ok(());
        }
        if d.k == 0 {
            return Err(RuntimeError::InvalidArgument(
                "cuBLASLt GEMM with k = 0".into(),
            ));
        }
        let key = PlanKey {
            m: d.m,
            n: d.n,
            k: d.k,
            transa: d.transa,
            transb: d.transb,
            lda: d.lda,
            ldb: d.ldb,
            ldc: d.ldc,
            batch: d.batch,
            stride_a: d.stride_a,
            stride_b: d.stride_b,
            stride_c: d.stride_c,
            accumulate: d.beta != 0.0,
            out,
            bias: bias.is_some(),
            align: [
                alignment(a.addr),
                alignment(b.addr),
                alignment(c),
                bias.map_or(256, alignment),
            ],
            workspace: ws.bytes,
        };
        self.ctx.bind_to_thread()?;
        let mut plans = self.plans.lock().expect("plan cache poisoned");
        if !plans.contains_key(&key) {
            let mut plan = self.build(&key)?;
            if plan.candidates.len() > 1 {
                let c_bytes = d.required_lens().2 * out.bytes();
                plan.algo = self.fastest(&plan, d, a, b, c, bias, c_bytes, ws);
            }
            plans.insert(key.clone(), plan);
        }
        let plan = &plans[&key];
        self.matmul(plan, plan.algo, d, a, b, c, bias, ws)
    }

    /// One `cublasLtMatmul` of `plan` with `algo`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        plan: &Plan,
        algo: sys::cublasLtMatmulAlgo_t,
        d: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: u64,
        bias: Option<u64>,
        ws: GemmWorkspace,
    ) -> Result<(), RuntimeError> {
        if let Some(bias) = bias {
            // SAFETY: desc is live; the attribute is a CUdeviceptr-sized value.
            check("set BIAS_POINTER", unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias) as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
            })?;
        }
        let (alpha, beta) = (d.alpha, d.beta);
        // Column-major view: cuBLASLt's A is our B, its B is our A; C and D are our C.
        // SAFETY: descriptors are live, pointers address buffers the caller sized per `d`.
        check("cublasLtMatmul", unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                b.addr as *const c_void,
                plan.layout_a,
                a.addr as *const c_void,
                plan.layout_b,
                c as *const c_void,
                plan.layout_c,
                c as *mut c_void,
                plan.layout_c,
                &algo,
                ws.ptr.addr as *mut c_void,
                ws.bytes,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        })
    }

    /// The fastest of `plan`'s candidates on these operands: each run once, then timed over
    /// [`AUTOTUNE_REPS`] calls; C (`c_bytes`) is saved first and restored after when the GEMM
    /// reads it (beta != 0). The heuristic's first choice when C is too large to save, the
    /// stream is capturing a graph, or anything fails.
    #[allow(clippy::too_many_arguments)]
    fn fastest(
        &self,
        plan: &Plan,
        d: &GemmDesc,
        a: DevPtr<bf16>,
        b: DevPtr<bf16>,
        c: u64,
        bias: Option<u64>,
        c_bytes: usize,
        ws: GemmWorkspace,
    ) -> sys::cublasLtMatmulAlgo_t {
        let first = plan.candidates[0];
        let idle = cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let capturing = self.stream.capture_status() != Ok(idle);
        if capturing || c_bytes > AUTOTUNE_MAX_C_BYTES {
            return first;
        }
        let copy = |dst: u64, src: u64| -> Result<(), RuntimeError> {
            // SAFETY: both address c_bytes of live device memory (C and its saved copy).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst,
                    src,
                    c_bytes,
                    self.stream.cu_stream(),
                )
            }?;
            Ok(())
        };
        let timed = || -> Result<sys::cublasLtMatmulAlgo_t, RuntimeError> {
            let saved = if d.beta != 0.0 {
                let s = DeviceBuffer::alloc_in(&self.ctx, c_bytes)?;
                copy(s.ptr::<u8>().addr, c)?;
                Some(s)
            } else {
                None
            };
            let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let mut best = (f32::INFINITY, first);
            for &algo in &plan.candidates {
                if self.matmul(plan, algo, d, a, b, c, bias, ws).is_err() {
                    continue;
                }
                let start = self.stream.record_event(timing)?;
                for _ in 0..AUTOTUNE_REPS {
                    self.matmul(plan, algo, d, a, b, c, bias, ws)?;
                }
                let end = self.stream.record_event(timing)?;
                end.synchronize()?;
                let ms = start.elapsed_ms(&end)?;
                if ms < best.0 {
                    best = (ms, algo);
                }
            }
            if let Some(s) = &saved {
                copy(c, s.ptr::<u8>().addr)?;
                self.stream.synchronize()?;
            }
            Ok(best.1)
        };
        timed().unwrap_or(first)
    }

    /// Builds descriptors for `key` and asks the heuristic for its best algorithms (one, or
    /// [`AUTOTUNE_CANDIDATES`] when autotuning).
    fn build(&self, key: &PlanKey) -> Result<Plan, RuntimeError> {
        let lt_err = |call: &'static str| move |e| RuntimeError::Cublas(call.to_string(), e);
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_err("cublasLtMatmulDescCreate"))?;
        // Column-major operands: A' = our B (stored (transb ? [n,k] : [k,n]) row-major),
        // B' = our A, D' = our C as [n rows, m cols].
        let (a_rows, a_cols) = if key.transb {
            (key.k, key.n)
        } else {
            (key.n, key.k)
        };
        let (b_rows, b_cols) = if key.transa {
            (key.m, key.k)
        } else {
            (key.k, key.m)
        };
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let mut plan = Plan {
            desc,
            layout_a: std::ptr::null_mut(),
            layout_b: std::ptr::null_mut(),
            layout_c: std::ptr::null_mut(),
            algo: unsafe { std::mem::zeroed() },
            candidates: Vec::new(),
        };
        plan.layout_a = lt::create_matrix_layout(bf, a_rows as u64, a_cols as u64, key.ldb as i64)
            .map_err(lt_err("cublasLtMatrixLayoutCreate(A)"))?;
        plan.layout_b = lt::create_matrix_layout(bf, b_rows as u64, b_cols as u64, key.lda as i64)
            .map_err(lt_err("cublasLtMatrixLayoutCreate(B)"))?;
        plan.layout_c =
            lt::create_matrix_layout(key.out.cuda(), key.n as u64, key.m as u64, key.ldc as i64)
                .map_err(lt_err("cublasLtMatrixLayoutCreate(C)"))?;
        if key.batch > 1 {
            for (layout, stride) in [
                (plan.layout_a, key.stride_b),
                (plan.layout_b, key.stride_a),
                (plan.layout_c, key.stride_c),
            ] {
                set_layout_batch(layout, key.batch as i32, stride as i64)?;
            }
        }
        let op = |t: bool| -> i32 { i32::from(t) }; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
        set_desc(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(key.transb),
        )?;
        set_desc(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(key.transa),
        )?;
        let epilogue = if key.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        } as u32;
        set_desc(
            plan.desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue,
        )?;

        let pref = lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
        let chosen = (|| {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &(key.workspace as u64),
            )?;
            // Pointer alignments: D is C. (Bias alignment is part of the key only.)
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &key.align[1],
            )?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &key.align[0],
            )?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                &key.align[2],
            )?;
            set_pref(
                pref,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                &key.align[2],
            )?;
            let wanted = if self.autotune {
                AUTOTUNE_CANDIDATES
            } else {
                1
            };
            // SAFETY: zeroed results are plain data the call overwrites.
            let mut found = vec![unsafe { std::mem::zeroed() }; wanted];
            let mut count = 0i32;
            let heuristic_err =
                |e| RuntimeError::Cublas(format!("cublasLtMatmulAlgoGetHeuristic for {key:?}"), e);
            // SAFETY: all descriptors are live; `found` holds `wanted` results.
            unsafe {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.layout_a,
                    plan.layout_b,
                    plan.layout_c,
                    plan.layout_c,
                    pref,
                    wanted as i32,
                    found.as_mut_ptr(),
                    &mut count,
                )
                .result()
            }
            .map_err(heuristic_err)?;
            let algos: Vec<sys::cublasLtMatmulAlgo_t> = found
                [..(count.max(0) as usize).min(wanted)]
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            if algos.is_empty() {
                return Err(heuristic_err(CublasError(
                    sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
                )));
            }
            Ok(algos)
        })();
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        plan.candidates = chosen?;
        plan.algo = plan.candidates[0];
        Ok(plan)
    }
}

fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<(), RuntimeError> {
    // SAFETY: desc is live and v points to a value of the attribute's documented size.
    check("cublasLtMatmulDescSetAttribute", unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    })
}

fn set_pref<T>(
    pref: sys::cublasLtMatmulPreference_t,
    attr: sys::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> Result<(), RuntimeError> {
    // SAFETY: pref is live and v points to a value of the attribute's documented size.
    check("cublasLtMatmulPreferenceSetAttribute", unsafe {
        lt::set_matmul_pref_attribute(
            pref,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    })
}

fn set_layout_batch(
    layout: sys::cublasLtMatrixLayout_t,
    count: i32,
    stride: i64,
) -> Result<(), RuntimeError> {
    use sys::cublasLtMatrixLayoutAttribute_t as L;
    // SAFETY: layout is live; BATCH_COUNT is int32, STRIDED_BATCH_OFFSET is int64.
    unsafe {
        check(
            "set BATCH_COUNT",
            lt::set_matrix_layout_attribute(
                layout,
                L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count) as *const i32 as *const c_void,
                4,
            ),
        )?;
        check(
            "set STRIDED_BATCH_OFFSET",
            lt::set_matrix_layout_attribute(
                layout,
                L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                (&stride) as *const i64 as *const c_void,
                8,
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_classes() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(512), 256);
        assert_eq!(alignment(2), 2);
        assert_eq!(alignment(48), 16);
    }
}
