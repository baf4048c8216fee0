//! `q4 bench`.

/// Arguments of `q4 bench`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 bench` is not implemented yet")
}
