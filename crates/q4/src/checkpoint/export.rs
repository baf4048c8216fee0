//! Quantizing a whole model into a Hugging Face directory in the ecosystem's layout: the
//! decoder layers' linear weights are quantized, everything else is copied, and `config.json`
//! (plus ModelOpt's `hf_quant_config.json` for NVFP4) says how. The directory is assembled in a
//! temporary directory next to the destination and renamed into place when complete.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use q4_formats::{nvfp4, Format};
use serde_json::{json, Value};

use super::config::{bnb_config, modelopt_configs, mxfp4_config, CONFIG, HF_QUANT_CONFIG};
use super::dense::{torch_dtype_name, DenseView};
use super::quantize::{nvfp4_amax, q4_metadata, quantized_out};
use super::writer::{parent_dir, temp_builder, write_atomically, write_safetensors, OutTensor};
use super::{Checkpoint, Entry, NoProgress, Progress, INDEX_FILE, MODEL_FILE};
use crate::error::{Error, Result};
use crate::qtensor::QuantSpec;

/// A dense model to quantize: its tensors grouped by output file, its config, and the other
/// files (tokenizer, generation config, ...) to copy along.
pub struct ModelSource {
    /// Where it came from, for messages.
    pub label: String,
    /// `config.json`.
    pub config: Value,
    /// Output file name -> tensors (one `model.safetensors`, or the shards of the input).
    pub shards: Vec<(String, Vec<DenseView>)>,
    /// Files copied unchanged into the output directory.
    pub extra_files: Vec<PathBuf>,
}

impl ModelSource {
    /// A model directory opened as a [`Checkpoint`]; its shards are kept.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let dir = ckpt.path();
        let label = dir.display().to_string();
        let config = ckpt
            .config()
            .cloned()
            .ok_or_else(|| Error::msg(format!("{label}: no {CONFIG} in this directory")))?;
        let mut by_file: BTreeMap<String, Vec<DenseView>> = BTreeMap::new();
        for e in ckpt.entries() {
            match e {
                Entry::Dense(d) => by_file
                    .entry(d.file.to_string())
                    .or_default()
                    .push(d.clone()),
                Entry::Quant(q) => {
                    return Err(Error::msg(format!(
                        "{}: already quantized ({} {}); dequantize the model first",
                        q.at(),
                        q.layout,
                        q.format
                    )))
                }
            }
        }
        let single = ckpt.files().len() == 1;
        let mut shards = Vec::new();
        for f in ckpt.files() {
            let name = if single {
                MODEL_FILE.to_string()
            } else {
                file_name(f)?
            };
            let tensors = by_file.remove(&f.display().to_string()).unwrap_or_default();
            shards.push((name, tensors));
        }
        let skip: BTreeSet<PathBuf> = ckpt.files().iter().cloned().collect();
        let mut extra_files = Vec::new();
        let listing = std::fs::read_dir(dir).map_err(|e| Error::msg(format!("{label}: {e}")))?;
        for item in listing {
            let path = item
                .map_err(|e| Error::msg(format!("{label}: {e}")))?
                .path();
            let name = file_name(&path)?;
            let rewritten = [CONFIG, HF_QUANT_CONFIG, INDEX_FILE].contains(&name.as_str());
            if path.is_file() && !skip.contains(&path) && !rewritten && !name.starts_with(".q4-") {
                extra_files.push(path);
            }
        }
        extra_files.sort();
        Ok(ModelSource {
            label,
            config,
            shards,
            extra_files,
        })
    }

    /// Tensors from elsewhere (e.g. a GGUF reader): written as one `model.safetensors`.
    pub fn from_tensors(
        label: impl Into<String>,
        tensors: Vec<(String, Tensor)>,
        config: Value,
        extra_files: Vec<PathBuf>,
    ) -> Result<Self> {
        let dense = tensors
            .iter()
            .map(|(n, t)| DenseView::from_tensor(n.clone(), t))
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelSource {
            label: label.into(),
            config,
            shards: vec![(MODEL_FILE.to_string(), dense)],
            extra_files,
        })
    }

    fn tensors(&self) -> impl Iterator<Item = &DenseView> {
        self.shards.iter().flat_map(|(_, t)| t)
    }
}

fn file_name(p: &Path) -> Result<String> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| Error::msg(format!("{}: not a usable file name", p.display())))
}

/// What `quantize_model` did.
#[derive(Clone, Debug, Default)]
pub struct ExportSummary {
    pub quantized: Vec<String>,
    pub copied: Vec<String>,
    /// Files written into the output directory.
    pub files: Vec<String>,
}

