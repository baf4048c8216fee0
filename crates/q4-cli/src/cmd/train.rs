//! `q4 train`.

/// Arguments of `q4 train`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 train` (QAT / QLoRA) is not implemented yet")
}
