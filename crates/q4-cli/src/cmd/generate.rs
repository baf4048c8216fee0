//! `q4 generate`.

/// Arguments of `q4 generate`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 generate` is not implemented yet")
}