/// Whether `name` is a linear weight inside the decoder layers (`...layers.N...X.weight`, 2-D),
/// as opposed to embeddings, `lm_head`, norms, biases and MoE routers.
pub fn is_decoder_linear(name: &str, shape: &[usize]) -> bool {
    if shape.len() != 2 || !name.ends_with(".weight") {
        return false;
    }
    let segs: Vec<&str> = name.split('.').collect();
    let in_layers = segs.windows(2).any(|w| {
        matches!(w[0], "layers" | "layer" | "h" | "blocks") && w[1].parse::<usize>().is_ok()
    });
    let module = segs[segs.len() - 2];
    let excluded = ["embed", "lm_head", "norm", "router"]
        .iter()
        .any(|s| name.contains(s))
        || module == "gate";
    in_layers && !excluded
}

/// The fused group a projection belongs to (ModelOpt shares `weight_scale_2` within q/k/v and
/// within gate/up of one layer).
fn fused_group(name: &str) -> Option<String> {
    let (module, proj) = name.strip_suffix(".weight")?.rsplit_once('.')?;
    let group = match proj {
        "q_proj" | "k_proj" | "v_proj" => "qkv",
        "gate_proj" | "up_proj" => "gate_up",
        _ => return None,
    };
    Some(format!("{module}.{group}"))
}

/// Shared NVFP4 tensor scales: `amax over the group / 2688` for every member of a fused group.
fn group_scales(targets: &[&DenseView], spec: &QuantSpec) -> Result<HashMap<String, f32>> {
    let mut amax: HashMap<String, f32> = HashMap::new();
    let mut members: HashMap<String, Vec<String>> = HashMap::new();
    for d in targets {
        if let Some(g) = fused_group(&d.name) {
            let m = nvfp4_amax(d, spec)?;
            let a = amax.entry(g.clone()).or_insert(0.0);
            *a = a.max(m);
            members.entry(g).or_default().push(d.name.clone());
        }
    }
    let mut out = HashMap::new();
    for (g, names) in members {
        let s2 = nvfp4::tensor_scale(amax[&g]);
        for n in names {
            out.insert(n, s2);
        }
    }
    Ok(out)
}

/// Quantizes `src` into the model directory `out_dir` (which must not exist, or be empty).
pub fn quantize_model(
    src: &ModelSource,
    spec: &QuantSpec,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<ExportSummary> {
    let out_label = out_dir.display().to_string();
    if let Ok(mut listing) = std::fs::read_dir(out_dir) {
        if listing.next().is_some() {
            return Err(Error::msg(format!(
                "{out_label}: already exists and is not empty; choose a new output directory"
            )));
        }
    } else if out_dir.exists() {
        return Err(Error::msg(format!(
            "{out_label}: exists and is not a directory"
        )));
    }

    let targets: Vec<&DenseView> = src
        .tensors()
        .filter(|d| is_decoder_linear(&d.name, &d.shape) && d.is_floating())
        .collect();
    if targets.is_empty() {
        return Err(Error::msg(format!(
            "{}: no decoder-layer linear weights (`*.layers.N.*.weight`, 2-D) to quantize",
            src.label
        )));
    }
    let shared = if spec.format == Format::Nvfp4 {
        group_scales(&targets, spec)?
    } else {
        HashMap::new()
    };
    let target_names: BTreeSet<&str> = targets.iter().map(|d| d.name.as_str()).collect();

    let parent = parent_dir(out_dir);
    let tmp = temp_builder(0o777).tempdir_in(parent).map_err(|e| {
        Error::msg(format!(
            "cannot write {out_label}: cannot create a directory in {}: {e}",
            parent.display()
        ))
    })?;
    let mut summary = ExportSummary::default();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    progress.start(src.tensors().count() as u64);
    for (file, tensors) in &src.shards {
        let mut outputs = Vec::with_capacity(tensors.len());
        for d in tensors {
            let out = if target_names.contains(d.name.as_str()) {
                let mut s = *spec;
                s.scale2 = shared.get(&d.name).copied();
                summary.quantized.push(d.name.clone());
                quantized_out(d, &s)?
            } else {
                summary.copied.push(d.name.clone());
                OutTensor::Dense(d.clone())
            };
            outputs.push((d.name.clone(), out));
            progress.advance(&d.name, 1);
        }
        let written = write_safetensors(
            &tmp.path().join(file),
            outputs,
            q4_metadata(spec),
            &NoProgress,
        )?;
        for (name, len) in written {
            total_size += len;
            weight_map.insert(name, json!(file));
        }
        summary.files.push(file.clone());
    }
    if src.shards.len() > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        write_json(&tmp.path().join(INDEX_FILE), &index, 2)?;
        summary.files.push(INDEX_FILE.into());
    }
    write_configs(src, spec, &target_names, tmp.path(), &mut summary)?;
    for f in &src.extra_files {
        let name = file_name(f)?;
        std::fs::copy(f, tmp.path().join(&name))
            .map_err(|e| Error::msg(format!("cannot copy {}: {e}", f.display())))?;
        summary.files.push(name);
    }
    if out_dir.exists() {
        // Checked empty above; rename cannot replace a directory on every platform.
        std::fs::remove_dir(out_dir).map_err(|e| Error::msg(format!("{out_label}: {e}")))?;
    }
    std::fs::rename(tmp.path(), out_dir)
        .map_err(|e| Error::msg(format!("cannot write {out_label}: {e}")))?;
    // The temporary directory is gone (renamed); dropping `tmp` finds nothing to remove.
    drop(tmp);
    Ok(summary)
}

