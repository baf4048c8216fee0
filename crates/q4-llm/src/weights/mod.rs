//! Where a model's tensors, config and tokenizer come from.
//!
//! The model asks for tensors by their Hugging Face names (`model.layers.0.self_attn.q_proj`)
//! and for linear layers in fused groups (q/k/v, gate/up); each [`WeightSource`] maps that to
//! its own storage. Dense sources hand out f32 tensors and let [`dense_linears`] quantize at
//! load time; a quantized checkpoint overrides [`WeightSource::linears`] to wrap its stored
//! 4-bit tensors instead.

mod hf_dir;
mod quantized_dir;
mod synthetic;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use q4::{Format, QLinear, QuantSpec};

pub use hf_dir::HfDirSource;
pub use quantized_dir::QuantizedDirSource;
pub use synthetic::SyntheticSource;

use crate::config::ModelConfig;
use crate::gguf::GgufSource;
use crate::tokenizer::Tokenizer;

/// One linear layer the model wants: `{name}.weight` is `[out_features, in_features]`,
/// `{name}.bias` exists when `bias` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: bool,
}

/// A model's files: config, tokenizer and tensors under HF names.
pub trait WeightSource {
    /// The file or directory, for messages.
    fn location(&self) -> &Path;

    /// Hyper-parameters.
    fn config(&self) -> Result<ModelConfig>;

    /// Tokenizer (with chat template and special ids).
    fn tokenizer(&self) -> Result<Tokenizer>;

    /// Whether a tensor with this HF name exists.
    fn contains(&self, name: &str) -> bool;

    /// A dense tensor as f32 on the CPU (embeddings, norms, unquantized weights).
    fn tensor(&self, name: &str) -> Result<Tensor>;

    /// [`Self::tensor`] converted to `dtype`. Sources that can convert piecewise override it, so
    /// that a large table (the token embeddings) never exists in f32 as a whole.
    fn tensor_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        Ok(self.tensor(name)?.to_dtype(dtype)?)
    }

    /// A 2-D tensor as an int8 table (embeddings / LM head), quantized from the exact stored
    /// values (never through a narrower type). Sources that can convert piecewise override it,
    /// so that the table never exists in f32 as a whole.
    fn int8_table(&self, name: &str) -> Result<q4::Int8Table> {
        Ok(q4::Int8Table::quantize(&self.tensor(name)?)?)
    }

    /// The layers of one fused group (q/k/v share an input, and so do gate/up), on `device`.
    ///
    /// `quant` is the format asked for on the command line (`None` = keep dense). The default
    /// loads dense weights and quantizes them; a quantized checkpoint returns its stored
    /// tensors (and should refuse a `quant` it cannot honour).
    fn linears(
        &self,
        group: &[LinearSpec],
        quant: Option<Format>,
        device: &Device,
    ) -> Result<Vec<QLinear>> {
        dense_linears(self, group, quant, device)
    }
}

/// Opens an HF model directory or a `.gguf` file.
///
/// A directory whose `config.json` has a `quantization_config` is a quantized checkpoint, read
/// by `q4::checkpoint`; `w4a4` then applies its calibrated activation scales (NVFP4 only).
pub fn open_weights(path: &Path, w4a4: bool) -> Result<Box<dyn WeightSource>> {
    if path.is_dir() {
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            bail!("model directory {} has no config.json", path.display());
        }
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        if json.get("quantization_config").is_some() {
            return Ok(Box::new(QuantizedDirSource::open(path, w4a4)?));
        }
        if w4a4 {
            bail!(
                "--w4a4 needs a quantized NVFP4 checkpoint; {} is dense",
                path.display()
            );
        }
        return Ok(Box::new(HfDirSource::open(path)?));
    }
    if path.is_file() {
        if is_gguf(path)? {
            if w4a4 {
                bail!(
                    "--w4a4 needs a quantized NVFP4 checkpoint; {} is a GGUF file",
                    path.display()
                );
            }
            return Ok(Box::new(GgufSource::open(path)?));
        }
        bail!(
            "{} is neither a model directory nor a GGUF file",
            path.display()
        );
    }
    bail!("model path {} does not exist", path.display())
}

