//! `q4 quantize`.

/// Arguments of `q4 quantize`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 quantize` is not implemented yet")
}
