//! Checkpoint layouts: reading safetensors files and Hugging Face model directories
//! (memory-mapped, zero-copy), recognising how each 4-bit tensor is laid out (ModelOpt and
//! compressed-tensors NVFP4, bitsandbytes NF4/FP4, gpt-oss MXFP4, and q4's own naming), and
//! writing quantized or dense checkpoints atomically.
//!
//! ```no_run
//! # fn main() -> q4::Result<()> {
//! use q4::checkpoint::{Checkpoint, Entry};
//! let ckpt = Checkpoint::open("model-nvfp4/")?;
//! for e in ckpt.entries() {
//!     if let Entry::Quant(q) = e {
//!         let w = q.to_qtensor(&candle_core::Device::Cpu)?; // codes stay in the mapped file
//!         println!("{} {} {:?} {}", q.name, q.layout, q.shape, w.format());
//!     }
//! }
//! # Ok(()) }
//! ```

mod bnb;
mod compressed_tensors;
mod config;
mod dense;
mod detect;
mod export;
mod gpt_oss;
mod modelopt;
mod quantize;
mod safetensors_io;
mod view;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use config::DeclaredQuant;
pub use dense::{float_dtype, DenseView, FloatSlice};
pub use export::{is_decoder_linear, quantize_model, ExportSummary, ModelSource};
pub use quantize::{quantize_dense, quantize_file, QuantizeSummary};
pub use safetensors::Dtype;
pub use view::{Layout, Member, NestedStats, QuantView, ScaleData};
/// Also writes the CUDA kernel cache's files and the default model's verification stamp.
pub use writer::{write_atomically, write_safetensors, OutDtype, OutTensor};

use crate::error::{Error, Result};
use safetensors_io::{map_file, read_index, RawTensor};

/// Model directory file names.
pub const MODEL_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One logical tensor of a checkpoint.
#[derive(Clone, Debug)]
pub enum Entry {
    Dense(DenseView),
    Quant(QuantView),
}

impl Entry {
    /// The logical name (the dense tensor's name for quantized entries).
    pub fn name(&self) -> &str {
        match self {
            Entry::Dense(d) => &d.name,
            Entry::Quant(q) => &q.name,
        }
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Entry::Dense(d) => &d.shape,
            Entry::Quant(q) => &q.shape,
        }
    }

    /// The file it is stored in.
    pub fn file(&self) -> &str {
        match self {
            Entry::Dense(d) => &d.file,
            Entry::Quant(q) => &q.file,
        }
    }

    /// Stored bytes.
    pub fn nbytes(&self) -> usize {
        match self {
            Entry::Dense(d) => d.nbytes(),
            Entry::Quant(q) => q.nbytes(),
        }
    }
}

/// Reports work done to a progress display (the CLI draws a bar; the library draws nothing).
pub trait Progress: Sync {
    /// `total` units of work are coming.
    fn start(&self, _total: u64) {}
    /// `n` more units are done (`what` names the tensor).
    fn advance(&self, _what: &str, _n: u64) {}
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// An opened checkpoint: every tensor of a `.safetensors` file or of an HF model directory,
/// grouped into logical entries.
pub struct Checkpoint {
    path: PathBuf,
    is_dir: bool,
    /// The safetensors files, in order (one, or the shards).
    files: Vec<PathBuf>,
    entries: Vec<Entry>,
    config: Option<serde_json::Value>,
    declared: Option<DeclaredQuant>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file or a model directory (`model.safetensors`, or shards listed in
    /// `model.safetensors.index.json`). Files are memory-mapped; nothing is copied. Fails on
    /// unreadable files, tensors in no recognised layout, and inconsistent quantization state,
    /// naming the file and tensor.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta =
            std::fs::metadata(path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        let is_dir = meta.is_dir();
        let (files, index) = if is_dir {
            model_files(path)?
        } else {
            (vec![path.to_path_buf()], None)
        };
        let mut tensors: BTreeMap<String, RawTensor> = BTreeMap::new();
        let mut logical_shapes = HashMap::new();
        for f in &files {
            let mapped = map_file(f)?;
            logical_shapes.extend(config::recorded_shapes(&mapped)?);
            for t in mapped.tensors {
                if let Some(prev) = tensors.get(&t.name) {
                    return Err(Error::msg(format!(
                        "{}: tensor `{}` is also stored in {}",
                        t.file, t.name, prev.file
                    )));
                }
                tensors.insert(t.name.clone(), t);
            }
        }
        if let Some(index) = &index {
            for (file, names) in index {
                for n in names {
                    if !tensors.contains_key(n) {
                        return Err(Error::msg(format!(
                            "{}: the index lists tensor `{n}` in {file}, which does not hold it",
                            path.join(INDEX_FILE).display()
                        )));
                    }
                }
            }
        }
        let (config, declared) = if is_dir {
            config::read_declared(path)?
        } else {
            (None, None)
        };
        let entries = detect::detect(detect::Pool::new(tensors, logical_shapes))?;
        if let Some(d) = &declared {
            d.check(&entries)?;
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            is_dir,
            files,
            entries,
            config,
            declared,
        })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a model directory.
    pub fn is_dir(&self) -> bool {
        self.is_dir
    }

    /// The safetensors files (one, or the shards in index order).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Logical tensors sorted by name.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// A logical tensor by name.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// `config.json` of a model directory.
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// The quantization the directory's config files declare.
    pub fn declared(&self) -> Option<&DeclaredQuant> {
        self.declared.as_ref()
    }

    /// Total size of the safetensors files in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// The safetensors files of a model directory, and the index's file -> tensor names.
type IndexMap = BTreeMap<String, Vec<String>>;
fn model_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<IndexMap>)> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let shards = read_index(&index)?;
        let files = shards.keys().map(|f| dir.join(f)).collect();
        return Ok((files, Some(shards)));
    }
    let single = dir.join(MODEL_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    Err(Error::msg(format!(
        "{}: no {MODEL_FILE} or {INDEX_FILE} in this directory",
        dir.display()
    )))
}

#[cfg(test)]
pub(crate) mod test_fixtures {
    /// The reference vectors and tiny checkpoints (see tests/fixtures/README in the shared
    /// vectors folder).
    pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
}
