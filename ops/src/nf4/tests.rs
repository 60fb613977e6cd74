//! The NF4 ops' CPU references against bitsandbytes' own output (fixtures made by
//! `ops/fixtures/gen_bnb_fixtures.py`) and against the scalar bitsandbytes model in
//! `quant_prelude`.
use super::*;
use crate::dsl::Rounding;
use crate::quant_prelude as bnb;
use safetensors::SafeTensors;

fn load(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::BF16 => t
            .data()
            .chunks(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        d => panic!("{name}: unexpected {d:?}"),
    }
}

fn u8s(st: &SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name).unwrap().data().to_vec()
}

/// Fixtures whose N is a multiple of 64 (the DSL ops' contract), made by bitsandbytes' CUDA
/// kernels on an H200 (`gen_bnb_fixtures.py --device cuda`).
const CASES: [&str; 2] = [
    "bnb_nf4_cuda_weights_bf16.safetensors",
    "bnb_nf4_cuda_large_bf16.safetensors",
];

#[test]
fn quantize_matches_bitsandbytes_packing_and_absmax() {
    for case in CASES {
        let bytes = load(case);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let x = f32s(&st, "x");
        let n = x.len();
        let d = nf4_quantize::Dims { N: n };
        let mut packed = vec![0u8; n / 2];
        let mut absmax = vec![0f32; n / 64];
        nf4_quantize::forward_cpu::<f32>(&d, &x, &mut packed, &mut absmax, Rounding::BF16);
        assert_eq!(absmax, f32s(&st, "absmax_raw"), "{case}: absmax");
        assert_eq!(
            packed,
            bnb::nf4_pack(&x, &absmax, 64),
            "{case}: packed vs scalar model"
        );
        assert_eq!(
            packed,
            u8s(&st, "packed"),
            "{case}: packed vs bitsandbytes (CUDA)"
        );
    }
}

#[test]
fn absmax_double_quantization_matches_model() {
    for case in CASES {
        let bytes = load(case);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let raw = f32s(&st, "absmax_raw");
        let offset = f32s(&st, "offset")[0];
        let code = bnb::dynamic_map_signed();
        let na = raw.len();
        let d = absmax_quantize::Dims { NA: na };
        let mut q = vec![0u8; na];
        let mut am2 = vec![0f32; na.div_ceil(256)];
        absmax_quantize::forward_cpu::<f32>(
            &d,
            offset,
            &raw,
            &code,
            &mut q,
            &mut am2,
            Rounding::BF16,
        );
        let shifted: Vec<f32> = raw.iter().map(|a| a - offset).collect();
        let (q_ref, am2_ref) = bnb::quantize_blockwise_cpu(&shifted, &code, 256);
        assert_eq!(am2, am2_ref, "{case}: nested absmax");
        assert_eq!(q, q_ref, "{case}: nested codes");
        assert_eq!(am2, f32s(&st, "absmax2"), "{case}: nested absmax vs bnb");
    }
}

#[test]
fn dequantize_matches_bitsandbytes_exactly() {
    for case in CASES {
        let bytes = load(case);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let want = f32s(&st, "dequant");
        let n = want.len();
        let d = nf4_dequantize::Dims { N: n };
        let mut w = vec![0f32; n];
        nf4_dequantize::forward_cpu::<f32>(
            &d,
            f32s(&st, "offset")[0],
            &u8s(&st, "packed"),
            &u8s(&st, "absmax_q"),
            &f32s(&st, "absmax2"),
            &f32s(&st, "code2"),
            &f32s(&st, "code"),
            &mut w,
            Rounding::BF16,
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&w), bits(&want), "{case}: dequantized values");

        let d2 = nf4_dequantize_f32_absmax::Dims { N: n };
        let mut w2 = vec![0f32; n];
        let absmax = f32s(&st, "dequant_absmax");
        nf4_dequantize_f32_absmax::forward_cpu::<f32>(
            &d2,
            &u8s(&st, "packed"),
            &absmax,
            &f32s(&st, "code"),
            &mut w2,
            Rounding::BF16,
        );
        assert_eq!(
            bits(&w2),
            bits(&want),
            "{case}: dequantized from f32 absmax"
        );
    }
}
