//! Memory-mapped safetensors files: the header is parsed by the `safetensors` crate and every
//! tensor becomes a [`HostBytes`] view into the shared map (no tensor bytes are copied).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::SafeTensors;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::host_bytes::HostBytes;

/// One tensor as stored in a file.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: HostBytes,
    /// The file it lives in (for error messages).
    pub file: Arc<str>,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Context string for errors about this tensor.
    pub fn at(&self) -> String {
        format!("{}: tensor `{}`", self.file, self.name)
    }
}

/// A mapped safetensors file.
pub struct MappedFile {
    pub path: PathBuf,
    pub tensors: Vec<RawTensor>,
    /// The `__metadata__` string map.
    pub metadata: HashMap<String, String>,
}

/// Maps `path` read-only and parses its header.
pub fn map_file(path: &Path) -> Result<MappedFile> {
    let label: Arc<str> = path.display().to_string().into();
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::msg(format!("{label}: {what}: {e}"));
    let file = File::open(path).map_err(|e| fail("cannot open", &e))?;
    // SAFETY: the file is opened read-only and q4 never writes to an input while it is mapped
    // (outputs go to a new temporary file that is renamed into place, so even writing over an
    // input path replaces the directory entry, not the mapped inode). Concurrent modification
    // by another process is outside our control, as for every mmap-based safetensors reader.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| fail("cannot map", &e))?;
    let map = Arc::new(map);
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| fail("not a valid safetensors file", &e))?;
    let data_start = 8 + header_len;
    let mut tensors: Vec<RawTensor> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            RawTensor {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                // read_metadata checked that the offsets tile the data section exactly.
                bytes: HostBytes::mapped(map.clone(), data_start + s, e - s),
                file: label.clone(),
            }
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(MappedFile {
        path: path.to_path_buf(),
        tensors,
        metadata: metadata.metadata().clone().unwrap_or_default(),
    })
}

/// The shard files of a sharded checkpoint, from `model.safetensors.index.json`, with the tensor
/// names the index assigns to each.
pub fn read_index(index: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let label = index.display();
    let text = std::fs::read_to_string(index)
        .map_err(|e| Error::msg(format!("{label}: cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{label}: invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::msg(format!("{label}: no \"weight_map\" object")))?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::msg(format!(
                "{label}: weight_map entry `{name}` is not a file name"
            ))
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::msg(format!(
                "{label}: weight_map entry `{name}` points outside the directory: {file}"
            )));
        }
        shards
            .entry(file.to_string())
            .or_default()
            .push(name.clone());
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_fixture_without_copying() {
        let path =
            Path::new(crate::checkpoint::test_fixtures::DIR).join("nf4_f32_tail.safetensors");
        let f = map_file(&path).unwrap();
        let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"packed"), "{names:?}");
        let packed = f.tensors.iter().find(|t| t.name == "packed").unwrap();
        assert!(packed.bytes.is_mapped());
        assert_eq!(packed.dtype, Dtype::U8);
        assert_eq!(packed.shape, vec![56, 1]);
        assert_eq!(packed.bytes.len(), 56);
        assert!(f.metadata.contains_key("producers"));
    }

    #[test]
    fn rejects_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(crate::checkpoint::test_fixtures::DIR).join("nf4_f32_tail.safetensors");
        let bytes = std::fs::read(src).unwrap();
        let p = dir.path().join("t.safetensors");
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = map_file(&p).err().unwrap().to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        std::fs::write(&p, b"").unwrap();
        assert!(map_file(&p).is_err());
    }
}
