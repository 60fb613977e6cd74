//! Test support: reading the golden safetensors files in `ops/fixtures/` (see its README.md for
//! every tensor) and comparing a CPU reference's output with them, in f32 (relative to the
//! reference's scale) or in bf16 (bit matches and ulp distances).
use safetensors::{Dtype, SafeTensors};

/// One fixture file, held in memory.
pub struct Fixture {
    pub name: String,
    bytes: Vec<u8>,
}

impl Fixture {
    /// `ops/fixtures/<name>`.
    pub fn load(name: &str) -> Fixture {
        let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Fixture {
            name: name.to_string(),
            bytes,
        }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn tensor<R>(&self, tensor: &str, f: impl FnOnce(Dtype, &[usize], &[u8]) -> R) -> R {
        let st = self.st();
        let t = st
            .tensor(tensor)
            .unwrap_or_else(|e| panic!("{}: `{tensor}`: {e}", self.name));
        f(t.dtype(), t.shape(), t.data())
    }

    pub fn has(&self, tensor: &str) -> bool {
        self.st().tensor(tensor).is_ok()
    }

    pub fn shape(&self, tensor: &str) -> Vec<usize> {
        self.tensor(tensor, |_, s, _| s.to_vec())
    }

    pub fn dtype(&self, tensor: &str) -> Dtype {
        self.tensor(tensor, |d, _, _| d)
    }

    /// An F32 or BF16 tensor as f32 values (bf16 widened exactly).
    pub fn f32s(&self, tensor: &str) -> Vec<f32> {
        self.tensor(tensor, |d, _, data| match d {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            d => panic!("{}: `{tensor}` is {d:?}, not a float tensor", self.name),
        })
    }

    /// An I64 (or I32) tensor as i32 values (labels, position ids).
    pub fn i32s(&self, tensor: &str) -> Vec<i32> {
        self.tensor(tensor, |d, _, data| match d {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| {
                    let v = i64::from_le_bytes(b.try_into().unwrap());
                    i32::try_from(v).expect("fits in i32")
                })
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            d => panic!("{}: `{tensor}` is {d:?}, not an integer tensor", self.name),
        })
    }

    /// A metadata entry (`cases`, `torch`, `dtype`, ...).
    pub fn meta(&self, key: &str) -> String {
        let (_, m) = SafeTensors::read_metadata(&self.bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        m.metadata()
            .as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_else(|| panic!("{}: no metadata `{key}`", self.name))
    }
}

/// Every value rounded to bf16 (round to nearest even), kept as f32.
pub fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect()
}

/// Max absolute difference, and the reference's scale (max |want|, at least f32::MIN_POSITIVE).
pub fn max_err(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let mut err = 0f32;
    let mut scale = f32::MIN_POSITIVE;
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.is_finite() == w.is_finite(),
            "finite mismatch: got {g}, want {w}"
        );
        if w.is_finite() {
            err = err.max((g - w).abs());
            scale = scale.max(w.abs());
        }
    }
    (err, scale)
}

/// Asserts max |got - want| <= rel * max |want|; returns the relative error.
#[track_caller]
pub fn assert_close_f32(what: &str, got: &[f32], want: &[f32], rel: f32) -> f32 {
    let (err, scale) = max_err(got, want);
    let r = err / scale;
    assert!(
        r <= rel,
        "{what}: max error {err:e} = {r:e} of the scale {scale:e} (allowed {rel:e})"
    );
    r
}

/// Comparison of bf16 values (both already representable in bf16).
#[derive(Clone, Copy, Debug, Default)]
pub struct Bf16Stats {
    pub n: usize,
    /// Elements with equal bits (+0 and -0 count as equal).
    pub equal: usize,
    /// Largest per-element distance in bf16 ulps (steps between the two bf16 values).
    pub max_ulps: u32,
    /// Largest |got - want|, in units of the bf16 ulp at the reference's scale max |want|.
    pub max_scale_ulps: f32,
}

impl Bf16Stats {
    pub fn rate(&self) -> f64 {
        self.equal as f64 / self.n.max(1) as f64
    }
    /// Merges another comparison into this one.
    pub fn add(&mut self, o: Bf16Stats) {
        self.n += o.n;
        self.equal += o.equal;
        self.max_ulps = self.max_ulps.max(o.max_ulps);
        self.max_scale_ulps = self.max_scale_ulps.max(o.max_scale_ulps);
    }
}

impl std::fmt::Display for Bf16Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} bit-equal ({:.3}%), max {} ulp per element, max {:.2} ulp of the scale",
            self.equal,
            self.n,
            100.0 * self.rate(),
            self.max_ulps,
            self.max_scale_ulps
        )
    }
}

/// Position of a bf16 value on the ordered integer line (so ulp distance is a difference).
fn bf16_ordinal(v: f32) -> i32 {
    let b = half::bf16::from_f32(v).to_bits() as i32;
    if b & 0x8000 != 0 {
        -(b & 0x7fff)
    } else {
        b
    }
}

/// The bf16 ulp at magnitude `x`: 2^(exponent(x) - 7).
pub fn bf16_ulp(x: f32) -> f32 {
    let x = x.abs().max(f32::MIN_POSITIVE);
    2f32.powi(x.log2().floor() as i32 - 7)
}

/// Compares bf16 values; panics if any is not representable in bf16.
pub fn bf16_stats(got: &[f32], want: &[f32]) -> Bf16Stats {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (err, scale) = max_err(got, want);
    let mut s = Bf16Stats {
        n: got.len(),
        max_scale_ulps: err / bf16_ulp(scale),
        ..Default::default()
    };
    for (g, w) in got.iter().zip(want) {
        assert_eq!(
            half::bf16::from_f32(*g).to_f32().to_bits(),
            g.to_bits(),
            "{g} is not a bf16 value"
        );
        let d = (bf16_ordinal(*g) - bf16_ordinal(*w)).unsigned_abs();
        if d == 0 {
            s.equal += 1;
        }
        s.max_ulps = s.max_ulps.max(d);
    }
    s
}

/// Asserts bf16 parity: at least `min_rate` of the elements bit-equal and every error within
/// `max_scale_ulps` bf16 ulps of the reference's scale. Returns the statistics.
#[track_caller]
pub fn assert_bf16(
    what: &str,
    got: &[f32],
    want: &[f32],
    min_rate: f64,
    max_scale_ulps: f32,
) -> Bf16Stats {
    let s = bf16_stats(got, want);
    eprintln!("{what}: {s}");
    assert!(
        s.rate() >= min_rate,
        "{what}: {s} (need {:.1}% equal)",
        100.0 * min_rate
    );
    assert!(
        s.max_scale_ulps <= max_scale_ulps,
        "{what}: {s} (allowed {max_scale_ulps} ulp of the scale)"
    );
    s
}
