//! `q4 logits` against the transformers goldens of the tiny fixture checkpoints.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

mod common;
use common::fixture;

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn q4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_q4"))
        .args(args)
        .output()
        .unwrap()
}

fn save_ids(path: &Path, ids: &Tensor) {
    let map = HashMap::from([("input_ids".to_string(), ids.clone())]);
    candle_core::safetensors::save(&map, path).unwrap();
}

/// Runs `q4 logits` on `ids` and returns the `logits` tensor it wrote.
fn cli_logits(model: &str, ids: &Tensor, extra: &[&str]) -> Tensor {
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (
        dir.path().join("ids.safetensors"),
        dir.path().join("out.safetensors"),
    );
    save_ids(&input, ids);
    let model = fixture(model);
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let o = q4(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Only the output file is left behind (the temporary file was renamed).
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 2);
    let mut t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    t.remove("logits").expect("`logits` in the output")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn check_golden(name: &str) {
    let g = golden(name);
    let logits = cli_logits(name, &g["input_ids"], &[]);
    assert_eq!(logits.dtype(), DType::F32);
    let err = max_abs_diff(&logits, &g["logits"]);
    assert!(err < 1e-4, "{name}: max |logits - golden| = {err}");
}

/// The greedy continuation is reproduced position by position: the argmax of the logits at
/// every generated position is the next golden greedy token.
fn check_greedy(name: &str) {
    let g = golden(name);
    let greedy = &g["greedy_ids"];
    let (_, total) = greedy.dims2().unwrap();
    let prompt_len = g["input_ids"].dim(1).unwrap();
    let logits = cli_logits(name, &greedy.narrow(1, 0, total - 1).unwrap(), &[]);
    let argmax: Vec<u32> = logits
        .squeeze(0)
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<i64> = greedy.squeeze(0).unwrap().to_vec1().unwrap();
    for pos in prompt_len - 1..total - 1 {
        assert_eq!(argmax[pos] as i64, want[pos + 1], "{name}: position {pos}");
    }
}

#[test]
fn tiny_qwen3_logits_via_cli() {
    check_golden("tiny-qwen3");
}

#[test]
fn tiny_llama_logits_via_cli() {
    check_golden("tiny-llama");
}

#[test]
fn tiny_qwen3_greedy_via_cli_logits() {
    check_greedy("tiny-qwen3");
}

#[test]
fn tiny_llama_greedy_via_cli_logits() {
    check_greedy("tiny-llama");
}

#[test]
fn real_nvfp4_and_nf4_checkpoints_via_cli() {
    for name in ["tiny-llama-nvfp4", "tiny-qwen3-nf4"] {
        check_golden(name);
        check_greedy(name);
    }
}

#[test]
fn quant_nvfp4_via_cli_matches_modelopt_export() {
    let g = golden("tiny-llama-nvfp4");
    // ModelOpt leaves embeddings and lm_head dense.
    let logits = cli_logits(
        "tiny-llama",
        &g["input_ids"],
        &["--quant", "nvfp4", "--embeddings", "f32"],
    );
    let err = max_abs_diff(&logits, &g["logits"]);
    assert!(err < 1e-4, "max |logits - golden| = {err}");
}

#[test]
fn bad_input_ids_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ids.safetensors");
    let out = dir.path().join("out.safetensors");
    let model = fixture("tiny-llama");
    let run = |ids: &Tensor| {
        save_ids(&input, ids);
        q4(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--input-ids",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let cases = [
        (
            Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(),
            "must be I64",
        ),
        (
            Tensor::new(&[[1i64, 9999]], &Device::Cpu).unwrap(),
            "outside the vocabulary",
        ),
        // tiny-llama's max_position_embeddings is 128.
        (
            Tensor::ones((1, 129), DType::I64, &Device::Cpu).unwrap(),
            "context length 128",
        ),
    ];
    for (ids, want) in cases {
        let o = run(&ids);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.starts_with("error: ") && err.lines().count() == 1,
            "{err}"
        );
        assert!(err.contains(want), "expected `{want}` in: {err}");
        assert!(!out.exists(), "no output is written on failure");
    }
}
