//! `q4 doctor` end to end: it must answer on any machine (CI has no GPU) without panicking,
//! report the CPU side, and keep its JSON shape.

use std::process::Command;

fn q4() -> Command {
    Command::new(env!("CARGO_BIN_EXE_q4"))
}

#[test]
fn doctor_text_reports_cpu_and_cuda() {
    let out = q4().arg("doctor").output().expect("q4 runs");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("CPU:"), "{text}");
    assert!(text.contains("CUDA:"), "{text}");
    assert!(
        text.contains("fallback chain: cuda-native -> cuda-dequant -> cpu"),
        "{text}"
    );
    for f in ["nvfp4", "nf4", "fp4", "mxfp4"] {
        assert!(text.contains(f), "{f} missing from:\n{text}");
    }
}

#[test]
fn doctor_json_is_complete_and_consistent() {
    let out = q4().args(["doctor", "--json"]).output().expect("q4 runs");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["cuda_feature"], cfg!(feature = "cuda"));
    let cpu = &v["cpu"];
    assert!(cpu["threads"].as_u64().unwrap() >= 1);
    let kernels = cpu["kernels"].as_array().unwrap();
    // Whether the report lists a SIMD feature; the formats of the kernel rows named `prefix...`.
    let has = |f: &str| {
        cpu["simd"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str() == Some(f))
    };
    let rows_of = |prefix: &str| -> Vec<&str> {
        kernels
            .iter()
            .filter(|k| k["kernel"].as_str().unwrap().starts_with(prefix))
            .map(|k| k["format"].as_str().unwrap())
            .collect()
    };
    // AMX hosts add a row for each format: E2M1 ones (NVFP4, MXFP4) decode exactly to bf16, the
    // codebook ones (NF4, bnb-FP4) to two bf16 pieces per value.
    let amx = has("amx-bf16");
    let amx_rows = rows_of("tiled-gemm-amx");
    if amx {
        assert_eq!(amx_rows, ["nvfp4", "nf4", "fp4", "mxfp4"], "AMX rows");
    } else {
        assert!(amx_rows.is_empty(), "{amx_rows:?}");
    }
    // AVX-512 VNNI hosts add a W4A8 row for each format (the VNNI tiles; the bitsandbytes
    // codebooks rounded to int8).
    let vnni = has("avx512bw") && has("avx512vnni");
    let vnni_rows = rows_of("w4a8-vnni-tiles");
    let off = |var: &str| std::env::var_os(var).is_some_and(|v| v == "0");
    if vnni && !off("Q4_AVX512") && !off("Q4_W4A8_TILES") {
        assert_eq!(
            vnni_rows,
            ["nvfp4", "nf4", "fp4", "mxfp4"],
            "VNNI W4A8 rows"
        );
    } else if !vnni {
        assert!(vnni_rows.is_empty(), "{vnni_rows:?}");
    }
    // AVX-512 hosts add a row for each format: the prefill kernel with activation rows in lanes.
    let lanes_rows = rows_of("tiled-gemm-lanes");
    if has("avx512f") && !off("Q4_AVX512") && !off("Q4_LANES") {
        assert_eq!(lanes_rows, ["nvfp4", "nf4", "fp4", "mxfp4"], "lanes rows");
    } else if !has("avx512f") || off("Q4_LANES") {
        assert!(lanes_rows.is_empty(), "{lanes_rows:?}");
    }
    assert_eq!(
        kernels.len(),
        12 + amx_rows.len() + vnni_rows.len() + lanes_rows.len(),
        "4 formats x 3 batch ranges (+ AMX rows, + VNNI W4A8 rows, + lanes rows)"
    );
    let names: Vec<&str> = kernels
        .iter()
        .map(|k| k["kernel"].as_str().unwrap())
        .collect();
    // GEMV passes serve batches 9-16 over wide rows only where the tiled GEMM has no AVX2
    // dot-product kernel (which decodes whole rows and wins there).
    let avx2 = has("avx2");
    assert_eq!(
        names.iter().any(|n| n.starts_with("gemv passes")),
        !avx2,
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("tiled-gemm")),
        "{names:?}"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let simd: Vec<&str> = cpu["simd"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(
            simd.contains(&"avx2"),
            std::arch::is_x86_feature_detected!("avx2")
        );
    }
    let cuda = &v["cuda"];
    let status = cuda["status"].as_str().unwrap();
    assert!(
        ["ok", "no-driver", "stub-driver", "no-device", "error"].contains(&status),
        "{status}"
    );
    let devices = cuda["devices"].as_array().unwrap();
    let selected = v["selected_backend"].as_str().unwrap();
    if status != "ok" {
        assert!(devices.is_empty());
        assert_eq!(selected, "cpu");
        assert!(cuda["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    for d in devices {
        assert!(d["compute_capability"].as_str().unwrap().contains('.'));
        for key in [
            "integrated",
            "managed_memory",
            "concurrent_managed_access",
            "pageable_memory_access",
            "native_fp4",
            "usable",
        ] {
            assert!(d[key].is_boolean(), "{key}");
        }
        assert_eq!(d["kernels"].as_array().unwrap().len(), 4);
        if !cfg!(feature = "cuda") {
            assert_eq!(d["usable"], false);
        }
    }
    if !cfg!(feature = "cuda") {
        assert_eq!(selected, "cpu");
    }
}
