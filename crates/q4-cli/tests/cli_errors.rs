//! Bad input: every failure exits non-zero with exactly one `error: ...` line naming the file
//! and/or tensor, never panics, and leaves no output (nor temporary) file behind.

use std::path::Path;
use std::process::Command;

use safetensors::tensor::{serialize_to_file, TensorView};
use safetensors::{Dtype, SafeTensors};

mod common;
use common::{fixture, s};

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs q4 expecting a clean failure whose message contains every needle, and checks that
/// `out_dir` still holds exactly `left` (nothing written, no temporary files).
fn fails_leaving(args: &[&str], needles: &[&str], out_dir: &Path, left: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_q4"))
        .args(args)
        .output()
        .expect("run q4");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "q4 {args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {}", lines[0]);
    }
    assert_eq!(entries(out_dir), left, "q4 {args:?} left files behind");
}

fn fails(args: &[&str], needles: &[&str], out_dir: &Path) {
    fails_leaving(args, needles, out_dir, &[]);
}

fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, sh, b)| (n.to_string(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
        .collect()
}

/// A fresh input directory and a fresh (empty) output directory.
fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap())
}

/// The three commands on one input, all of which must fail the same way.
fn all_commands_fail(input: &Path, needles: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("x.safetensors");
    fails(
        &[
            "quantize",
            s(input),
            "--format",
            "nvfp4",
            "--out",
            s(&target),
        ],
        needles,
        out.path(),
    );
    fails(
        &["dequantize", s(input), "--out", s(&target)],
        needles,
        out.path(),
    );
    fails(&["inspect", s(input)], needles, out.path());
}

#[test]
fn truncated_safetensors() {
    let (inp, _) = dirs();
    let p = inp.path().join("cut.safetensors");
    let bytes = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    all_commands_fail(&p, &["cut.safetensors", "not a valid safetensors file"]);
    std::fs::write(&p, &bytes[..5]).unwrap();
    all_commands_fail(&p, &["cut.safetensors"]);
}

#[test]
fn corrupt_header() {
    let (inp, _) = dirs();
    let p = inp.path().join("corrupt.safetensors");
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend(b"{\"w\": not json }");
    std::fs::write(&p, &bytes).unwrap();
    all_commands_fail(&p, &["corrupt.safetensors", "invalid JSON"]);
    // A header length pointing past the end of the file.
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    std::fs::write(&p, &bytes).unwrap();
    all_commands_fail(&p, &["corrupt.safetensors"]);
}

#[test]
fn unsupported_dtypes() {
    let (inp, out) = dirs();
    let p = inp.path().join("in.safetensors");
    let ids: Vec<u8> = [1i64, 2, 3, 4]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write(
        &p,
        &[
            ("ids", Dtype::I64, vec![2, 2], ids),
            ("w", Dtype::F32, vec![2, 16], f32_bytes(&ramp(32))),
        ],
    );
    let o = out.path().join("x.safetensors");
    fails(
        &[
            "quantize",
            s(&p),
            "--format",
            "nf4",
            "--tensor",
            "ids",
            "--out",
            s(&o),
        ],
        &["in.safetensors", "`ids`", "I64", "cannot be quantized"],
        out.path(),
    );
    // An FP8 weight is floating point but cannot be requantized.
    let p8 = inp.path().join("fp8.safetensors");
    write(
        &p8,
        &[("proj.weight", Dtype::F8_E4M3, vec![4, 16], vec![0x38; 64])],
    );
    fails(
        &["quantize", s(&p8), "--format", "nvfp4", "--out", s(&o)],
        &["fp8.safetensors", "`proj.weight`", "F8_E4M3"],
        out.path(),
    );
}

#[test]
fn rows_that_are_not_whole_blocks() {
    let (inp, out) = dirs();
    let p = inp.path().join("in.safetensors");
    write(&p, &[("w", Dtype::F32, vec![4, 40], f32_bytes(&ramp(160)))]);
    let o = out.path().join("x.safetensors");
    fails(
        &["quantize", s(&p), "--format", "nvfp4", "--out", s(&o)],
        &[
            "in.safetensors",
            "`w`",
            "not a multiple of the block size 16",
        ],
        out.path(),
    );
    write(&p, &[("w", Dtype::F32, vec![4, 48], f32_bytes(&ramp(192)))]);
    fails(
        &["quantize", s(&p), "--format", "mxfp4", "--out", s(&o)],
        &["`w`", "not a multiple of the block size 32"],
        out.path(),
    );
}

