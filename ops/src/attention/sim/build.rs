// Compiles sim.cpp (which #includes ops/kernels/attention.cu) with g++ into a static library.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let obj = out.join("sim.o");
    println!("cargo:rerun-if-changed=sim.cpp");
    println!("cargo:rerun-if-changed=../../../kernels/attention.cu");
    println!("cargo:rerun-if-changed=../../../kernels/attention_common.cuh");
    let st = Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()))
        .args(["-std=c++17", "-O2", "-g", "-Wall", "-Wno-unknown-pragmas", "-c", "sim.cpp", "-o"])
        .arg(&obj)
        .status()
        .expect("run g++");
    assert!(st.success(), "g++ failed on sim.cpp");
    let st = Command::new("ar").arg("crs").arg(out.join("libattnsim.a")).arg(&obj).status().expect("run ar");
    assert!(st.success());
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=attnsim");
    println!("cargo:rustc-link-lib=stdc++");
}
