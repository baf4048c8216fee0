//! `q4 logits`.

/// Arguments of `q4 logits`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 logits` is not implemented yet")
}
