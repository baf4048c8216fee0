//! `q4 bench`: measurements behind every speed claim in BENCHMARKS.md. Each run measures the
//! peers and the machine's memory bandwidth in the same process, checks that the machine stays
//! idle during each measurement and repeats disturbed ones.

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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Linear(a) => linear::run(a),
    }
}
