//! `q4 inspect`.

/// Arguments of `q4 inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 inspect` is not implemented yet")
}
