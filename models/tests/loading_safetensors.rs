//! Memory-mapped safetensors: single and sharded files, dtype conversion, and bad files.

use std::collections::HashMap;
use std::path::Path;

use ftrt_models::safetensors_io::{Dtype, SafetensorsFiles};
use ftrt_models::ErrorKind;
use half::{bf16, f16};
use safetensors::tensor::TensorView;

/// Writes a safetensors file of (name, dtype, shape, bytes) with the `safetensors` crate.
fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(&views, None, path).unwrap();
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
        .collect()
}

#[test]
fn single_file_dtypes_and_conversions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let vals = [1.5f32, -2.25, 0.0, 3.0e-3, 7.0, -1.0];
    write(
        &path,
        &[
            ("w.bf16", Dtype::BF16, vec![2, 3], bf16_bytes(&vals)),
            (
                "w.f16",
                Dtype::F16,
                vec![6],
                vals.iter()
                    .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                    .collect(),
            ),
            (
                "w.f32",
                Dtype::F32,
                vec![3, 2],
                vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            ("q.u8", Dtype::U8, vec![4], vec![0, 1, 200, 255]),
            (
                "i.i32",
                Dtype::I32,
                vec![2],
                [-5i32, 9].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        ],
    );
    // Opening the folder finds model.safetensors.
    let st = SafetensorsFiles::open(dir.path()).unwrap();
    assert_eq!(
        st.names().collect::<Vec<_>>(),
        ["i.i32", "q.u8", "w.bf16", "w.f16", "w.f32"]
    );
    let meta = st.meta("w.bf16").unwrap();
    assert_eq!((meta.dtype, meta.shape.clone()), (Dtype::BF16, vec![2, 3]));
    let rounded: Vec<f32> = vals.iter().map(|x| bf16::from_f32(*x).to_f32()).collect();
    assert_eq!(st.to_f32("w.bf16").unwrap(), rounded);
    let halfs: Vec<f32> = vals.iter().map(|x| f16::from_f32(*x).to_f32()).collect();
    assert_eq!(st.to_f32("w.f16").unwrap(), halfs);
    assert_eq!(st.to_f32("w.f32").unwrap(), vals);
    assert_eq!(st.to_f32("q.u8").unwrap(), [0.0, 1.0, 200.0, 255.0]);
    assert_eq!(st.to_f32("i.i32").unwrap(), [-5.0, 9.0]);
    assert_eq!(st.bytes("q.u8").unwrap(), [0, 1, 200, 255]);
    let bf: Vec<bf16> = vals.iter().map(|x| bf16::from_f32(*x)).collect();
    assert_eq!(st.to_bf16("w.bf16").unwrap(), bf);
    assert_eq!(st.to_bf16("w.f32").unwrap(), bf);
    let err = st.to_f32("nope").unwrap_err();
    assert_eq!(err.kind, ErrorKind::Missing);
    assert!(err.to_string().contains("nope"));
}

#[test]
fn sharded_lookup_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = "model-00001-of-00002.safetensors";
    let b = "model-00002-of-00002.safetensors";
    write(
        &dir.path().join(a),
        &[("x", Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec())],
    );
    write(
        &dir.path().join(b),
        &[
            ("y", Dtype::F32, vec![1], 2f32.to_le_bytes().to_vec()),
            ("z", Dtype::BF16, vec![1], bf16_bytes(&[3.0])),
        ],
    );
    let index = format!(
        r#"{{"metadata": {{"total_size": 10}}, "weight_map": {{"x": "{a}", "y": "{b}", "z": "{b}"}}}}"#
    );
    std::fs::write(dir.path().join("model.safetensors.index.json"), &index).unwrap();
    let st = SafetensorsFiles::open(dir.path()).unwrap();
    assert_eq!(st.names().collect::<Vec<_>>(), ["x", "y", "z"]);
    assert_eq!(st.to_f32("x").unwrap(), [1.0]);
    assert_eq!(st.to_f32("y").unwrap(), [2.0]);
    assert_eq!(st.to_f32("z").unwrap(), [3.0]);
    assert_eq!(st.file_of("z").unwrap(), dir.path().join(b));

    // An index naming the wrong shard for a tensor is an error naming the shard and the tensor.
    let wrong = index.replace(r#""x": "model-00001"#, r#""x": "model-00002"#);
    std::fs::write(dir.path().join("model.safetensors.index.json"), wrong).unwrap();
    let err = SafetensorsFiles::open(dir.path()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Missing);
    assert!(
        err.to_string().contains(b) && err.to_string().contains("\"x\""),
        "{err}"
    );
}

fn valid_file_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write(&path, &[("w", Dtype::F32, vec![4, 4], vec![0u8; 64])]);
    std::fs::read(path).unwrap()
}

fn open_bytes(bytes: &[u8]) -> ftrt_models::Error {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let err = SafetensorsFiles::open(&path)
        .err()
        .expect("bad file must not open");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
    err
}

#[test]
fn missing_file() {
    let err = SafetensorsFiles::open(Path::new("/nonexistent/m.safetensors"))
        .err()
        .unwrap();
    assert_eq!(err.kind, ErrorKind::Missing);
    assert!(err.to_string().contains("/nonexistent/m.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let err = SafetensorsFiles::open(dir.path()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Missing);
}

#[test]
fn truncated_files() {
    let good = valid_file_bytes();
    assert_eq!(open_bytes(&good[..4]).kind, ErrorKind::Truncated);
    // Cut inside the header.
    assert_eq!(open_bytes(&good[..20]).kind, ErrorKind::Truncated);
    // Cut inside the tensor data: the error names the tensor.
    let err = open_bytes(&good[..good.len() - 10]);
    assert_eq!(err.kind, ErrorKind::Truncated);
    assert!(err.reason.contains("\"w\""), "{err}");
    assert_eq!(open_bytes(&[]).kind, ErrorKind::Truncated);
}

#[test]
fn header_lying_about_sizes() {
    let good = valid_file_bytes();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + n]).unwrap().to_string();
    let rebuild = |h: &str, data_len: usize| {
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data_len));
        out
    };
    // Offsets past the end of the file.
    let past = header.replace("[0,64]", "[0,6400]");
    assert_ne!(past, header, "fixture header changed: {header}");
    let err = open_bytes(&rebuild(&past, 64));
    assert_eq!(err.kind, ErrorKind::Truncated);
    assert!(err.reason.contains("6400"), "{err}");
    // Shape that disagrees with the byte range.
    let shape = header.replace("[4,4]", "[4,5]");
    assert_eq!(open_bytes(&rebuild(&shape, 64)).kind, ErrorKind::Malformed);
    // Header length field far beyond the file.
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(open_bytes(&huge).kind, ErrorKind::Truncated);
    // Begin after end, and a non-JSON header.
    let backwards = header.replace("[0,64]", "[64,0]");
    assert_eq!(
        open_bytes(&rebuild(&backwards, 64)).kind,
        ErrorKind::Malformed
    );
    assert_eq!(
        open_bytes(&rebuild("not json", 0)).kind,
        ErrorKind::Malformed
    );
}
