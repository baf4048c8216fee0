//! End-to-end `q4 quantize` / `q4 dequantize` runs of the built binary.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use q4::checkpoint::{Checkpoint, Entry, Layout, ScaleData};
use q4_formats::Format;
use safetensors::tensor::{serialize_to_file, TensorView};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

mod common;
use common::{fixture, s};

fn q4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_q4"))
        .args(args)
        .output()
        .expect("run q4")
}

fn ok(args: &[&str]) -> String {
    let out = q4(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "q4 {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// name -> (dtype, shape, bytes) of every stored tensor.
type Stored = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn stored(path: &Path) -> Stored {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn bf16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect()
}

/// Deterministic weight-like values with rows of different magnitude.
fn weights(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            let mut u = 0.0;
            for _ in 0..4 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                u += (x >> 40) as f32 / (1u64 << 24) as f32;
            }
            (u - 2.0) * 0.05 * (1 + (i / cols) % 5) as f32
        })
        .collect()
}

fn write_input(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    serialize_to_file(views, None, path).unwrap();
}

fn le<T: Copy>(v: &[T], f: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// Largest error allowed for each element of tensor `name` quantized in `format` into the file
/// or directory `q`: half the widest gap of the format's grid. E2M1 (NVFP4, MXFP4): one block
/// scale (the gap between 4 and 6), two under MXFP4's FLOOR rule, which clips up to 8 to 6.
/// NF4: 0.152 x the block's absmax (the gap between -1 and -0.696); bnb-FP4: 0.17 (between 2/3
/// and 1); plus how far a double-quantized absmax moved.
fn bounds(format: &str, floor: bool, q: &Path, name: &str, input: &[f32], cols: usize) -> Vec<f32> {
    let c = Checkpoint::open(q).unwrap();
    let Some(Entry::Quant(v)) = c.get(name) else {
        panic!("{name} is not quantized")
    };
    (0..input.len())
        .map(|i| match (&v.scales, format) {
            (ScaleData::Bytes { bytes, table }, "nvfp4") => table[bytes[i / 16] as usize],
            (ScaleData::Bytes { bytes, table }, _) => {
                let clip = if floor { 2.0 } else { 1.0 };
                clip * table[bytes[i / cols * cols.div_ceil(32) + i % cols / 32] as usize]
            }
            (ScaleData::Absmax { decoded, .. }, _) => {
                let b = i / v.block_size;
                let block = &input[b * v.block_size..((b + 1) * v.block_size).min(input.len())];
                let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                let k = if format == "nf4" { 0.152 } else { 0.17 };
                k * absmax + (absmax - decoded[b]).abs()
            }
        })
        .collect()
}

#[test]
fn every_format_round_trips_within_its_error_bound() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let w = weights(8 * 64, 64, 1);
    let wb: Vec<f32> = weights(4 * 96, 96, 2)
        .into_iter()
        .map(|x| f32::from_bits((bf16_bits(x) as u32) << 16))
        .collect();
    let bias = weights(64, 64, 3);
    let ids: Vec<i64> = vec![3, 1, 4];
    write_input(
        &input,
        &[
            (
                "w",
                Dtype::F32,
                vec![8, 64],
                le(&w, |x| x.to_le_bytes().to_vec()),
            ),
            (
                "wb",
                Dtype::BF16,
                vec![4, 96],
                le(&wb, |x| bf16_bits(x).to_le_bytes().to_vec()),
            ),
            (
                "bias",
                Dtype::F32,
                vec![64],
                le(&bias, |x| x.to_le_bytes().to_vec()),
            ),
            (
                "ids",
                Dtype::I64,
                vec![3],
                le(&ids, |x| x.to_le_bytes().to_vec()),
            ),
        ],
    );
    let orig = stored(&input);
    let names = |f: &str, n: &str| -> Vec<String> {
        let keys: &[&str] = match f {
            "nvfp4" => &["", "_scale", "_scale_2"],
            "mxfp4" => &["_blocks", "_scales"],
            "nf4" => &[
                "",
                ".absmax",
                ".quant_map",
                ".quant_state.bitsandbytes__nf4",
            ],
            _ => &[
                "",
                ".absmax",
                ".quant_map",
                ".quant_state.bitsandbytes__fp4",
            ],
        };
        keys.iter().map(|k| format!("{n}{k}")).collect()
    };
    for (format, extra) in [
        ("nvfp4", None),
        ("mxfp4", None),
        ("mxfp4", Some("--mx-scale=floor")),
        ("nf4", None),
        ("nf4", Some("--double-quant")),
        ("fp4", None),
    ] {
        let q = dir.path().join(format!("{format}.safetensors"));
        let d = dir.path().join(format!("{format}.dq.safetensors"));
        let mut args = vec!["quantize", s(&input), "--format", format, "--out", s(&q)];
        args.extend(extra);
        ok(&args);
        let qs = stored(&q);
        let mut want: Vec<String> = ["w", "wb"].iter().flat_map(|n| names(format, n)).collect();
        if extra == Some("--double-quant") {
            for n in ["w", "wb"] {
                want.push(format!("{n}.nested_absmax"));
                want.push(format!("{n}.nested_quant_map"));
            }
        }
        want.extend(["bias".to_string(), "ids".to_string()]);
        want.sort();
        assert_eq!(qs.keys().cloned().collect::<Vec<_>>(), want, "{format}");
        assert_eq!(qs["bias"], orig["bias"]);
        assert_eq!(qs["ids"], orig["ids"]);

        let out = ok(&["dequantize", s(&q), "--out", s(&d)]);
        assert!(out.contains("dequantized 2 tensors"), "{out}");
        let ds = stored(&d);
        assert_eq!(ds.keys().collect::<Vec<_>>(), ["bias", "ids", "w", "wb"]);
        assert_eq!(ds["bias"], orig["bias"]);
        assert_eq!(ds["ids"], orig["ids"]);
        for (name, x, cols) in [("w", &w, 64), ("wb", &wb, 96)] {
            let (dt, shape, bytes) = &ds[name];
            assert_eq!((*dt, shape), (Dtype::F32, &orig[name].1), "{format} {name}");
            let floor = extra == Some("--mx-scale=floor");
            let lims = bounds(format, floor, &q, name, x, cols);
            for (i, (a, b)) in x.iter().zip(f32s(bytes)).enumerate() {
                let lim = lims[i];
                assert!(
                    (a - b).abs() <= lim,
                    "{format} {name}[{i}]: {a} vs {b} (bound {lim})"
                );
            }
        }
    }
    // --dtype bf16 rounds the f32 dequantization.
    let q = dir.path().join("nvfp4.safetensors");
    let d = dir.path().join("bf16.safetensors");
    ok(&["dequantize", s(&q), "--out", s(&d), "--dtype", "bf16"]);
    let ds = stored(&d);
    let d32 = stored(&dir.path().join("nvfp4.dq.safetensors"));
    assert_eq!(ds["w"].0, Dtype::BF16);
    let want: Vec<f32> = f32s(&d32["w"].2)
        .into_iter()
        .map(|x| f32::from_bits((bf16_bits(x) as u32) << 16))
        .collect();
    assert_eq!(bf16s(&ds["w"].2), want);
    assert_eq!(ds["ids"].0, Dtype::I64);
}

