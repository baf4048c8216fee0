//! Bad input to `q4 generate` / `q4 ppl`: non-zero exit, one `error:` line naming the
//! problem, nothing on stdout, no panic.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

mod common;
use common::fixture;

fn q4_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_q4"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn q4(args: &[&str]) -> Output {
    q4_env(args, &[])
}

/// Asserts a clean failure whose single stderr line contains every string of `want`.
fn assert_error(o: &Output, want: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for w in want {
        assert!(lines[0].contains(w), "expected `{w}` in: {err}");
    }
    assert!(
        o.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A copy of a fixture model directory that the test may edit.
fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

fn generate_with(model: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--temp",
        "0",
    ];
    args.extend(extra);
    q4(&args)
}

#[test]
fn missing_config_json() {
    let dir = copy_model("tiny-llama");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let o = generate_with(dir.path(), &["--prompt", "hello"]);
    assert_error(&o, &["config.json", dir.path().to_str().unwrap()]);
}

#[test]
fn missing_tensor() {
    let dir = copy_model("tiny-llama");
    edit_tensors(dir.path(), |t| {
        t.remove("model.layers.1.mlp.down_proj.weight").unwrap();
    });
    let o = generate_with(dir.path(), &["--prompt", "hello"]);
    assert_error(&o, &["model.layers.1.mlp.down_proj.weight", "not found"]);
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = copy_model("tiny-llama");
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let o = generate_with(dir.path(), &["--prompt", "hello"]);
    assert_error(&o, &["unsupported architecture", "GPT2LMHeadModel"]);
}

#[test]
fn tensor_with_wrong_shape() {
    let dir = copy_model("tiny-llama");
    let name = "model.layers.0.self_attn.q_proj.weight";
    edit_tensors(dir.path(), |t| {
        t.insert(
            name.into(),
            Tensor::zeros((64, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let o = generate_with(dir.path(), &["--prompt", "hello"]);
    assert_error(&o, &[name, "[64, 32]", "expected [64, 64]"]);
}

#[test]
fn quantized_checkpoint_refuses_a_second_quantization() {
    let o = generate_with(
        &fixture("tiny-llama-nvfp4"),
        &["--prompt", "hello", "--quant", "nf4"],
    );
    assert_error(&o, &["tiny-llama-nvfp4", "stores nvfp4 weights", "nf4"]);
}

#[test]
fn empty_prompt() {
    for p in ["", "   "] {
        let o = generate_with(&fixture("tiny-llama"), &["--prompt", p]);
        assert_error(&o, &["empty prompt"]);
    }
}

#[test]
fn max_tokens_past_the_context() {
    // tiny-llama: max_position_embeddings = 128.
    let o = generate_with(
        &fixture("tiny-llama"),
        &["--prompt", "the quick brown fox", "--max-tokens", "200"],
    );
    assert_error(&o, &["exceeds the model's context length 128"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(30);
    let o = generate_with(
        &fixture("tiny-llama"),
        &["--prompt", &prompt, "--max-tokens", "1"],
    );
    assert_error(&o, &["exceeds the model's context length 128"]);
}

#[test]
fn chat_without_template() {
    let o = generate_with(&fixture("tiny-llama"), &["--prompt", "hi", "--chat"]);
    assert_error(&o, &["no chat template"]);
}

#[test]
fn cuda_without_cuda_support() {
    if cfg!(feature = "cuda") {
        return;
    }
    let o = generate_with(
        &fixture("tiny-llama"),
        &["--prompt", "hi", "--device", "cuda"],
    );
    assert_error(&o, &["--device cuda"]);
}

#[test]
fn wrong_sha256_of_the_cached_default_model() {
    let home = tempfile::tempdir().unwrap();
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let cached = models.join(q4_llm::default_model::FILE_NAME);
    std::fs::write(&cached, b"GGUF but not the pinned model").unwrap();
    let o = q4_env(
        &["generate", "--prompt", "hello"],
        &[
            ("Q4_HOME", home.path().to_str().unwrap()),
            ("Q4_PIP", "q4-no-such-pip"),
        ],
    );
    assert_error(
        &o,
        &[
            "sha256",
            q4_llm::default_model::SHA256,
            cached.to_str().unwrap(),
        ],
    );
    // The corrupt file is left for the user to inspect, not silently replaced.
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        b"GGUF but not the pinned model"
    );
}

#[test]
fn default_model_neither_cached_nor_fetchable() {
    let home = tempfile::tempdir().unwrap();
    let o = q4_env(
        &["generate", "--prompt", "hello"],
        &[
            ("Q4_HOME", home.path().to_str().unwrap()),
            ("Q4_PIP", "q4-no-such-pip"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    // The fetch notice comes first, then the error.
    let last = err.lines().last().unwrap_or_default();
    assert!(!o.status.success());
    assert!(
        last.starts_with("error: ") && last.contains("pip could not supply it"),
        "{err}"
    );
    assert!(last.contains("q4-no-such-pip"), "{err}");
}

#[test]
fn ppl_of_a_missing_file() {
    let o = q4(&[
        "ppl",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--text",
        "/nonexistent/text.txt",
    ]);
    assert_error(&o, &["/nonexistent/text.txt"]);
}
