//! The CUDA runner's captured decode step (`Model::decode_step`) against the eager forward
//! (`Model::forward_last`) on the same device: logits at every step, through KV-cache growth
//! (each growth captures the step again), for Llama, Qwen3 (q/k norm) and Qwen2 (q/k/v bias)
//! fixtures, 4-bit and dense. Skips without a usable CUDA device.
#![cfg(feature = "cuda")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use q4::Format;
use q4_llm::{EmbeddingStorage, LoadOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn gpu() -> Option<Device> {
    let report = q4::probe::cuda_report();
    if report.status != "ok" || report.devices.is_empty() {
        eprintln!("skipped: no usable CUDA device ({})", report.status);
        return None;
    }
    Some(Device::new_cuda(0).expect("CUDA device 0"))
}

/// tiny-llama turned into a Qwen2 checkpoint: the same weights plus random q/k/v biases.
fn qwen2_fixture(dir: &Path) {
    let src = fixture("tiny-llama");
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
        .expect("tiny-llama weights");
    for (name, rows) in [("q_proj", 4 * 16), ("k_proj", 2 * 16), ("v_proj", 2 * 16)] {
        for layer in 0..2 {
            let b = Tensor::randn(0f32, 0.5, rows, &Device::Cpu).unwrap();
            tensors.insert(format!("model.layers.{layer}.self_attn.{name}.bias"), b);
        }
    }
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

/// Drives both paths with the eager path's greedy tokens; returns the worst logit difference
/// relative to the largest logit.
fn compare(dir: &Path, quant: Option<Format>, embeddings: EmbeddingStorage, dev: &Device) -> f32 {
    let opts = LoadOptions {
        quant,
        embeddings: Some(embeddings),
        device: dev.clone(),
        ..Default::default()
    };
    let (model, _) = q4_llm::load(dir, &opts).unwrap();
    let prompt = Tensor::new(&[1u32, 5, 9, 200, 17], dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    // Capacity 4: the prompt already grows the buffers, and the decode grows them three more
    // times, each time capturing the step again.
    let (mut graph_cache, mut eager_cache) = (model.new_cache(4), model.new_cache(4));
    model.forward_last(&prompt, &mut graph_cache).unwrap();
    let first = model.forward_last(&prompt, &mut eager_cache).unwrap();
    let mut token = argmax(&first.squeeze(0).unwrap());
    let mut worst = 0f32;
    let mut captured = 0;
    for step in 0..20 {
        let g = model.decode_step(token, &mut graph_cache).unwrap();
        let ids = Tensor::new(&[token], dev).unwrap().unsqueeze(0).unwrap();
        let e = model
            .forward_last(&ids, &mut eager_cache)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_eq!(g.dims(), e.dims());
        assert_eq!(g.dtype(), DType::F32);
        let g = g.to_vec1::<f32>().unwrap();
        let e = e.to_vec1::<f32>().unwrap();
        let scale = e.iter().fold(0f32, |a, v| a.max(v.abs()));
        let diff = g
            .iter()
            .zip(&e)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
            / scale;
        assert!(
            diff <= 3e-2,
            "{dir:?} {quant:?} step {step}: graph logits differ from eager by {diff:.3e} of the largest"
        );
        worst = worst.max(diff);
        captured += usize::from(graph_cache.decode_graph_captured());
        token = argmax(&Tensor::new(e.as_slice(), &Device::Cpu).unwrap());
    }
    assert_eq!(graph_cache.len(), eager_cache.len());
    assert_eq!(
        captured, 20,
        "{dir:?} {quant:?}: every step should have a graph"
    );
    eprintln!("{dir:?} {quant:?}: worst difference {worst:.2e} of the largest logit");
    worst
}

fn argmax(logits: &Tensor) -> u32 {
    logits
        .to_dtype(DType::F32)
        .unwrap()
        .argmax(0)
        .unwrap()
        .to_scalar::<u32>()
        .unwrap()
}

#[test]
fn captured_decode_step_matches_the_eager_forward() {
    let Some(dev) = gpu() else { return };
    let qwen2 = tempfile::tempdir().unwrap();
    qwen2_fixture(qwen2.path());
    for dir in [
        fixture("tiny-llama"),
        fixture("tiny-qwen3"),
        qwen2.path().to_path_buf(),
    ] {
        for quant in [Some(Format::Nvfp4), Some(Format::Nf4), None] {
            let emb = if quant.is_some() {
                EmbeddingStorage::Bf16
            } else {
                EmbeddingStorage::F32
            };
            compare(&dir, quant, emb, &dev);
        }
    }
}

#[test]
fn decode_step_rejects_bad_tokens_and_full_contexts() {
    let Some(dev) = gpu() else { return };
    let opts = LoadOptions {
        quant: Some(Format::Nvfp4),
        device: dev.clone(),
        ..Default::default()
    };
    let (model, _) = q4_llm::load(&fixture("tiny-llama"), &opts).unwrap();
    let mut cache = model.new_cache(8);
    let err = model.decode_step(512, &mut cache).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    // Fill the 128-position context, then one more step must fail cleanly.
    let ids = Tensor::new(&[7u32; 128], &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward_last(&ids, &mut cache).unwrap();
    let err = model.decode_step(3, &mut cache).unwrap_err().to_string();
    assert!(err.contains("context length"), "{err}");
}

#[test]
fn captured_steps_keep_device_memory_flat() {
    let Some(dev) = gpu() else { return };
    let opts = LoadOptions {
        quant: Some(Format::Nvfp4),
        device: dev.clone(),
        ..Default::default()
    };
    let (model, _) = q4_llm::load(&fixture("tiny-llama"), &opts).unwrap();
    let Device::Cuda(cuda) = model.device() else {
        unreachable!()
    };
    let free = || {
        cuda.cuda_stream().synchronize().unwrap();
        cuda.cuda_stream().context().mem_get_info().unwrap().0
    };
    let mut cache = model.new_cache(128);
    let run = |cache: &mut q4_llm::KvCache| {
        // 100 steps in a fresh cache: one capture, 99 replays.
        cache.reset();
        for i in 0..100u32 {
            model.decode_step(i % 512, cache).unwrap();
        }
        assert!(cache.decode_graph_captured());
    };
    run(&mut cache);
    let before = free();
    for _ in 0..20 {
        run(&mut cache);
    }
    let after = free();
    eprintln!("device memory: {before} free before, {after} after 2,000 steps and 20 captures");
    assert!(
        after + (4 << 20) >= before,
        "device memory fell from {before} to {after} free"
    );
}
