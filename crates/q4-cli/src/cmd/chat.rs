//! `q4 chat`.

/// Arguments of `q4 chat`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 chat` is not implemented yet")
}
