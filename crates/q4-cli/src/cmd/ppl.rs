//! `q4 ppl`.

/// Arguments of `q4 ppl`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 ppl` is not implemented yet")
}