#[test]
fn explicit_tensors_and_padding() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let a = weights(4 * 40, 40, 4);
    let b = weights(4 * 64, 64, 5);
    write_input(
        &input,
        &[
            (
                "a",
                Dtype::F32,
                vec![4, 40],
                le(&a, |x| x.to_le_bytes().to_vec()),
            ),
            (
                "b",
                Dtype::F32,
                vec![4, 64],
                le(&b, |x| x.to_le_bytes().to_vec()),
            ),
        ],
    );
    let q = dir.path().join("q.safetensors");
    ok(&[
        "quantize",
        s(&input),
        "--format",
        "nvfp4",
        "--tensor",
        "a",
        "--pad",
        "--out",
        s(&q),
    ]);
    let c = Checkpoint::open(&q).unwrap();
    let Some(Entry::Quant(qa)) = c.get("a") else {
        panic!("a quantized")
    };
    assert_eq!(qa.shape, vec![4, 40]);
    assert!(matches!(c.get("b"), Some(Entry::Dense(_))));
    let d = dir.path().join("d.safetensors");
    ok(&["dequantize", s(&q), "--out", s(&d)]);
    assert_eq!(stored(&d)["a"].1, vec![4, 40]);
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn without_producer(mut v: Value) -> Value {
    for p in ["/producer", "/quantization_config/producer"] {
        let (parent, key) = p.rsplit_once('/').unwrap();
        let target = if parent.is_empty() {
            Some(&mut v)
        } else {
            v.pointer_mut(parent)
        };
        if let Some(Value::Object(m)) = target {
            m.remove(key);
        }
    }
    v
}

