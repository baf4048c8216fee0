//! Agreement with transformers on the tiny fixture checkpoints (golden.safetensors).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use q4::Format;
use q4_llm::{generate, EmbeddingStorage, GenerateOptions, LoadOptions, SamplingParams};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("golden.safetensors"), &Device::Cpu).unwrap()
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

/// Loads a fixture; quantized like ModelOpt and bitsandbytes do it (decoder linears only,
/// embeddings and lm_head left dense) so the results compare with their goldens.
fn load(name: &str, quant: Option<Format>) -> q4_llm::Model {
    let opts = LoadOptions {
        quant,
        embeddings: Some(EmbeddingStorage::F32),
        ..Default::default()
    };
    q4_llm::load(&fixture(name), &opts).unwrap().0
}

/// One full forward of `ids` from an empty cache.
fn logits(model: &q4_llm::Model, ids: &Tensor) -> Tensor {
    let mut cache = model.new_cache(ids.dim(1).unwrap());
    model.forward(ids, &mut cache).unwrap()
}

fn check_logits(model_dir: &str, quant: Option<Format>, golden_dir: &str, tol: f32) -> f32 {
    let model = load(model_dir, quant);
    let g = golden(golden_dir);
    let logits = logits(&model, &g["input_ids"]);
    let err = max_abs_diff(&logits, &g["logits"]);
    eprintln!("{model_dir} {quant:?} vs {golden_dir}: max abs err {err}");
    assert!(
        err <= tol,
        "{model_dir} {quant:?}: max |logits - golden| = {err} > {tol}"
    );
    err
}

fn check_hidden_states(name: &str) {
    let model = load(name, None);
    let g = golden(name);
    let ids = &g["input_ids"];
    let mut cache = model.new_cache(ids.dim(1).unwrap());
    let hs = model.hidden_states(ids, &mut cache).unwrap();
    assert!(max_abs_diff(&hs.embeddings, &g["embeddings"]) == 0.0);
    for (i, out) in hs.layer_outputs.iter().enumerate() {
        let want = g["layer_outputs"].get(i).unwrap();
        let err = max_abs_diff(out, &want);
        assert!(err < 1e-4, "{name}: layer {i} output differs by {err}");
    }
    assert!(max_abs_diff(&hs.final_norm, &g["final_norm"]) < 1e-4);
}

