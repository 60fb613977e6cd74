//! NF4 4-bit weights exactly as bitsandbytes stores them (`quantize_4bit(..., blocksize=64,
//! compress_statistics=True, quant_type="nf4")`): per block of 64 an f32 absmax, each value
//! scaled by bitsandbytes' reciprocal and mapped to the nearest NF4 code (ties to the lower
//! index), two codes per byte (element 2i in the high nibble); the absmax themselves
//! double-quantized to 8 bits per block of 256 with the signed dynamic map, around their mean.
//! The bit-level algorithm is in `ops/fixtures/BNB_NOTES.md`; the device functions it needs
//! (`nf4_index`, `dynamic_index`, `bnb_recip`, `mul_ftz`) are in `quant_prelude`.
use crate::kernels::NF4 as KERNELS;
use ftrt_macros::op;
use ftrt_runtime::cudarc::driver::{LaunchConfig, PushKernelArg};
use ftrt_runtime::{DevPtr, Gpu, RuntimeError};
use half::bf16;

op! {
    /// NF4 quantization of x (N) in blocks of 64 (N a multiple of 64):
    /// absmax[b] = max |x| over the block;  code = nf4_index(x * bnb_recip(absmax)).
    nf4_quantize(x: [N] T) -> (packed: [N / 2] u8, absmax: [N / 64] f32) {
        forward for b in N / 64, j in 32 {
            let x0 = x[b * 64 + 2 * j];
            let x1 = x[b * 64 + 2 * j + 1];
            let am = max(j, max(abs(x0), abs(x1)));
            absmax[b] = am;
            let r = bnb_recip(am);
            packed[b * 32 + j] = nf4_index(mul_ftz(x0, r)) * 16 + nf4_index(mul_ftz(x1, r));
        }
    }
}

op! {
    /// Double quantization of the NF4 absmax (NA of them) around `offset` (their mean):
    /// per block of 256, absmax2 = max |a - offset|, q = dynamic_index(code, (a - offset) * bnb_recip(absmax2)).
    absmax_quantize(a: [NA] f32, code: [256] f32, offset: f32) -> (q: [NA] u8, absmax2: [(NA + 255) / 256] f32) {
        forward for b in (NA + 255) / 256, j in 256 {
            let i = b * 256 + j;
            let v = select(i < NA, a[i] - offset, 0.0);
            let m = max(j, abs(v));
            absmax2[b] = m;
            if i < NA { q[i] = dynamic_index(code, mul_ftz(v, bnb_recip(m))); }
        }
    }
}

op! {
    /// NF4 dequantization with double-quantized absmax (N a multiple of 64), one block of 64
    /// per row so the block's absmax is computed once:
    /// w[i] = T(nf4[q_i] * (code2[absmax_q[i / 64]] * absmax2[i / 16384] + offset)).
    nf4_dequantize(packed: [N / 64, 32] u8, absmax_q: [N / 64] u8, absmax2: [(N / 64 + 255) / 256] f32, code2: [256] f32, nf4: [16] f32, offset: f32) -> (w: [N / 64, 64] T) {
        forward for b in N / 64, j in 64 {
            let am = mul_ftz(code2[absmax_q[b]], absmax2[b / 256]) + offset;
            let byte = packed[b, j / 2];
            let q = select(j % 2 == 0, byte >> 4, byte & 15);
            w[b, j] = mul_ftz(nf4[q], am);
        }
    }
}

op! {
    /// NF4 dequantization with plain f32 absmax (checkpoints without double quantization):
    /// w[i] = T(nf4[q_i] * absmax[i / 64]).
    nf4_dequantize_f32_absmax(packed: [N / 64, 32] u8, absmax: [N / 64] f32, nf4: [16] f32) -> (w: [N / 64, 64] T) {
        forward for b in N / 64, j in 64 {
            let byte = packed[b, j / 2];
            let q = select(j % 2 == 0, byte >> 4, byte & 15);
            w[b, j] = mul_ftz(nf4[q], absmax[b]);
        }
    }
}

/// Threads a block, and chunks of 8 elements a thread, of `ops/kernels/nf4_dequant.cu`.
const WIDE_THREADS: usize = 256;
const WIDE_CHUNKS: usize = 4;

/// [`nf4_dequantize`] into bf16 by `ops/kernels/nf4_dequant.cu`, the GPU path the model takes:
/// four 8-element chunks a thread instead of one (the absmax's dependent loads and the code
/// table's barrier shared by more elements), bit-exact with the op's kernel and its CPU
/// reference. w (n) bf16 from packed (n / 2), absmax_q (n / 64), absmax2 (n / 16384, rounded
/// up), code2 (256) and nf4 (16); n a multiple of 64, packed 4-byte and w 16-byte aligned.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_bf16(
    gpu: &Gpu,
    n: usize,
    offset: f32,
    packed: DevPtr<u8>,
    absmax_q: DevPtr<u8>,
    absmax2: DevPtr<f32>,
    code2: DevPtr<f32>,
    nf4: DevPtr<f32>,
    w: DevPtr<bf16>,
) -> Result<(), RuntimeError> {
    if !n.is_multiple_of(64) || !packed.addr.is_multiple_of(4) || !w.addr.is_multiple_of(16) {
        return Err(RuntimeError::InvalidArgument(format!(
            "nf4 dequantize: {n} elements must be a multiple of 64, packed 4-byte aligned \
             ({:#x}) and w 16-byte aligned ({:#x})",
            packed.addr, w.addr
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(&crate::kernels::NF4_DEQUANT, "nf4_dequantize_wide")?;
    let n64 = n as i64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&n64);
    b.arg(&offset);
    b.arg(&packed.addr);
    b.arg(&absmax_q.addr);
    b.arg(&absmax2.addr);
    b.arg(&code2.addr);
    b.arg(&nf4.addr);
    b.arg(&w.addr);
    let cfg = LaunchConfig {
        grid_dim: ((n / 8).div_ceil(WIDE_THREADS * WIDE_CHUNKS) as u32, 1, 1),
        block_dim: (WIDE_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match nf4_dequantize_wide's signature; the tensors hold
    // the sizes documented above for n elements (checked: n a multiple of 64, alignment).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests;
