//! `q4 chat`: interactive multi-turn chat. Reads one user message per line from stdin,
//! streams each reply to stdout, keeps the conversation (and its KV cache) between turns,
//! and ends on EOF or `/exit`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Result;
use q4_llm::{ChatSession, GenerateOptions, StopReason};

use super::generate::{log_speed, print_tokens, ModelArgs, SamplingArgs};

/// Arguments of `q4 chat`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let params = args.sampling.params()?;
    let (model, tok) = args.model.load()?;
    let mut session = ChatSession::new(&model, &tok, args.system.as_deref())?;
    let opts = GenerateOptions {
        max_new_tokens: args.sampling.max_tokens,
        sampling: params,
        stop_tokens: tok.stop_ids(true),
    };
    let stdout = std::io::stdout();
    let stdin = std::io::stdin();
    // A prompt marker for people; none when stdin is a pipe.
    let marker = || -> Result<()> {
        if stdin.is_terminal() {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        Ok(())
    };
    marker()?;
    for line in stdin.lock().lines() {
        let line = line?;
        let text = line.trim();
        if text == "/exit" {
            break;
        }
        if text.is_empty() {
            marker()?;
            continue;
        }
        let out = session.turn(&model, &tok, text, &opts, print_tokens(&tok))?;
        writeln!(stdout.lock())?;
        log_speed(&out);
        if out.stop == StopReason::MaxTokens {
            tracing::warn!("reply cut at --max-tokens {}", opts.max_new_tokens);
        }
        marker()?;
    }
    Ok(())
}
