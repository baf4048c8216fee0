//! `q4 bench`: measurements behind every speed claim in BENCHMARKS.md. Each run measures the
//! peers and the machine's memory bandwidth in the same process, checks that the machine stays
//! idle during each measurement and repeats disturbed ones.

mod decode_runner;
mod decode_synthetic;
#[cfg(feature = "cuda")]
mod gpu;
mod gpu_linear;
mod linear;
pub mod measure;

use clap::Subcommand;

/// Arguments of `q4 bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// QLinear (NVFP4, NF4) vs candle f32 matmul and candle's GGUF Q4_0 / Q4K QMatMul.
    Linear(linear::Args),
    /// CUDA: q4's 4-bit matmul vs cuBLAS bf16 (GEMV batches and a prefill GEMM), with the device
    /// copy bandwidth of the same run.
    GpuLinear(gpu_linear::Args),
    /// CUDA: decode tokens/s of a Qwen3-4B-shaped random-weight stack, bf16 vs 4-bit.
    DecodeSynthetic(decode_synthetic::Args),
    /// Decode tokens/s of the runner itself (what `q4 generate` runs per token) on random
    /// weights of Qwen3-4B's shape (or any config.json), bf16 vs 4-bit.
    DecodeRunner(decode_runner::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Linear(a) => linear::run(a),
        What::GpuLinear(a) => gpu_linear::run(a),
        What::DecodeSynthetic(a) => decode_synthetic::run(a),
        What::DecodeRunner(a) => decode_runner::run(a),
    }
}
