//! `q4 bench decode-runner`: decode tokens/s of the runner itself (`q4_llm::Model`, the step
//! `q4 generate` takes for each token, with greedy sampling on the host) on random weights of a
//! model's shape: Qwen3-4B by default, or any HF `config.json`. bf16 layers against the 4-bit
//! formats, bf16 embeddings and output layer in every case, one device.
//!
//! Unlike `decode-synthetic` (its own step kernels, a 4-bit LM head, argmax on the device),
//! this times the product's code path: `Model::decode_step` (on CUDA the captured graph of
//! `q4_llm::model::cuda_step`), the copy of the logits to the host and the sampler.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use q4::Format;
use q4_llm::weights::SyntheticSource;
use q4_llm::{EmbeddingStorage, LoadOptions, Model, ModelConfig, Sampler, SamplingParams};

/// Arguments of `q4 bench decode-runner`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An HF config.json whose shape to build [default: Qwen3-4B's].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Decoder layers (overrides the config's).
    #[arg(long)]
    layers: Option<usize>,
    /// Weight formats of the decoder's linear layers: bf16 and/or 4-bit formats.
    #[arg(long, value_delimiter = ',', default_value = "bf16,nvfp4,nf4")]
    formats: Vec<String>,
    /// Timed decode steps (tokens) per run.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Prompt length (random ids, one prefill).
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Runs per format; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// cpu or cuda.
    #[arg(long, default_value = "cuda")]
    device: String,
}

/// Qwen3-4B's config.json (the shape only; weights are random).
const QWEN3_4B: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
  "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
  "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000, "tie_word_embeddings": true, "attention_bias": false
}"#;

pub fn run(args: Args) -> Result<()> {
    if args.tokens == 0 || args.runs == 0 || args.prompt_tokens == 0 {
        bail!("--tokens, --prompt-tokens and --runs must be at least 1");
    }
    let json: serde_json::Value = match &args.config {
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", p.display()))?,
        None => serde_json::from_str(QWEN3_4B).expect("valid built-in config"),
    };
    let formats = args
        .formats
        .iter()
        .map(|f| match f.as_str() {
            "bf16" => Ok((f, None)),
            _ => Ok((
                f,
                Some(Format::parse(f).with_context(|| format!("unknown format {f}"))?),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cfg = ModelConfig::from_hf_json(&json)?;
    if let Some(n) = args.layers {
        cfg.num_layers = n;
    }
    let needed = args.prompt_tokens + args.tokens + 2;
    if needed > cfg.max_position_embeddings {
        bail!(
            "{needed} positions exceed the model's context length {}",
            cfg.max_position_embeddings
        );
    }
    let device = q4_llm::device::device_from_name(&args.device)?;
    let card = if device.is_cuda() {
        q4::probe::probe()
            .cuda
            .devices
            .first()
            .map_or_else(|| "CUDA device".into(), |d| d.name.clone())
    } else {
        "CPU".to_string()
    };
    println!(
        "# q4 bench decode-runner on {card}: {:?} shape ({} layers, hidden {}, intermediate {}, {}/{} heads x {}, vocab {}), random weights, bf16 embeddings and output layer, batch 1, prompt {} tokens, {} timed tokens, median of {} runs",
        cfg.arch,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.vocab_size,
        args.prompt_tokens,
        args.tokens,
        args.runs
    );
    println!(
        "{:<7} {:>10} {:>9} {:>10}  runs (tok/s)",
        "format", "ms/token", "tok/s", "vs_bf16"
    );
    let mut bf16_ms = None;
    for (name, quant) in formats {
        let t = Instant::now();
        let src = SyntheticSource::new(cfg.clone(), device.clone(), DType::BF16)?;
        let opts = LoadOptions {
            quant,
            embeddings: Some(EmbeddingStorage::Bf16),
            device: device.clone(),
            ..Default::default()
        };
        let model = Model::load(&src, &opts)?;
        tracing::info!("{name}: built in {:.1} s", t.elapsed().as_secs_f64());
        let mut rates = Vec::with_capacity(args.runs);
        for run in 0..args.runs {
            rates.push(decode_rate(&model, &args, run as u64)?);
        }
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let rate = sorted[sorted.len() / 2];
        let ms = 1e3 / rate;
        let base = *bf16_ms.get_or_insert(if quant.is_none() { ms } else { f64::NAN });
        let runs: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
        let ratio = if base.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2}", base / ms)
        };
        println!(
            "{:<7} {:>10.3} {:>9.1} {:>10}  {}",
            name,
            ms,
            rate,
            ratio,
            runs.join(" ")
        );
    }
    Ok(())
}

/// Tokens per second of `args.tokens` greedy decode steps after a random prompt, the first two
/// steps (which capture the CUDA graph) untimed.
fn decode_rate(model: &Model, args: &Args, seed: u64) -> Result<f64> {
    let vocab = model.config().vocab_size as u64;
    // Distinct prompts per run (a small LCG; the values only need to be valid ids).
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((x >> 33) % vocab) as u32
        })
        .collect();
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..Default::default()
    })?;
    let mut cache = model.new_cache(args.prompt_tokens + args.tokens + 2);
    let ids = Tensor::new(prompt.as_slice(), model.device())?.unsqueeze(0)?;
    let mut logits = model.forward_last(&ids, &mut cache)?.squeeze(0)?;
    let mut history = prompt;
    let mut start = Instant::now();
    for i in 0..args.tokens + 2 {
        if i == 2 {
            start = Instant::now();
        }
        let next = sampler.sample(&logits, &history)?;
        history.push(next);
        logits = model.decode_step(next, &mut cache)?;
    }
    // The last step's logits reach the host, as the next token's sampling would need them.
    sampler.sample(&logits, &history)?;
    Ok(args.tokens as f64 / start.elapsed().as_secs_f64())
}
