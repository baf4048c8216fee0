//! `q4 dequantize`: every supported 4-bit layout back to dense tensors under the original
//! names; other tensors are copied (floating ones converted to the requested dtype).

use std::path::PathBuf;

use anyhow::Result;
use q4::checkpoint::{write_safetensors, Checkpoint, Entry, OutDtype, OutTensor};
use serde_json::{json, Map};

use super::quantize::{one_line, print, Bar};

/// Arguments of `q4 dequantize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file or an HF model directory.
    pub input: PathBuf,
    /// Output `.safetensors` file.
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of the dense output.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
}

pub fn run(args: Args) -> Result<()> {
    let dtype = if args.dtype == "bf16" {
        OutDtype::BF16
    } else {
        OutDtype::F32
    };
    let ckpt = Checkpoint::open(&args.input).map_err(one_line)?;
    let mut n_quant = 0;
    let tensors: Vec<(String, OutTensor)> = ckpt
        .entries()
        .iter()
        .map(|e| {
            let t = match e {
                Entry::Quant(q) => {
                    n_quant += 1;
                    tracing::info!("dequantizing {} ({} {})", q.name, q.layout, q.format);
                    OutTensor::Dequantized(q.clone(), dtype)
                }
                Entry::Dense(d) => OutTensor::Convert(d.clone(), dtype),
            };
            (e.name().to_string(), t)
        })
        .collect();
    let n = tensors.len();
    let mut meta = Map::new();
    meta.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    meta.insert("dequantized".into(), json!(true));
    let bar = Bar::for_input(ckpt.file_bytes());
    write_safetensors(&args.out, tensors, meta, &bar).map_err(one_line)?;
    drop(bar);
    print(&format!(
        "dequantized {n_quant} tensors and copied {} into {} ({})\n",
        n - n_quant,
        args.out.display(),
        args.dtype
    ))
}
