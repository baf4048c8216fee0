//! `q4 dequantize`.

/// Arguments of `q4 dequantize`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 dequantize` is not implemented yet")
}
