//! The GGUF path: tiny-llama written as llama.cpp would (GGUF names, q/k rows permuted by
//! convert_hf_to_gguf's `permute`, `llama.*` metadata) must give transformers' logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use q4_llm::{LoadOptions, Model};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// convert_hf_to_gguf.py `LlamaModel.permute`: rows `[heads, 2, half]` -> `[heads, half, 2]`.
fn llama_cpp_permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// llama.cpp's tensor names, written out independently of the loader's mapping.
fn gguf_name(hf: &str) -> String {
    let table = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    if let Some((_, g)) = table.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, module) = rest.split_once('.').unwrap();
    let (_, g) = table.iter().find(|(h, _)| *h == module).unwrap();
    format!("blk.{layer}.{g}")
}

fn write_gguf(path: &Path, arch: &str) {
    let tensors = candle_core::safetensors::load(
        fixture("tiny-llama").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut q = Vec::new();
    for (name, t) in &tensors {
        let t = if name.ends_with("q_proj.weight") {
            llama_cpp_permute(t, 4)
        } else if name.ends_with("k_proj.weight") {
            llama_cpp_permute(t, 2)
        } else {
            t.clone()
        };
        q.push((
            gguf_name(name),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("llama.embedding_length".into(), Value::U32(64)),
        ("llama.feed_forward_length".into(), Value::U32(128)),
        ("llama.block_count".into(), Value::U32(2)),
        ("llama.attention.head_count".into(), Value::U32(4)),
        ("llama.attention.head_count_kv".into(), Value::U32(2)),
        ("llama.rope.freq_base".into(), Value::F32(500000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-6),
        ),
        ("llama.context_length".into(), Value::U32(128)),
        ("llama.vocab_size".into(), Value::U32(512)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

#[test]
fn tiny_llama_as_gguf_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    write_gguf(&path, "llama");
    let src = q4_llm::open_weights(&path, false).unwrap();
    let cfg = src.config().unwrap();
    assert!(
        cfg.tie_word_embeddings,
        "no output.weight means tied embeddings"
    );
    assert_eq!(
        (cfg.head_dim, cfg.max_position_embeddings, cfg.vocab_size),
        (16, 128, 512)
    );
    let model = Model::load(src.as_ref(), &LoadOptions::default()).unwrap();
    let g: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture("tiny-llama").join("golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut cache = model.new_cache(12);
    let logits = model.forward(&g["input_ids"], &mut cache).unwrap();
    let err: f32 = (logits - &g["logits"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(err < 1e-4, "max |logits - golden| = {err}");
}

#[test]
fn unsupported_gguf_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_gguf(&path, "falcon");
    let err = q4_llm::open_weights(&path, false)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("falcon") && err.contains(path.to_str().unwrap()),
        "{err}"
    );
}

/// `q4 quantize model.gguf`'s path: the GGUF read back as an HF model (un-permuted q/k, HF
/// names, config) quantizes to exactly the bytes ModelOpt exported from the original weights.
#[test]
fn gguf_exports_to_an_hf_directory_that_quantizes_like_modelopt() {
    use q4::checkpoint::{quantize_model, Checkpoint, Entry, ModelSource, NoProgress};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    write_gguf(&path, "llama");
    let model = q4_llm::export::gguf_to_hf(&path).unwrap();
    assert_eq!(model.config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(model.config["tie_word_embeddings"], true);
    let out = dir.path().join("out");
    let src = ModelSource::from_tensors("tiny", model.tensors, model.config, vec![]).unwrap();
    quantize_model(
        &src,
        &q4::QuantSpec::new(q4::Format::Nvfp4),
        &out,
        &NoProgress,
    )
    .unwrap();
    let ours = Checkpoint::open(&out).unwrap();
    let modelopt = Checkpoint::open(fixture("tiny-llama-nvfp4")).unwrap();
    let mut compared = 0;
    for e in modelopt.entries() {
        let Entry::Quant(want) = e else { continue };
        let Some(Entry::Quant(got)) = ours.get(&want.name) else {
            panic!("{} is not quantized in the export", want.name)
        };
        assert_eq!(&got.codes[..], &want.codes[..], "{} codes", want.name);
        assert_eq!(
            got.tensor_scale, want.tensor_scale,
            "{} weight_scale_2",
            want.name
        );
        compared += 1;
    }
    assert_eq!(compared, 14);
}

/// The token table converts to bf16 in row chunks (so it never exists in f32 as a whole): the
/// result is bit for bit the whole-tensor dequantize-then-round, across chunk boundaries.
#[test]
fn piecewise_bf16_embeddings_equal_the_whole_tensor_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embed.gguf");
    let (rows, cols) = (2500usize, 64usize);
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 7) as f32))
        .collect();
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.attention.head_count".into(), Value::U32(4)),
        ("llama.attention.head_count_kv".into(), Value::U32(2)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &md_refs, &[("token_embd.weight", &q)]).unwrap();
    drop(f);
    let src = q4_llm::open_weights(&path, false).unwrap();
    let name = "model.embed_tokens.weight";
    let whole = src.tensor(name).unwrap().to_dtype(DType::BF16).unwrap();
    let piecewise = src.tensor_as(name, DType::BF16).unwrap();
    assert_eq!(piecewise.dims(), &[rows, cols]);
    let bits = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&piecewise), bits(&whole));
    // The int8 table is built from the same 1024-row slices (in f32) and equals quantizing the
    // whole f32 tensor at once.
    let int8 = src.int8_table(name).unwrap();
    let want = q4::Int8Table::quantize(&src.tensor(name).unwrap()).unwrap();
    let values = |t: &q4::Int8Table| {
        t.dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!((int8.rows(), int8.cols()), (rows, cols));
    assert_eq!(values(&int8), values(&want));
}
