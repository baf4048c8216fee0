//! `q4 doctor [--json]`: what this machine offers and which kernel each format will use.
//! Never fails for lack of a GPU: a CPU-only machine gets a CPU-only report.

/// Arguments of `q4 doctor`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = q4::probe::probe();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", q4::probe::render_text(&report));
    }
    Ok(())
}
