//! A quantized Hugging Face checkpoint (ModelOpt NVFP4, compressed-tensors NVFP4, bitsandbytes
//! NF4/FP4, MXFP4), read through `q4::checkpoint`: linear layers wrap the stored 4-bit tensors
//! (memory-mapped, no copy on the CPU); everything else is dense.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use q4::checkpoint::{Checkpoint, Entry};
use q4::{ActQuant, Format, QLinear};

use super::{dense_linears, tensor_with_shape, LinearSpec, WeightSource};
use crate::config::ModelConfig;
use crate::tokenizer::Tokenizer;

/// An HF directory whose linear weights are stored quantized.
pub struct QuantizedDirSource {
    dir: PathBuf,
    ckpt: Checkpoint,
    /// Use each layer's calibrated `input_scale` (NVFP4 W4A4 emulation); weight-only otherwise.
    w4a4: bool,
}

impl QuantizedDirSource {
    pub fn open(dir: &Path, w4a4: bool) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)
            .with_context(|| format!("cannot open quantized checkpoint {}", dir.display()))?;
        Ok(QuantizedDirSource {
            dir: dir.to_path_buf(),
            ckpt,
            w4a4,
        })
    }

    /// The 4-bit format of the stored linear layers (the first quantized entry's).
    pub fn format(&self) -> Option<Format> {
        self.ckpt.entries().iter().find_map(|e| match e {
            Entry::Quant(q) => Some(q.format),
            Entry::Dense(_) => None,
        })
    }
}

impl WeightSource for QuantizedDirSource {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_hf_file(&self.dir.join("config.json"))
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_hf_dir(&self.dir)
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.get(name).is_some()
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        match self.ckpt.get(name) {
            Some(Entry::Dense(d)) => Ok(Tensor::from_vec(
                d.to_f32()?,
                d.shape.as_slice(),
                &Device::Cpu,
            )?),
            // A quantized tensor asked for densely (e.g. tied embeddings): its exact decode.
            Some(Entry::Quant(q)) => Ok(Tensor::from_vec(
                q.dequantize::<f32>(),
                q.shape.as_slice(),
                &Device::Cpu,
            )?),
            None => bail!("tensor `{name}` not found in {}", self.dir.display()),
        }
    }

    fn linears(
        &self,
        group: &[LinearSpec],
        quant: Option<Format>,
        device: &Device,
    ) -> Result<Vec<QLinear>> {
        let name = |s: &LinearSpec| format!("{}.weight", s.name);
        let stored: Vec<_> = group.iter().map(|s| self.ckpt.get(&name(s))).collect();
        if stored.iter().all(|e| !matches!(e, Some(Entry::Quant(_)))) {
            // Layers the producer left dense (e.g. lm_head): quantize only if asked.
            return dense_linears(self, group, quant, device);
        }
        group
            .iter()
            .zip(stored)
            .map(|(spec, entry)| {
                let q = match entry {
                    Some(Entry::Quant(q)) => q,
                    Some(Entry::Dense(_)) => bail!(
                        "`{}` in {} is dense while the rest of its fused group is quantized",
                        name(spec),
                        self.dir.display()
                    ),
                    None => bail!("tensor `{}` not found in {}", name(spec), self.dir.display()),
                };
                if let Some(f) = quant.filter(|&f| f != q.format) {
                    bail!(
                        "{} stores {} weights; re-quantizing them to {f} would stack two lossy steps \
                         (run `q4 dequantize` first, or drop --quant)",
                        self.dir.display(),
                        q.format
                    );
                }
                let bias = if spec.bias {
                    Some(tensor_with_shape(self, &format!("{}.bias", spec.name), &[spec.out_features])?.to_device(device)?)
                } else {
                    None
                };
                let layer = QLinear::new(q.to_qtensor(device)?, bias)
                    .with_context(|| format!("cannot build linear layer `{}` from {}", spec.name, q.at()))?;
                if !self.w4a4 {
                    return Ok(layer);
                }
                if q.format != Format::Nvfp4 {
                    bail!("--w4a4 needs NVFP4 weights; {} stores {}", self.dir.display(), q.format);
                }
                let act = match q.input_scale {
                    Some(input_scale) => ActQuant::Nvfp4Static { input_scale },
                    None => ActQuant::Nvfp4Dynamic,
                };
                Ok(layer.with_act_quant(act)?)
            })
            .collect()
    }
}
