//! `ftrt bench` on bad flag values: a clear message and exit status 1, never a panic, and
//! before any GPU is opened (so these run on machines without one).

use std::process::Command;

/// Runs `ftrt bench ARGS` and asserts a clean failure whose stderr names every one of `needles`.
fn bench_refuses(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftrt"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run ftrt");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !err.contains("CUDA driver"),
        "{args:?} reached the GPU: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks {n:?}: {err}");
    }
}

#[test]
fn bad_bench_flags_are_refused_before_the_gpu() {
    bench_refuses(&["--preset", "llama-9"], &["llama-9", "llama-3.1-8b"]);
    bench_refuses(&["--mode", "int8"], &["int8", "qlora"]);
    bench_refuses(&["--lora-r", "0"], &["--lora-r >= 1"]);
    bench_refuses(&["--seq", "1"], &["--seq >= 2"]);
    bench_refuses(&["--batch", "0"], &["--batch >= 1"]);
}
