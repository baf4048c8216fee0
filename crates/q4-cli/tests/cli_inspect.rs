//! `q4 inspect` of the reference checkpoints, as a table and as JSON.

use std::process::Command;

use serde_json::Value;

mod common;
use common::{fixture, s};

fn inspect(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_q4"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("run q4");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

/// ModelOpt NVFP4 of an [N, K] weight: K/2 code bytes and K/16 scale bytes per row, plus the
/// tensor and input scales.
fn nvfp4_bits(n: usize, k: usize) -> f64 {
    ((n * k / 2 + n * k / 16 + 8) * 8) as f64 / (n * k) as f64
}

#[test]
fn table_lists_layout_format_shape_and_bits_per_weight() {
    let (out, stderr) = inspect(&[s(&fixture("tiny-llama-nvfp4"))]);
    assert!(stderr.is_empty(), "{stderr}");
    let line = out
        .lines()
        .find(|l| l.starts_with("model.layers.0.mlp.down_proj.weight "))
        .expect("down_proj row");
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cols[1..3], ["modelopt", "nvfp4"]);
    assert!(line.contains("[64, 128]"), "{line}");
    assert!(line.contains("U8+F8_E4M3+F32+F32"), "{line}");
    assert_eq!(cols.last().unwrap(), &format!("{:.3}", nvfp4_bits(64, 128)));
    let embed = out
        .lines()
        .find(|l| l.starts_with("model.embed_tokens.weight "))
        .unwrap();
    assert!(embed.contains("dense") && embed.contains("[512, 64]") && embed.ends_with("32.000"));
    assert!(out.contains("declared: modelopt NVFP4"), "{out}");
    let total = out.lines().find(|l| l.starts_with("total:")).unwrap();
    assert!(total.contains("20 tensors"), "{total}");
    let quantized = out.lines().last().unwrap();
    assert!(
        quantized.starts_with("quantized: 14 tensors"),
        "{quantized}"
    );
}

#[test]
fn json_report_is_machine_readable() {
    let (out, _) = inspect(&[s(&fixture("tiny-qwen3-nf4")), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 25);
    let q = tensors
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q["layout"], "bitsandbytes");
    assert_eq!(q["format"], "nf4");
    assert_eq!(q["shape"], serde_json::json!([64, 64]));
    assert_eq!(q["block_size"], 64);
    assert_eq!(q["members"].as_array().unwrap().len(), 6);
    // 2048 code bytes, 64 absmax codes, nested absmax, both maps and the JSON state.
    let bytes = q["bytes"].as_u64().unwrap() as f64;
    let bpw = q["bits_per_weight"].as_f64().unwrap();
    assert!((bpw - bytes * 8.0 / 4096.0).abs() < 1e-9);
    assert!(bpw > 4.0 && bpw < 8.0, "{bpw}");
    assert_eq!(v["totals"]["tensors"], 25);
    assert_eq!(v["totals"]["quantized_tensors"], 14);
    assert_eq!(v["declared"]["quant_method"], "bitsandbytes");
    let lm = tensors
        .iter()
        .find(|t| t["name"] == "lm_head.weight")
        .unwrap();
    assert_eq!(
        (lm["layout"].as_str(), lm["bits_per_weight"].as_f64()),
        (Some("dense"), Some(32.0))
    );
}

#[test]
fn reports_what_quantize_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mx.safetensors");
    let st = Command::new(env!("CARGO_BIN_EXE_q4"))
        .args([
            "quantize",
            s(&fixture("tiny-llama/model.safetensors")),
            "--format",
            "mxfp4",
        ])
        .args(["--out", s(&out)])
        .status()
        .unwrap();
    assert!(st.success());
    let (text, _) = inspect(&[s(&out), "--json"]);
    let v: Value = serde_json::from_str(&text).unwrap();
    let t = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    assert_eq!(
        (t["layout"].as_str(), t["format"].as_str()),
        (Some("gpt-oss"), Some("mxfp4"))
    );
    assert_eq!(t["shape"], serde_json::json!([128, 64]));
    assert_eq!(t["bits_per_weight"].as_f64(), Some(4.25));
}

/// A GGUF file as llama.cpp lays one out: a Q4_0 weight, a Q8_0 table, an F32 norm, metadata
/// with a tokenizer array.
fn write_gguf(path: &std::path::Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (64, 128), &dev).unwrap();
    let tensors = [
        (
            "blk.0.ffn_up.weight",
            QTensor::quantize(&w, GgmlDType::Q4_0).unwrap(),
        ),
        (
            "token_embd.weight",
            QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(),
        ),
        (
            "output_norm.weight",
            QTensor::quantize(
                &Tensor::ones(128, candle_core::DType::F32, &dev).unwrap(),
                GgmlDType::F32,
            )
            .unwrap(),
        ),
    ];
    let tokens = gguf_file::Value::Array(vec![
        gguf_file::Value::String("a".into()),
        gguf_file::Value::String("b".into()),
    ]);
    let md = [
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("general.file_type", gguf_file::Value::U32(2)),
        ("tokenizer.ggml.tokens", tokens),
    ];
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &t).unwrap();
}

#[test]
fn gguf_files_list_their_ggml_types_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    // Recognised by its magic bytes, not its name.
    let path = dir.path().join("model.bin");
    write_gguf(&path);
    let (out, stderr) = inspect(&[s(&path)]);
    assert!(stderr.is_empty(), "{stderr}");
    let row = |name: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {out}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    // Q4_0: 18 bytes per 32 weights; Q8_0: 34 per 32.
    assert_eq!(
        row("blk.0.ffn_up.weight"),
        [
            "blk.0.ffn_up.weight",
            "gguf",
            "q4_0",
            "[64,",
            "128]",
            "Q4_0",
            "4608",
            "4.500"
        ]
    );
    assert_eq!(row("token_embd.weight")[6..], ["8704", "8.500"]);
    assert_eq!(row("output_norm.weight")[2], "f32");
    assert!(
        out.contains("gguf: 3 metadata keys, architecture llama, file_type 2"),
        "{out}"
    );
    assert!(
        out.contains("quantized: 2 tensors, 16384 parameters, 13312 bytes"),
        "{out}"
    );

    let (json, _) = inspect(&[s(&path), "--json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["gguf"]["metadata"]["general.architecture"], "llama");
    assert_eq!(
        v["gguf"]["metadata"]["tokenizer.ggml.tokens"],
        serde_json::json!({"array": "string", "len": 2})
    );
    let t = v["tensors"].as_array().unwrap();
    assert_eq!(t.len(), 3);
    assert_eq!(t[0]["name"], "blk.0.ffn_up.weight");
    assert_eq!(t[0]["bits_per_weight"], 4.5);
    assert_eq!(v["totals"]["quantized_tensors"], 2);
}
