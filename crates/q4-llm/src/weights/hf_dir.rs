//! A Hugging Face model directory with dense safetensors (one file or sharded).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::{BufferedSafetensors, Load};
use candle_core::{DType, Device, Tensor};

use super::{existing, WeightSource};
use crate::config::ModelConfig;
use crate::tokenizer::Tokenizer;

/// `config.json` + `model.safetensors` (or `model.safetensors.index.json` and its shards) +
/// `tokenizer.json`.
pub struct HfDirSource {
    dir: PathBuf,
    shards: Vec<(PathBuf, BufferedSafetensors)>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
}

impl HfDirSource {
    pub fn open(dir: &Path) -> Result<HfDirSource> {
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            // Read into memory rather than mmap: no unsafe, and the buffers only live while
            // the model is being built.
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let st = BufferedSafetensors::new(bytes)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            for (name, _) in st.tensors() {
                index.insert(name, i);
            }
            shards.push((path, st));
        }
        Ok(HfDirSource {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// A tensor in the dtype the checkpoint stores it in (f32, bf16, f16 or f64).
    fn stored(&self, name: &str) -> Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            bail!("tensor `{name}` not found in {}", self.dir.display());
        };
        let (path, st) = &self.shards[i];
        let view = st.get(name)?;
        let t = view
            .load(&Device::Cpu)
            .with_context(|| format!("cannot read tensor `{name}` from {}", path.display()))?;
        match t.dtype() {
            DType::F32 | DType::BF16 | DType::F16 | DType::F64 => Ok(t),
            other => bail!(
                "tensor `{name}` in {} has dtype {other:?}, expected f32, bf16 or f16",
                path.display()
            ),
        }
    }
}

/// The safetensors files of a directory: the index's shards, or `model.safetensors`.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(index_path) = existing(dir, "model.safetensors.index.json") {
        let text = std::fs::read_to_string(&index_path)
            .with_context(|| format!("cannot read {}", index_path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no `weight_map` object", index_path.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if files.is_empty() {
            bail!("{} lists no shard files", index_path.display());
        }
        return files
            .into_iter()
            .map(|f| {
                existing(dir, f).with_context(|| {
                    format!("shard {f} listed in {} is missing", index_path.display())
                })
            })
            .collect();
    }
    match existing(dir, "model.safetensors") {
        Some(p) => Ok(vec![p]),
        None => bail!(
            "model directory {} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        ),
    }
}

impl WeightSource for HfDirSource {
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
        self.index.contains_key(name)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = self.stored(name)?;
        Ok(match t.dtype() {
            DType::F32 => t,
            _ => t.to_dtype(DType::F32)?,
        })
    }

    /// Quantized from the stored dtype: `Int8Table::quantize` widens one slice of rows at a
    /// time, so a bf16 table is never held in f32.
    fn int8_table(&self, name: &str) -> Result<q4::Int8Table> {
        Ok(q4::Int8Table::quantize(&self.stored(name)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_llama() -> HfDirSource {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
        HfDirSource::open(&dir).unwrap()
    }

    /// The int8 table of an f32 checkpoint is quantized from the f32 values themselves, not from
    /// a bf16 rounding of them (which moves some blocks' codes and scales).
    #[test]
    fn int8_tables_quantize_the_stored_values() {
        let src = tiny_llama();
        let name = "model.embed_tokens.weight";
        let stored = src.stored(name).unwrap();
        assert_eq!(stored.dtype(), DType::F32);
        let bits = |t: &q4::Int8Table| -> Vec<u32> {
            let v: Vec<f32> = t
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        let got = bits(&src.int8_table(name).unwrap());
        assert_eq!(got, bits(&q4::Int8Table::quantize(&stored).unwrap()));
        let via_bf16 = q4::Int8Table::quantize(&stored.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_ne!(
            got,
            bits(&via_bf16),
            "the fixture should tell the two apart"
        );
    }
}
