//! The cubins embedded beside each kernel family's PTX (build.rs embeds only those whose
//! stamp matches the PTX): every family has them for the GPUs its PTX targets, they are ELF
//! images, and each holds every entry point of its PTX.

use ftrt_ops::kernels::ALL;

fn entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|l| l.split(".entry ").nth(1))
        .map(|rest| rest.split(['(', ' ']).next().unwrap_or(rest).trim())
        .collect()
}

#[test]
fn every_family_carries_cubins_for_its_gpus() {
    assert!(ALL.len() >= 10, "{} families", ALL.len());
    for m in ALL {
        let gpus: &[(i32, i32)] = if m.arch == "compute_90a" {
            &[(9, 0)]
        } else {
            &[(8, 0), (8, 6), (8, 9), (9, 0)]
        };
        for &cc in gpus {
            let cubin = m
                .cubin_for(cc)
                .unwrap_or_else(|| panic!("{}: no cubin for {cc:?} (stale or missing)", m.name));
            assert_eq!(&cubin[..4], b"\x7fELF", "{} {cc:?}", m.name);
            let names = entries(m.ptx);
            assert!(!names.is_empty(), "{}: no entry points", m.name);
            for name in names {
                assert!(
                    cubin.windows(name.len()).any(|w| w == name.as_bytes()),
                    "{} {cc:?}: cubin lacks {name}",
                    m.name
                );
            }
        }
        assert_eq!(m.cubin_for((7, 5)), None, "{}", m.name);
    }
}
