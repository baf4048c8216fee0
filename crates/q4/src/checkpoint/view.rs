//! A quantized logical tensor found in a checkpoint: codes and scales as views into the mapped
//! file, ready to become a [`QTensor`], an owned q4-formats struct or dense values.

use std::sync::Arc;

use candle_core::{Device, Shape};
use q4_formats::bnb::{Absmax, BnbKind, BnbTensor, NestedAbsmax};
use q4_formats::mxfp4::Mxfp4Tensor;
use q4_formats::nvfp4::Nvfp4Tensor;
use q4_formats::{Element, Format};
use safetensors::Dtype;

use crate::error::{Context, Result};
use crate::host_bytes::HostBytes;
use crate::qtensor::{BlockScales, Buffer, HostScales, HostView, QTensor, Quantized};

/// How a checkpoint lays a quantized tensor out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// NVFP4 as ModelOpt exports it (`K`, `K_scale` E4M3, `K_scale_2` F32); also q4's own
    /// NVFP4 naming.
    ModelOpt,
    /// NVFP4 as compressed-tensors / llm-compressor stores it (`weight_packed`,
    /// `weight_scale`, reciprocal `weight_global_scale`).
    CompressedTensors,
    /// bitsandbytes `Linear4bit` (NF4 or FP4, nested or not) with its packed quant-state JSON.
    Bitsandbytes,
    /// MXFP4 as gpt-oss / transformers store it (`*_blocks`, `*_scales`); also q4's own MXFP4
    /// naming.
    GptOss,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::ModelOpt => "modelopt",
            Layout::CompressedTensors => "compressed-tensors",
            Layout::Bitsandbytes => "bitsandbytes",
            Layout::GptOss => "gpt-oss",
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One stored tensor that is part of a logical quantized tensor.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub nbytes: usize,
}

/// Double-quantization statistics of a bitsandbytes tensor (the U8 codes are the `absmax`
/// member).
#[derive(Clone, Debug)]
pub struct NestedStats {
    pub nested_absmax: Vec<f32>,
    pub code_map: Vec<f32>,
    pub offset: f32,
    pub block_size: usize,
}

/// Block scales of a quantized view.
#[derive(Clone, Debug)]
pub enum ScaleData {
    /// One byte per block decoded through `table` (NVFP4: E4M3 x tensor scale; MXFP4: E8M0).
    Bytes {
        bytes: HostBytes,
        table: Arc<[f32; 256]>,
    },
    /// bitsandbytes: the stored absmax tensor (F32 values, or U8 codes when nested) and the f32
    /// absmax per block reconstructed from it.
    Absmax {
        stored: HostBytes,
        decoded: Arc<Vec<f32>>,
        nested: Option<Arc<NestedStats>>,
    },
}

/// A quantized logical tensor.
#[derive(Clone, Debug)]
pub struct QuantView {
    /// Logical name: what the dense tensor was called (`P.weight`, or `X` for `X_blocks`).
    pub name: String,
    pub file: Arc<str>,
    pub layout: Layout,
    pub format: Format,
    /// Logical (dense) shape.
    pub shape: Vec<usize>,
    pub block_size: usize,
    /// Packed 4-bit codes as stored.
    pub codes: HostBytes,
    pub scales: ScaleData,
    /// NVFP4 tensor scale (`weight_scale_2`, or `1 / weight_global_scale`).
    pub tensor_scale: Option<f32>,
    /// NVFP4 activation scale (`input_scale`, or `1 / input_global_scale`), if stored.
    pub input_scale: Option<f32>,
    /// bitsandbytes: the dtype named in the quant-state JSON (`float32`, `bfloat16`, ...).
    pub source_dtype: Option<String>,
    /// The stored tensors this view was assembled from.
    pub members: Vec<Member>,
}