/// `config.json` with the quantization config, and ModelOpt's side file for NVFP4.
fn write_configs(
    src: &ModelSource,
    spec: &QuantSpec,
    targets: &BTreeSet<&str>,
    dir: &Path,
    summary: &mut ExportSummary,
) -> Result<()> {
    // Linear-like modules left in full precision; `lm_head` is always excluded (it may be tied
    // to the embeddings and then has no weight of its own).
    let mut ignore: BTreeSet<String> = BTreeSet::from(["lm_head".to_string()]);
    for d in src.tensors() {
        if d.shape.len() == 2 && !targets.contains(d.name.as_str()) {
            if let Some(module) = d.name.strip_suffix(".weight") {
                ignore.insert(module.to_string());
            }
        }
    }
    let ignore: Vec<String> = ignore.into_iter().collect();
    let mut config = src.config.clone();
    let Some(obj) = config.as_object_mut() else {
        return Err(Error::msg(format!(
            "{}: {CONFIG} is not an object",
            src.label
        )));
    };
    let qc = match spec.format {
        Format::Nvfp4 => {
            let (qc, hf) = modelopt_configs(&ignore);
            write_json(&dir.join(HF_QUANT_CONFIG), &hf, 4)?;
            summary.files.push(HF_QUANT_CONFIG.into());
            qc
        }
        Format::Nf4 | Format::Fp4 => {
            let compute = obj
                .get("torch_dtype")
                .or_else(|| obj.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    let first = src.tensors().find(|d| targets.contains(d.name.as_str()));
                    torch_dtype_name(first.map_or(safetensors::Dtype::F32, |d| d.dtype)).into()
                });
            bnb_config(spec.format, spec.double_quant, &compute)
        }
        Format::Mxfp4 => mxfp4_config(&ignore),
    };
    obj.insert("quantization_config".into(), qc);
    write_json(&dir.join(CONFIG), &config, 2)?;
    summary.files.push(CONFIG.into());
    Ok(())
}

/// Pretty JSON with `indent` spaces (transformers uses 2, ModelOpt's side file 4).
fn write_json(path: &Path, v: &Value, indent: usize) -> Result<()> {
    use serde::Serialize;
    let pad = vec![b' '; indent];
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(&pad);
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    v.serialize(&mut ser)
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    buf.push(b'\n');
    write_atomically(path, |w| {
        w.write_all(&buf).map_err(|e| Error::msg(e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_decoder_linears_only() {
        let l = |n: &str| is_decoder_linear(n, &[64, 64]);
        assert!(l("model.layers.0.self_attn.q_proj.weight"));
        assert!(l("model.layers.11.mlp.down_proj.weight"));
        assert!(l("transformer.h.3.attn.c_attn.weight"));
        assert!(!l("model.embed_tokens.weight"));
        assert!(!l("lm_head.weight"));
        assert!(!l("model.layers.0.input_layernorm.weight"));
        assert!(!l("model.layers.0.self_attn.q_proj.bias"));
        assert!(!l("model.layers.0.mlp.gate.weight"));
        assert!(!l("model.layers.0.mlp.router.weight"));
        assert!(!is_decoder_linear(
            "model.layers.0.mlp.up_proj.weight",
            &[64]
        ));
    }

    #[test]
    fn fused_groups() {
        let g = |n: &str| fused_group(n);
        assert_eq!(
            g("model.layers.1.self_attn.k_proj.weight").as_deref(),
            Some("model.layers.1.self_attn.qkv")
        );
        assert_eq!(
            g("model.layers.1.mlp.up_proj.weight").as_deref(),
            Some("model.layers.1.mlp.gate_up")
        );
        assert_eq!(g("model.layers.1.mlp.down_proj.weight"), None);
        assert_eq!(g("model.layers.1.self_attn.o_proj.weight"), None);
    }
}