/// Greedy continuation of `input_ids[:1]` with the KV cache, no EOS stop.
fn check_greedy(name: &str) {
    let model = load(name, None);
    let g = golden(name);
    let want: Vec<u32> = g["greedy_ids"]
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let prompt: Vec<u32> = g["input_ids"]
        .get(0)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let new = want.len() - prompt.len();
    let opts = GenerateOptions {
        max_new_tokens: new,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    };
    let mut cache = model.new_cache(want.len());
    let mut streamed = Vec::new();
    let out = generate(&model, &mut cache, &prompt, &opts, |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(out.tokens, streamed);
    let mut got = prompt.clone();
    got.extend(&out.tokens);
    assert_eq!(got, want, "{name}: greedy ids differ from transformers");
    // The cache holds everything but the last token, which was never fed back.
    assert_eq!(cache.len(), want.len() - 1);
}

#[test]
fn tiny_qwen3_logits_match_transformers() {
    check_logits("tiny-qwen3", None, "tiny-qwen3", 1e-4);
}

#[test]
fn tiny_llama_logits_match_transformers() {
    check_logits("tiny-llama", None, "tiny-llama", 1e-4);
}

#[test]
fn tiny_qwen3_hidden_states_match_transformers() {
    check_hidden_states("tiny-qwen3");
}

#[test]
fn tiny_llama_hidden_states_match_transformers() {
    check_hidden_states("tiny-llama");
}

#[test]
fn tiny_qwen3_greedy_matches_transformers() {
    check_greedy("tiny-qwen3");
}

#[test]
fn tiny_llama_greedy_matches_transformers() {
    check_greedy("tiny-llama");
}

/// `--quant nvfp4` at load (q/k/v and gate/up sharing one tensor scale) reproduces ModelOpt's
/// NVFP4 export of the same model: the golden of tiny-llama-nvfp4 is the float32 model over
/// ModelOpt's dequantized weights.
#[test]
fn real_modelopt_nvfp4_checkpoint_matches_its_golden() {
    let err = check_logits("tiny-llama-nvfp4", None, "tiny-llama-nvfp4", 1e-4);
    eprintln!("tiny-llama-nvfp4 (stored NVFP4 weights): max |logit diff| {err:e}");
    check_greedy("tiny-llama-nvfp4");
}

#[test]
fn real_bitsandbytes_nf4_checkpoint_matches_its_golden() {
    let err = check_logits("tiny-qwen3-nf4", None, "tiny-qwen3-nf4", 1e-4);
    eprintln!(
        "tiny-qwen3-nf4 (stored NF4 weights, blocks straddle rows): max |logit diff| {err:e}"
    );
    check_greedy("tiny-qwen3-nf4");
}

#[test]
fn quantized_embeddings_share_one_table_with_the_tied_lm_head() {
    let g = golden("tiny-llama");
    let ids = &g["input_ids"];
    let run = |quantized: bool| {
        let embeddings = Some(if quantized {
            EmbeddingStorage::Quantized
        } else {
            EmbeddingStorage::F32
        });
        let opts = LoadOptions {
            quant: Some(Format::Nvfp4),
            embeddings,
            ..Default::default()
        };
        logits(&q4_llm::load(&fixture("tiny-llama"), &opts).unwrap().0, ids)
    };
    let (dense_emb, q_emb) = (run(false), run(true));
    let d = max_abs_diff(&dense_emb, &q_emb);
    // 4-bit embeddings and lm_head move the logits, by about what 4-bit decoder layers do.
    assert!(d > 1e-3 && d < 2.5, "max |diff| {d}");
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
}

/// Int8 activations (W4A8) and int8 embeddings / LM head (tied: one shared table; untied: the
/// head quantized on its own) move the logits by a fraction of a percent of what the 4-bit
/// decoder layers already do; the options are refused where they cannot apply.
#[test]
fn int8_activations_and_embeddings_stay_close_to_f32() {
    for name in ["tiny-llama", "tiny-qwen3"] {
        let g = golden(name);
        let ids = &g["input_ids"];
        let run = |embeddings, w4a8| {
            let opts = LoadOptions {
                quant: Some(Format::Nvfp4),
                embeddings: Some(embeddings),
                w4a8,
                ..Default::default()
            };
            logits(&q4_llm::load(&fixture(name), &opts).unwrap().0, ids)
        };
        let base = run(EmbeddingStorage::F32, false);
        // What quantizing the decoder layers to NVFP4 already does to the logits.
        let dense = logits(&load(name, None), ids);
        let four_bit = rel_diff(&base, &dense);
        // NF4 in W4A8 (its codebook rounded to int8 too) against NF4 weight-only.
        let nf4 = |w4a8| {
            let opts = LoadOptions {
                quant: Some(Format::Nf4),
                embeddings: Some(EmbeddingStorage::F32),
                w4a8,
                ..Default::default()
            };
            logits(&q4_llm::load(&fixture(name), &opts).unwrap().0, ids)
        };
        let nf4_base = nf4(false);
        let (r, nf4_four_bit) = (rel_diff(&nf4(true), &nf4_base), rel_diff(&nf4_base, &dense));
        eprintln!("{name} NF4 w4a8: relative logit change {r:e} (NF4: {nf4_four_bit:e})");
        assert!(r > 0.0 && r < 0.1 * nf4_four_bit, "{name} NF4 w4a8: {r}");
        for (emb, w4a8) in [
            (EmbeddingStorage::Int8, false),
            (EmbeddingStorage::F32, true),
            (EmbeddingStorage::Int8, true),
        ] {
            let r = rel_diff(&run(emb, w4a8), &base);
            eprintln!(
                "{name} {emb:?} w4a8={w4a8}: relative logit change {r:e} (NVFP4: {four_bit:e})"
            );
            assert!(
                r > 0.0 && r < 0.1 * four_bit,
                "{name} {emb:?} w4a8={w4a8}: {r}"
            );
        }
    }
    let refuse = |quant, w4a4| {
        let opts = LoadOptions {
            quant,
            w4a8: true,
            w4a4,
            ..Default::default()
        };
        format!(
            "{:#}",
            q4_llm::load(&fixture("tiny-llama"), &opts).err().unwrap()
        )
    };
    let e = refuse(None, false);
    assert!(
        e.contains("--w4a8 needs 4-bit weights") && e.contains("dense"),
        "{e}"
    );
}

#[test]
fn w4a4_uses_the_checkpoints_input_scales() {
    let g = golden("tiny-llama-nvfp4");
    let ids = &g["input_ids"];
    let run = |w4a4: bool| {
        let opts = LoadOptions {
            w4a4,
            ..Default::default()
        };
        logits(
            &q4_llm::load(&fixture("tiny-llama-nvfp4"), &opts).unwrap().0,
            ids,
        )
    };
    let (weight_only, w4a4) = (run(false), run(true));
    let rel = |a: &Tensor, b: &Tensor| -> f32 {
        let d = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let n = b
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (d / n).sqrt()
    };
    // Quantizing activations too moves the logits by the NVFP4 activation error. On this
    // random-weight model 4-bit *weights* alone move them by 32% (relative L2 of the NVFP4
    // golden vs the dense one), so 4-bit activations may add about as much, not more.
    let r = rel(&w4a4, &weight_only);
    assert!(r > 1e-3 && r < 0.4, "W4A4 vs weight-only relative L2 {r}");
    let r = rel(&w4a4, &g["logits"]);
    assert!(r < 0.4, "W4A4 vs the weight-only golden: relative L2 {r}");
}

#[test]
fn quantized_checkpoint_refuses_other_formats_and_w4a4_needs_nvfp4() {
    let opts = LoadOptions {
        quant: Some(Format::Nf4),
        ..Default::default()
    };
    let e = q4_llm::load(&fixture("tiny-llama-nvfp4"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("stores nvfp4 weights") && e.contains("nf4"),
        "{e}"
    );
    let opts = LoadOptions {
        w4a4: true,
        ..Default::default()
    };
    let e = format!(
        "{:#}",
        q4_llm::load(&fixture("tiny-qwen3-nf4"), &opts)
            .err()
            .unwrap()
    );
    assert!(e.contains("--w4a4 needs NVFP4 weights"), "{e}");
    let e = format!(
        "{:#}",
        q4_llm::load(&fixture("tiny-llama"), &opts).err().unwrap()
    );
    assert!(e.contains("is dense"), "{e}");
}

#[test]
fn tiny_llama_quantized_at_load_matches_modelopt_nvfp4_export() {
    check_logits("tiny-llama", Some(Format::Nvfp4), "tiny-llama-nvfp4", 1e-4);
}

/// NF4 at load (bitsandbytes' defaults: block 64, no double quantization) is close to the
/// bitsandbytes checkpoint (which used double quantization) and far from the dense model.
#[test]
fn tiny_qwen3_quantized_nf4_is_close_to_bitsandbytes() {
    let err = check_logits("tiny-qwen3", Some(Format::Nf4), "tiny-qwen3-nf4", 0.05);
    let dense_vs_nf4 = max_abs_diff(
        &golden("tiny-qwen3")["logits"],
        &golden("tiny-qwen3-nf4")["logits"],
    );
    assert!(err < dense_vs_nf4 / 20.0, "{err} vs {dense_vs_nf4}");
}

#[test]
fn every_format_changes_the_logits_a_little() {
    let g = golden("tiny-llama");
    let ids = &g["input_ids"];
    for f in [Format::Nvfp4, Format::Nf4, Format::Mxfp4] {
        let err = max_abs_diff(&logits(&load("tiny-llama", Some(f)), ids), &g["logits"]);
        assert!(err > 1e-3 && err < 5.0, "{f}: {err}");
    }
}

/// Prefill of a prompt split in two plus cached decode gives the same logits as one pass.
#[test]
fn incremental_forward_matches_full_forward() {
    let model = load("tiny-qwen3", None);
    let g = golden("tiny-qwen3");
    let ids = g["input_ids"].get(0).unwrap().unsqueeze(0).unwrap();
    let mut cache = model.new_cache(4); // small on purpose: the cache must grow
    let a = model
        .forward(&ids.narrow(1, 0, 5).unwrap(), &mut cache)
        .unwrap();
    let b = model
        .forward(&ids.narrow(1, 5, 6).unwrap(), &mut cache)
        .unwrap();
    let c = model
        .forward(&ids.narrow(1, 11, 1).unwrap(), &mut cache)
        .unwrap();
    let inc = Tensor::cat(&[a, b, c], 1).unwrap();
    let want = g["logits"].get(0).unwrap().unsqueeze(0).unwrap();
    assert!(max_abs_diff(&inc, &want) < 1e-4);
}