impl QuantView {
    /// Context string for errors about this tensor.
    pub fn at(&self) -> String {
        format!("{}: tensor `{}`", self.file, self.name)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored bytes over all members.
    pub fn nbytes(&self) -> usize {
        self.members.iter().map(|m| m.nbytes).sum()
    }

    /// Stored bits per logical weight.
    pub fn bits_per_weight(&self) -> f64 {
        self.nbytes() as f64 * 8.0 / self.numel().max(1) as f64
    }

    fn rows_cols(&self) -> (usize, usize) {
        let cols = *self.shape.last().unwrap_or(&1);
        (self.numel() / cols.max(1), cols)
    }

    fn kind(&self) -> BnbKind {
        if self.format == Format::Fp4 {
            BnbKind::Fp4
        } else {
            BnbKind::Nf4
        }
    }

    /// A `QTensor` on `device`. On the CPU, NVFP4 and MXFP4 codes and scales stay views of the
    /// mapped file (no copy); bitsandbytes goes through [`QTensor::from_bnb`] so that its nested
    /// statistics are kept.
    pub fn to_qtensor(&self, device: &Device) -> Result<QTensor> {
        let shape = Shape::from(self.shape.clone());
        let q = match &self.scales {
            ScaleData::Bytes { bytes, table } => QTensor::from_host_parts(
                self.format,
                self.block_size,
                shape,
                self.codes.clone(),
                BlockScales::Table {
                    bytes: Buffer::Host(bytes.clone()),
                    table: table.clone(),
                },
                self.tensor_scale.unwrap_or(1.0),
                device,
            ),
            ScaleData::Absmax { .. } => {
                let Quantized::Bnb(t) = self.to_formats()? else {
                    unreachable!("absmax scales belong to bitsandbytes")
                };
                QTensor::from_bnb(t, shape, device)
            }
        };
        q.with_context(|| self.at())
    }

    /// The owned q4-formats representation (copies codes and scales).
    pub fn to_formats(&self) -> Result<Quantized> {
        let (rows, cols) = self.rows_cols();
        let packed = self.codes.to_vec();
        Ok(match (&self.scales, self.format) {
            (ScaleData::Bytes { bytes, .. }, Format::Nvfp4) => Quantized::Nvfp4(Nvfp4Tensor {
                rows,
                cols,
                packed,
                scales: bytes.to_vec(),
                scale2: self.tensor_scale.unwrap_or(1.0),
            }),
            (ScaleData::Bytes { bytes, .. }, _) => Quantized::Mxfp4(Mxfp4Tensor {
                rows,
                cols,
                packed,
                scales: bytes.to_vec(),
            }),
            (
                ScaleData::Absmax {
                    stored,
                    decoded,
                    nested,
                },
                _,
            ) => Quantized::Bnb(BnbTensor {
                kind: self.kind(),
                block_size: self.block_size,
                numel: self.numel(),
                packed,
                absmax: match nested {
                    None => Absmax::Plain(decoded.to_vec()),
                    Some(n) => Absmax::Nested(NestedAbsmax {
                        codes: stored.to_vec(),
                        nested_absmax: n.nested_absmax.clone(),
                        offset: n.offset,
                        code_map: n.code_map.clone(),
                        block_size: n.block_size,
                    }),
                },
            }),
        })
    }

    /// Host view for the CPU decode kernel, straight over the stored bytes.
    fn host_view(&self) -> HostView<'_> {
        let (rows, cols) = self.rows_cols();
        HostView {
            format: self.format,
            block_size: self.block_size,
            rows,
            cols,
            codes: &self.codes,
            scales: match &self.scales {
                ScaleData::Bytes { bytes, table } => HostScales::Table { bytes, table },
                ScaleData::Absmax { decoded, .. } => HostScales::F32(decoded),
            },
            scale2: self.tensor_scale.unwrap_or(1.0),
            // Not checked here; this view only feeds the dequantizer, which reads the table.
            exact_scales: None,
            int8_codebook: false,
        }
    }

    /// Dense values (f32, or bf16 rounded to nearest even), bit-exact with q4-formats'
    /// dequantizers and thereby with the reference packages. Never fails: lengths were
    /// validated when the checkpoint was opened.
    pub fn dequantize<O: Element>(&self) -> Vec<O> {
        let mut out = vec![O::from_f32(0.0); self.numel()];
        crate::kernels::cpu::dequantize_into(&self.host_view(), &mut out);
        out
    }
}
