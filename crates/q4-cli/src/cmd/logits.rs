//! `q4 logits`: `input_ids` (I64 `[B, T]`) in, `logits` (F32 `[B, T, V]`) out, one causal
//! forward per call (positions `0..T`, no padding).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::generate::ModelArgs;

/// Arguments of `q4 logits`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// safetensors file with `input_ids` (I64 [batch, seq]).
    #[arg(long)]
    pub input_ids: PathBuf,
    /// Output safetensors file; gets `logits` (F32 [batch, seq, vocab]).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let ids = read_input_ids(&args.input_ids)?;
    let (model, _) = args.model.load()?;
    let mut cache = model.new_cache(ids.dim(1)?);
    let logits = model
        .forward(&ids, &mut cache)
        .with_context(|| format!("cannot run the model on {}", args.input_ids.display()))?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    write_atomically(&args.out, logits)?;
    tracing::info!("wrote {}", args.out.display());
    Ok(())
}

fn read_input_ids(path: &Path) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let ids = tensors
        .get("input_ids")
        .with_context(|| format!("{} has no tensor `input_ids`", path.display()))?;
    if ids.dtype() != DType::I64 || ids.rank() != 2 {
        bail!(
            "`input_ids` in {} must be I64 [batch, seq], got {:?} {:?}",
            path.display(),
            ids.dtype(),
            ids.dims()
        );
    }
    if ids.dim(1)? == 0 {
        bail!("`input_ids` in {} is empty", path.display());
    }
    Ok(ids.clone())
}

/// Writes to a temporary file beside `out`, then renames it into place.
fn write_atomically(out: &Path, logits: Tensor) -> Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".q4-logits-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let map = HashMap::from([("logits".to_string(), logits)]);
    candle_core::safetensors::save(&map, tmp.path())
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}
