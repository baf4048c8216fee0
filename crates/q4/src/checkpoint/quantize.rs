//! Quantizing dense tensors read from a checkpoint, and whole safetensors files.

use std::path::Path;

use q4_formats::bnb::{self, BnbKind, BnbOptions, NestedRounding};
use q4_formats::mxfp4::{self, Mxfp4Options};
use q4_formats::nvfp4::{self, Nvfp4Options};
use q4_formats::{Element, Format};
use serde_json::{json, Map, Value};

use super::dense::{torch_dtype_name, DenseView, FloatSlice};
use super::writer::{write_safetensors, OutTensor};
use super::{Checkpoint, Entry, NoProgress, Progress};
use crate::error::{Context, Error, Result};
use crate::qtensor::{QuantSpec, Quantized};

/// Quantizes one dense tensor (F32, BF16, F16; F64 is narrowed to F32 first). Errors name the
/// file and tensor (e.g. the index of a NaN, or a row length that is not a whole number of
/// blocks).
pub fn quantize_dense(d: &DenseView, spec: &QuantSpec) -> Result<Quantized> {
    if !d.is_quantizable() {
        return Err(Error::msg(format!(
            "{}: dtype {} cannot be quantized (expected F32, BF16, F16 or F64)",
            d.at(),
            d.dtype
        )));
    }
    let Some(&cols) = d.shape.last() else {
        return Err(Error::msg(format!(
            "{}: a scalar cannot be quantized",
            d.at()
        )));
    };
    if cols == 0 || d.numel() == 0 {
        return Err(Error::msg(format!(
            "{}: an empty tensor {:?} cannot be quantized",
            d.at(),
            d.shape
        )));
    }
    let q = match d.float_slice()? {
        FloatSlice::F32(v) => quantize_values(&v, cols, spec),
        FloatSlice::BF16(v) => quantize_values(&v, cols, spec),
        FloatSlice::F16(v) => quantize_values(&v, cols, spec),
    };
    q.with_context(|| d.at())
}

fn quantize_values<T: Element>(v: &[T], cols: usize, spec: &QuantSpec) -> Result<Quantized> {
    let fixed = |block: usize| -> Result<()> {
        if spec.block_size != block {
            return Err(Error::msg(format!(
                "{} uses blocks of {block}; block size {} is not supported",
                spec.format, spec.block_size
            )));
        }
        Ok(())
    };
    Ok(match spec.format {
        Format::Nvfp4 => {
            fixed(nvfp4::BLOCK)?;
            let opts = Nvfp4Options {
                scale2: spec.scale2,
                pad: spec.pad,
                non_finite: spec.non_finite,
            };
            Quantized::Nvfp4(nvfp4::quantize(v, cols, &opts)?)
        }
        Format::Mxfp4 => {
            fixed(mxfp4::BLOCK)?;
            let opts = Mxfp4Options {
                rule: spec.mx_rule,
                pad: spec.pad,
                non_finite: spec.non_finite,
            };
            Quantized::Mxfp4(mxfp4::quantize(v, cols, &opts)?)
        }
        Format::Nf4 | Format::Fp4 => {
            let opts = BnbOptions {
                kind: if spec.format == Format::Nf4 {
                    BnbKind::Nf4
                } else {
                    BnbKind::Fp4
                },
                block_size: spec.block_size,
                double_quant: spec.double_quant,
                nested_rounding: NestedRounding::Exact,
                non_finite: spec.non_finite,
            };
            Quantized::Bnb(bnb::quantize(v, &opts)?)
        }
    })
}

/// `max |x|` of a dense tensor (for tensor scales shared by a fused group).
pub(super) fn nvfp4_amax(d: &DenseView, spec: &QuantSpec) -> Result<f32> {
    let m = match d.float_slice()? {
        FloatSlice::F32(v) => nvfp4::amax(&v, spec.non_finite),
        FloatSlice::BF16(v) => nvfp4::amax(&v, spec.non_finite),
        FloatSlice::F16(v) => nvfp4::amax(&v, spec.non_finite),
    };
    m.with_context(|| d.at())
}

/// The output tensor for a quantized dense tensor.
pub(super) fn quantized_out(d: &DenseView, spec: &QuantSpec) -> Result<OutTensor> {
    Ok(OutTensor::Quantized {
        q: quantize_dense(d, spec)?,
        shape: d.shape.clone(),
        source_dtype: torch_dtype_name(d.dtype).to_string(),
    })
}

/// What `q4` records under `__metadata__["q4"]`.
pub(super) fn q4_metadata(spec: &QuantSpec) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    m.insert("format".into(), json!(spec.format.name()));
    m.insert("block_size".into(), json!(spec.block_size));
    match spec.format {
        Format::Nf4 | Format::Fp4 => {
            m.insert("double_quant".into(), json!(spec.double_quant));
        }
        Format::Mxfp4 => {
            m.insert("mx_scale".into(), json!(spec.mx_rule.name()));
        }
        Format::Nvfp4 => {}
    }
    m
}

/// What `quantize_file` did.
#[derive(Clone, Debug, Default)]
pub struct QuantizeSummary {
    pub quantized: Vec<String>,
    pub copied: Vec<String>,
}

/// Quantizes a plain safetensors checkpoint into `out`: every floating tensor of rank >= 2 (or
/// exactly the tensors named in `only`) is quantized under the format's naming, everything
/// else is copied unchanged. Nothing is written unless every tensor succeeds.
pub fn quantize_file(
    ckpt: &Checkpoint,
    spec: &QuantSpec,
    only: Option<&[String]>,
    out: &Path,
    progress: &dyn Progress,
) -> Result<QuantizeSummary> {
    if let Some(names) = only {
        for n in names {
            if ckpt.get(n).is_none() {
                return Err(Error::msg(format!(
                    "{}: no tensor named `{n}`",
                    ckpt.path().display()
                )));
            }
        }
    }
    let mut summary = QuantizeSummary::default();
    let mut outputs = Vec::new();
    progress.start(ckpt.entries().len() as u64);
    for e in ckpt.entries() {
        let d = match e {
            Entry::Dense(d) => d,
            Entry::Quant(q) => {
                return Err(Error::msg(format!(
                    "{}: already quantized ({} {}); dequantize it first",
                    q.at(),
                    q.layout,
                    q.format
                )))
            }
        };
        let selected = match only {
            Some(names) => names.iter().any(|n| n == &d.name),
            None => d.shape.len() >= 2 && d.is_floating(),
        };
        let out_t = if selected {
            tracing::info!("quantizing {} {:?} {}", d.name, d.shape, d.dtype);
            summary.quantized.push(d.name.clone());
            quantized_out(d, spec)?
        } else {
            summary.copied.push(d.name.clone());
            OutTensor::Dense(d.clone())
        };
        outputs.push((d.name.clone(), out_t));
        progress.advance(&d.name, 1);
    }
    write_safetensors(out, outputs, q4_metadata(spec), &NoProgress)?;
    Ok(summary)
}