#[test]
fn tiny_llama_to_nvfp4_reproduces_the_modelopt_export() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-llama-nvfp4");
    ok(&[
        "quantize",
        s(&fixture("tiny-llama")),
        "--format",
        "nvfp4",
        "--out",
        s(&out),
    ]);
    let got = stored(&out.join("model.safetensors"));
    let mut want = stored(&fixture("tiny-llama-nvfp4/model.safetensors"));
    // input_scale comes from calibration, which q4 does not run.
    want.retain(|n, _| !n.ends_with(".input_scale"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let mut n_weights = 0;
    for (n, w) in &want {
        let g = &got[n];
        assert_eq!((g.0, &g.1), (w.0, &w.1), "{n}");
        let diffs = g.2.iter().zip(&w.2).filter(|(a, b)| a != b).count();
        assert_eq!(diffs, 0, "{n}: {diffs} of {} bytes differ", w.2.len());
        n_weights += n.ends_with("_proj.weight") as usize;
    }
    assert_eq!(n_weights, 14);

    let ref_dir = fixture("tiny-llama-nvfp4");
    let mut config = json(&out.join("config.json"));
    let mut ref_config = json(&ref_dir.join("config.json"));
    let qc = config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config")
        .unwrap();
    let ref_qc = ref_config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config")
        .unwrap();
    assert_eq!(qc["producer"]["name"], "q4");
    assert_eq!(without_producer(qc), without_producer(ref_qc));
    assert_eq!(config, json(&fixture("tiny-llama/config.json")));
    assert_eq!(
        without_producer(json(&out.join("hf_quant_config.json"))),
        without_producer(json(&ref_dir.join("hf_quant_config.json")))
    );
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(ref_dir.join(f)).unwrap(),
            "{f}"
        );
    }
    let c = Checkpoint::open(&out).unwrap();
    assert_eq!(c.declared().unwrap().layout(), Some(Layout::ModelOpt));
}

#[test]
fn tiny_qwen3_to_nf4_with_double_quant_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nf4");
    ok(&[
        "quantize",
        s(&fixture("tiny-qwen3")),
        "--format",
        "nf4",
        "--double-quant",
        "--out",
        s(&out),
    ]);
    let config = json(&out.join("config.json"));
    let reference = json(&fixture("tiny-qwen3-nf4/config.json"));
    assert_eq!(
        config["quantization_config"],
        reference["quantization_config"]
    );

    let c = Checkpoint::open(&out).unwrap();
    assert_eq!(c.declared().unwrap().layout(), Some(Layout::Bitsandbytes));
    let original = stored(&fixture("tiny-qwen3/model.safetensors"));
    let bnb_ref = stored(&fixture("tiny-qwen3-nf4/model.safetensors"));
    let mut n = 0;
    for e in c.entries() {
        let Entry::Quant(q) = e else { continue };
        n += 1;
        assert_eq!((q.layout, q.format), (Layout::Bitsandbytes, Format::Nf4));
        assert_eq!(q.members.len(), 6, "{}: nested statistics", q.name);
        // The 4-bit codes are bitsandbytes' own (the nested 8-bit absmax codes may differ in
        // rare ties: bitsandbytes' CPU kernel uses a lookup table, q4 the exact search).
        assert_eq!(&q.codes[..], &bnb_ref[&q.name].2[..], "{}", q.name);
        let x = f32s(&original[&q.name].2);
        let lims = bounds("nf4", false, &out, &q.name, &x, 64);
        for (i, (a, b)) in x.iter().zip(q.dequantize::<f32>()).enumerate() {
            let lim = lims[i];
            assert!((a - b).abs() <= lim, "{}[{i}]: {a} vs {b}", q.name);
        }
    }
    assert_eq!(n, 14);
}

#[test]
fn tiny_llama_to_mxfp4_writes_the_mxfp4_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mx");
    ok(&[
        "quantize",
        s(&fixture("tiny-llama")),
        "--format",
        "mxfp4",
        "--out",
        s(&out),
    ]);
    let config = json(&out.join("config.json"));
    assert_eq!(
        config["quantization_config"],
        serde_json::json!({"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head", "model.embed_tokens"]})
    );
    let got = stored(&out.join("model.safetensors"));
    assert_eq!(
        got["model.layers.0.mlp.down_proj.weight_blocks"].1,
        vec![64, 4, 16]
    );
    assert_eq!(
        got["model.layers.0.mlp.down_proj.weight_scales"].1,
        vec![64, 4]
    );
    let c = Checkpoint::open(&out).unwrap();
    let quantized = c
        .entries()
        .iter()
        .filter(|e| matches!(e, Entry::Quant(_)))
        .count();
    assert_eq!(quantized, 14);
    assert!(!out.join("hf_quant_config.json").exists());
}