fn is_gguf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

/// `src.tensor(name)` with its shape checked against `dims`.
pub fn tensor_with_shape<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    dims: &[usize],
) -> Result<Tensor> {
    tensor_as_with_shape(src, name, DType::F32, dims)
}

/// [`WeightSource::int8_table`] with its shape checked.
pub fn int8_table_with_shape<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    dims: [usize; 2],
) -> Result<q4::Int8Table> {
    let t = src
        .int8_table(name)
        .with_context(|| format!("cannot store `{name}` as int8"))?;
    if [t.rows(), t.cols()] != dims {
        bail!(
            "tensor `{name}` in {} has shape {:?}, expected {dims:?}",
            src.location().display(),
            [t.rows(), t.cols()]
        );
    }
    Ok(t)
}

/// [`WeightSource::tensor_as`] with its shape checked.
pub fn tensor_as_with_shape<S: WeightSource + ?Sized>(
    src: &S,
    name: &str,
    dtype: DType,
    dims: &[usize],
) -> Result<Tensor> {
    let t = src.tensor_as(name, dtype)?;
    if t.dims() != dims {
        bail!(
            "tensor `{name}` in {} has shape {:?}, expected {dims:?}",
            src.location().display(),
            t.dims()
        );
    }
    Ok(t)
}

/// `src.linears(..)` with every returned layer's shape checked against its spec (a quantized
/// source builds its layers itself, so the model re-checks them here).
pub fn checked_linears<S: WeightSource + ?Sized>(
    src: &S,
    group: &[LinearSpec],
    quant: Option<Format>,
    device: &Device,
) -> Result<Vec<QLinear>> {
    let layers = src.linears(group, quant, device)?;
    if layers.len() != group.len() {
        bail!(
            "{} returned {} layers for a group of {}",
            src.location().display(),
            layers.len(),
            group.len()
        );
    }
    for (l, spec) in layers.iter().zip(group) {
        let got = [l.out_features(), l.in_features()];
        if got != [spec.out_features, spec.in_features] {
            bail!(
                "linear layer `{}` in {} has shape {got:?}, expected [{}, {}]",
                spec.name,
                src.location().display(),
                spec.out_features,
                spec.in_features
            );
        }
    }
    Ok(layers)
}

/// The default [`WeightSource::linears`]: dense weights, quantized with `quant` if given.
///
/// For NVFP4 a fused group shares one tensor scale, `amax(group) / 2688` (ModelOpt's export
/// rule, FORMATS.md 3.2), so q/k/v (and gate/up) could later be fused into one matmul.
pub fn dense_linears<S: WeightSource + ?Sized>(
    src: &S,
    group: &[LinearSpec],
    quant: Option<Format>,
    device: &Device,
) -> Result<Vec<QLinear>> {
    let mut weights = Vec::with_capacity(group.len());
    for spec in group {
        let name = format!("{}.weight", spec.name);
        let w = tensor_with_shape(src, &name, &[spec.out_features, spec.in_features])?;
        weights.push(w.to_device(device)?);
    }
    let mut qspec = quant.map(QuantSpec::new);
    if let Some(s) = qspec.as_mut().filter(|s| s.format == Format::Nvfp4) {
        let mut amax = 0f32;
        for w in &weights {
            amax = amax.max(w.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        if amax > 0.0 && amax.is_finite() {
            s.scale2 = Some(amax / 2688.0);
        }
    }
    group
        .iter()
        .zip(weights)
        .map(|(spec, w)| {
            let bias = if spec.bias {
                let name = format!("{}.bias", spec.name);
                Some(tensor_with_shape(src, &name, &[spec.out_features])?.to_device(device)?)
            } else {
                None
            };
            QLinear::from_dense(&w, bias, qspec.as_ref())
                .with_context(|| format!("cannot build linear layer `{}`", spec.name))
        })
        .collect()
}

/// `dir/name`, if that file exists.
pub(crate) fn existing(dir: &Path, name: &str) -> Option<PathBuf> {
    let p = dir.join(name);
    p.is_file().then_some(p)
}
