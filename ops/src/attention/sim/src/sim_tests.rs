//! The CUDA C kernels (portable path, every mma/ldmatrix fragment emulated from shuffles, cp.async
//! deferred to its wait) executed by the CPU emulator, against the f64 CPU reference.
use crate::attention::*;
use half::bf16;

extern "C" {
    fn attn_sim_fwd(d: i32, q: *const u16, k: *const u16, v: *const u16, cu: *const i32, s: i32, n: i32,
                    hq: i32, hkv: i32, scale: f32, out: *mut u16, lse: *mut f32);
    fn attn_sim_bwd(d: i32, q: *const u16, k: *const u16, v: *const u16, out: *const u16, dout: *const u16,
                    lse: *const f32, cu: *const i32, s: i32, n: i32, hq: i32, hkv: i32, scale: f32,
                    dq: *mut u16, dk: *mut u16, dv: *mut u16, dvec: *mut f32);
}

fn bits(x: &[bf16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The emulator has global state: one case at a time.
static SIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(name: &str, c: &Case) {
    let _one = SIM.lock().unwrap_or_else(|e| e.into_inner());
    let dims = c.dims;
    let (q, k, v, dout) = (bits(&c.q), bits(&c.k), bits(&c.v), bits(&c.dout));
    let mut out = vec![0u16; dims.q_len()];
    let mut lse = vec![0f32; dims.lse_len()];
    let mut dq = vec![0u16; dims.q_len()];
    let mut dk = vec![0u16; dims.kv_len()];
    let mut dv = vec![0u16; dims.kv_len()];
    let mut dvec = vec![0f32; dims.lse_len()];
    let t0 = std::time::Instant::now();
    unsafe {
        attn_sim_fwd(dims.head_dim as i32, q.as_ptr(), k.as_ptr(), v.as_ptr(), c.cu_seqlens.as_ptr(),
                     dims.num_seqs as i32, dims.n_tokens as i32, dims.n_heads_q as i32, dims.n_heads_kv as i32,
                     dims.scale, out.as_mut_ptr(), lse.as_mut_ptr());
        attn_sim_bwd(dims.head_dim as i32, q.as_ptr(), k.as_ptr(), v.as_ptr(), out.as_ptr(), dout.as_ptr(),
                     lse.as_ptr(), c.cu_seqlens.as_ptr(), dims.num_seqs as i32, dims.n_tokens as i32,
                     dims.n_heads_q as i32, dims.n_heads_kv as i32, dims.scale, dq.as_mut_ptr(),
                     dk.as_mut_ptr(), dv.as_mut_ptr(), dvec.as_mut_ptr());
    }
    let el = t0.elapsed().as_secs_f64();
    let fb = |x: &[u16]| x.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<bf16>>();
    let (out, dq, dk, dv) = (fb(&out), fb(&dq), fb(&dk), fb(&dv));
    // every head, every row
    let e = check_against_reference(c, &out, &lse, &dq, &dk, &dv, 1);
    // dvec against rowsum(dout * out) of the emulated out
    let dv_ref = attention_dvec_cpu(&dims, &to_f64(&out), &to_f64(&c.dout));
    let e_dvec = dvec.iter().zip(&dv_ref).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    eprintln!("{name}: out {:.2e} lse {:.2e} dq {:.2e} dk {:.2e} dv {:.2e} dvec abs {:.1e} ({el:.1} s)",
              e[0], e[1], e[2], e[3], e[4], e_dvec);
    for (what, x) in ["out", "lse", "dq", "dk", "dv"].iter().zip(e) {
        assert!(x < 1e-2, "{name}: {what} rel err {x:e}");
    }
    assert!(e_dvec < 1e-3);
}

#[test]
fn sim_d64_gqa2_padding_one_token() {
    run("d64 gqa2", &Case::random(1, 150, &[1, 70, 50], 4, 2, 64, 2.0));
}

#[test]
fn sim_d64_long_gqa4() {
    // several full (unmasked) tiles in fwd, dq and dkdv
    run("d64 long gqa4", &Case::random(2, 300, &[300], 4, 1, 64, 2.0));
}

#[test]
fn sim_d128_gqa1_short_seqs() {
    run("d128 gqa1", &Case::random(3, 140, &[2, 65, 1, 64, 3], 2, 2, 128, 3.0));
}

#[test]
fn sim_d128_long_gqa2() {
    run("d128 long gqa2", &Case::random(4, 200, &[131, 69], 2, 1, 128, 2.0));
}
