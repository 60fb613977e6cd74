//! `ftrt selftest`'s flags parse, and without a usable GPU (here: ordinal 99) each selection
//! fails with a message saying what it needs, never a panic.

use std::process::{Command, Output};

fn selftest(args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftrt"))
        .arg("selftest")
        .args(args)
        .output()
        .expect("run ftrt");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    (out, err)
}

#[test]
fn every_selection_needs_a_gpu_and_says_so() {
    for flag in ["--kernels", "--attention", "--runtime", "--model"] {
        let (out, err) = selftest(&[flag, "--device", "99"]);
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert!(
            err.contains("ftrt selftest needs an NVIDIA GPU"),
            "{flag}: {err}"
        );
    }
}

#[test]
fn an_unknown_selection_is_refused_by_name() {
    let (out, err) = selftest(&["--attention", "--flash"]);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--flash"), "{err}");
}
