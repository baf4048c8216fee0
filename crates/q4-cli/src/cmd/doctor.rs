//! `q4 doctor`.

/// Arguments of `q4 doctor`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`q4 doctor` is not implemented yet")
}