#[test]
fn nan_and_inf_weights() {
    let (inp, out) = dirs();
    let p = inp.path().join("in.safetensors");
    let o = out.path().join("x.safetensors");
    for (bad, index) in [
        (f32::NAN, 37usize),
        (f32::INFINITY, 100),
        (f32::NEG_INFINITY, 255),
    ] {
        let mut v = ramp(256);
        v[index] = bad;
        write(
            &p,
            &[
                ("ok", Dtype::F32, vec![4, 64], f32_bytes(&ramp(256))),
                ("layer.weight", Dtype::F32, vec![4, 64], f32_bytes(&v)),
            ],
        );
        for format in ["nvfp4", "nf4", "fp4", "mxfp4"] {
            fails(
                &["quantize", s(&p), "--format", format, "--out", s(&o)],
                &["`layer.weight`", &format!("index {index}")],
                out.path(),
            );
        }
    }
    // Opting in quantizes them as zero.
    let st = Command::new(env!("CARGO_BIN_EXE_q4"))
        .args([
            "quantize",
            s(&p),
            "--format",
            "nvfp4",
            "--allow-non-finite",
            "--out",
            s(&o),
        ])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A copy of the ModelOpt model directory whose model.safetensors lacks `drop`.
fn modelopt_without(drop: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama-nvfp4");
    for f in ["config.json", "hf_quant_config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "{drop} exists");
    serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn missing_scale_tensor() {
    let w = "model.layers.0.mlp.down_proj.weight";
    let dir = modelopt_without(&format!("{w}_scale"));
    all_commands_fail(
        dir.path(),
        &["model.safetensors", w, "missing", &format!("`{w}_scale`")],
    );
    let dir = modelopt_without(&format!("{w}_scale_2"));
    all_commands_fail(
        dir.path(),
        &["model.safetensors", &format!("`{w}_scale_2`")],
    );
}

#[test]
fn unknown_layouts() {
    let (inp, _) = dirs();
    let p = inp.path().join("u8.safetensors");
    write(
        &p,
        &[
            ("codes", Dtype::U8, vec![4, 8], vec![0x11; 32]),
            ("w", Dtype::F32, vec![2, 16], f32_bytes(&ramp(32))),
        ],
    );
    all_commands_fail(&p, &["u8.safetensors", "`codes`", "unknown layout"]);
    let p = inp.path().join("orphan.safetensors");
    write(
        &p,
        &[(
            "proj.weight_scale",
            Dtype::F8_E4M3,
            vec![4, 2],
            vec![0x38; 8],
        )],
    );
    all_commands_fail(
        &p,
        &[
            "orphan.safetensors",
            "`proj.weight_scale`",
            "unknown layout",
        ],
    );
    // A model whose config declares a quantization q4 does not read.
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-llama/model.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("config.json"),
        r#"{"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}"#,
    )
    .unwrap();
    all_commands_fail(d.path(), &["config.json", "unknown layout", "gptq"]);
}

#[test]
fn unwritable_outputs() {
    let input = fixture("tiny-llama/model.safetensors");
    let out = tempfile::tempdir().unwrap();
    // Inside a directory that does not exist.
    let o = out.path().join("missing/dir/x.safetensors");
    fails(
        &["quantize", s(&input), "--format", "nf4", "--out", s(&o)],
        &["missing/dir"],
        out.path(),
    );
    fails(
        &["dequantize", s(&input), "--out", s(&o)],
        &["missing/dir"],
        out.path(),
    );
    // Inside something that is a file, not a directory.
    std::fs::write(out.path().join("file"), b"x").unwrap();
    let o = out.path().join("file/x.safetensors");
    fails_leaving(
        &["quantize", s(&input), "--format", "mxfp4", "--out", s(&o)],
        &["file/x.safetensors"],
        out.path(),
        &["file"],
    );
    // A model directory into a missing parent, and into a non-empty directory (left untouched).
    let model = fixture("tiny-llama");
    let o = out.path().join("missing/model");
    fails_leaving(
        &["quantize", s(&model), "--format", "nvfp4", "--out", s(&o)],
        &["missing"],
        out.path(),
        &["file"],
    );
    std::fs::create_dir(out.path().join("taken")).unwrap();
    std::fs::write(out.path().join("taken/keep.txt"), b"mine").unwrap();
    let o = out.path().join("taken");
    fails_leaving(
        &["quantize", s(&model), "--format", "nvfp4", "--out", s(&o)],
        &["taken", "not empty"],
        out.path(),
        &["file", "taken"],
    );
    assert_eq!(entries(&o), ["keep.txt"]);
}

#[cfg(unix)]
#[test]
fn read_only_output_directory() {
    use std::os::unix::fs::PermissionsExt;
    let input = fixture("tiny-llama/model.safetensors");
    let out = tempfile::tempdir().unwrap();
    let ro = out.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Privileged users (root in CI containers) can write anyway; nothing to test then.
    let probe = ro.join("probe");
    if std::fs::write(&probe, b"").is_ok() {
        std::fs::remove_file(&probe).unwrap();
        eprintln!("skipped: the read-only directory is writable by this user");
    } else {
        let o = ro.join("x.safetensors");
        fails(
            &["quantize", s(&input), "--format", "nvfp4", "--out", s(&o)],
            &["ro/x.safetensors"],
            &ro,
        );
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn missing_or_corrupt_gguf_input() {
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("x");
    fails(
        &["quantize", "model.gguf", "--format", "nf4", "--out", s(&o)],
        &["model.gguf", "cannot open"],
        out.path(),
    );
    let bad = out.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\xff\xff\xff\xff truncated").unwrap();
    fails_leaving(
        &["quantize", s(&bad), "--format", "nvfp4", "--out", s(&o)],
        &["bad.gguf", "not a valid GGUF file"],
        out.path(),
        &["bad.gguf"],
    );
    fails_leaving(
        &["inspect", s(&bad)],
        &["bad.gguf", "not a valid GGUF file"],
        out.path(),
        &["bad.gguf"],
    );
}

#[test]
fn option_mismatches() {
    let input = fixture("tiny-llama/model.safetensors");
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("x.safetensors");
    fails(
        &[
            "quantize",
            s(&input),
            "--format",
            "nvfp4",
            "--block-size",
            "32",
            "--out",
            s(&o),
        ],
        &["block size 32"],
        out.path(),
    );
    fails(
        &[
            "quantize",
            s(&input),
            "--format",
            "nf4",
            "--block-size",
            "48",
            "--out",
            s(&o),
        ],
        &["block size 48"],
        out.path(),
    );
    fails(
        &[
            "quantize",
            s(&input),
            "--format",
            "nvfp4",
            "--double-quant",
            "--out",
            s(&o),
        ],
        &["--double-quant"],
        out.path(),
    );
}
