//! The `q4` command-line tool. Results go to stdout; logs, progress and errors to stderr.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "q4",
    version,
    about = "4-bit weights (NVFP4, NF4, MXFP4) for candle: quantize, inspect, run and benchmark"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug); Q4_LOG / RUST_LOG override it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize a safetensors file, an HF model directory or a GGUF file.
    Quantize(cmd::quantize::Args),
    /// Dequantize any supported 4-bit layout back to dense tensors.
    Dequantize(cmd::dequantize::Args),
    /// List tensors, layouts, formats, sizes and bits per weight.
    Inspect(cmd::inspect::Args),
    /// Generate text from a prompt.
    Generate(cmd::generate::Args),
    /// Interactive multi-turn chat.
    Chat(cmd::chat::Args),
    /// Compute logits for token ids.
    Logits(cmd::logits::Args),
    /// Perplexity of a text file.
    Ppl(cmd::ppl::Args),
    /// Train (QAT or QLoRA): not implemented yet, exits with an error.
    Train(cmd::train::Args),
    /// Benchmarks.
    Bench(cmd::bench::Args),
    /// What this machine can do and which kernel each format uses.
    Doctor(cmd::doctor::Args),
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = std::env::var("Q4_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .map(EnvFilter::new)
        .unwrap_or_else(|| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> std::process::ExitCode {
    q4_llm::pin_candle_thread_count();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Dequantize(a) => cmd::dequantize::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Logits(a) => cmd::logits::run(a),
        Command::Ppl(a) => cmd::ppl::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Doctor(a) => cmd::doctor::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain, outermost first.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {}", msg.replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}
