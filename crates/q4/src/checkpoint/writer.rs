//! Writes safetensors files atomically: the header is built with the `safetensors` crate's own
//! types, tensor bytes are streamed one tensor at a time into a temporary file in the
//! destination directory, and only a complete file is renamed into place. On any error the
//! temporary file is removed, so no partial output is ever left behind.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use half::bf16;
use q4_formats::bnb::{quant_state_json, Absmax, BnbTensor};
use q4_formats::mxfp4;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde_json::{Map, Value};

use super::config::Q4_METADATA_KEY;
use super::dense::{bytes_of, DenseView};
use super::view::QuantView;
use super::Progress;
use crate::error::{Error, Result};
use crate::host_bytes::HostBytes;
use crate::qtensor::Quantized;

/// Element type of dense output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    BF16,
}

impl OutDtype {
    fn dtype(self) -> Dtype {
        match self {
            OutDtype::F32 => Dtype::F32,
            OutDtype::BF16 => Dtype::BF16,
        }
    }
}

/// One logical tensor to write.
#[derive(Clone, Debug)]
pub enum OutTensor {
    /// Written as stored (bytes copied from the map).
    Dense(DenseView),
    /// Floating tensors converted to the dtype; others written as stored.
    Convert(DenseView, OutDtype),
    /// Written under the format's naming: NVFP4 `K`, `K_scale` (F8_E4M3), `K_scale_2` (F32);
    /// MXFP4 `K_blocks`, `K_scales`; NF4/FP4 the bitsandbytes keys with the quant-state JSON
    /// (`source_dtype` is the torch dtype name it records, e.g. `float32`).
    Quantized {
        q: Quantized,
        shape: Vec<usize>,
        source_dtype: String,
    },
    /// Dequantized to the dtype while writing.
    Dequantized(QuantView, OutDtype),
}

/// Where a stored tensor's bytes come from.
enum Source {
    Bytes(HostBytes),
    Convert(DenseView, OutDtype),
    Dequantize(QuantView, OutDtype),
}

struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
    source: Source,
}

impl Stored {
    fn owned(name: String, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        Stored {
            name,
            dtype,
            shape,
            len: bytes.len(),
            source: Source::Bytes(HostBytes::owned(bytes)),
        }
    }

    fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        Ok(match &self.source {
            Source::Bytes(b) => Cow::Borrowed(&b[..]),
            Source::Convert(d, _) if !d.is_floating() => Cow::Borrowed(&d.data[..]),
            Source::Convert(d, OutDtype::F32) => Cow::Owned(bytes_of(&d.to_f32()?)),
            Source::Convert(d, OutDtype::BF16) => {
                let v: Vec<bf16> = d.to_f32()?.into_iter().map(bf16::from_f32).collect();
                Cow::Owned(bytes_of(&v))
            }
            Source::Dequantize(q, OutDtype::F32) => Cow::Owned(bytes_of(&q.dequantize::<f32>())),
            Source::Dequantize(q, OutDtype::BF16) => Cow::Owned(bytes_of(&q.dequantize::<bf16>())),
        })
    }
}

/// Expands the logical tensors into stored ones; returns logical shapes of padded tensors.
fn expand(tensors: Vec<(String, OutTensor)>) -> Result<(Vec<Stored>, Map<String, Value>)> {
    let mut out = Vec::new();
    let mut padded = Map::new();
    for (name, t) in tensors {
        match t {
            OutTensor::Dense(d) => out.push(Stored {
                name,
                dtype: d.dtype,
                shape: d.shape.clone(),
                len: d.data.len(),
                source: Source::Bytes(d.data),
            }),
            OutTensor::Convert(d, dt) => {
                let (dtype, len) = if d.is_floating() {
                    (dt.dtype(), d.numel() * dt.dtype().bitsize() / 8)
                } else {
                    (d.dtype, d.data.len())
                };
                out.push(Stored {
                    name,
                    dtype,
                    shape: d.shape.clone(),
                    len,
                    source: Source::Convert(d, dt),
                })
            }
            OutTensor::Dequantized(q, dt) => out.push(Stored {
                name,
                dtype: dt.dtype(),
                shape: q.shape.clone(),
                len: q.numel() * dt.dtype().bitsize() / 8,
                source: Source::Dequantize(q, dt),
            }),
            OutTensor::Quantized {
                q,
                shape,
                source_dtype,
            } => {
                let logical_cols = shape.last().copied().unwrap_or(0);
                let stored_cols = match &q {
                    Quantized::Nvfp4(t) => Some(t.padded_cols()),
                    Quantized::Mxfp4(t) => Some(t.padded_cols()),
                    Quantized::Bnb(_) => None,
                };
                if stored_cols.is_some_and(|c| c != logical_cols) {
                    padded.insert(name.clone(), Value::from(shape.clone()));
                }
                expand_quantized(&mut out, name, q, &shape, &source_dtype)?;
            }
        }
    }
    Ok((out, padded))
}

fn expand_quantized(
    out: &mut Vec<Stored>,
    name: String,
    q: Quantized,
    shape: &[usize],
    source_dtype: &str,
) -> Result<()> {
    let lead = &shape[..shape.len().saturating_sub(1)];
    let with_last = |last: &[usize]| -> Vec<usize> { lead.iter().chain(last).copied().collect() };
    match q {
        Quantized::Nvfp4(t) => {
            t.validate()?;
            let pc = t.padded_cols();
            out.push(Stored::owned(
                format!("{name}_scale"),
                Dtype::F8_E4M3,
                with_last(&[pc / q4_formats::nvfp4::BLOCK]),
                t.scales,
            ));
            out.push(Stored::owned(
                format!("{name}_scale_2"),
                Dtype::F32,
                vec![],
                t.scale2.to_le_bytes().to_vec(),
            ));
            out.push(Stored::owned(
                name,
                Dtype::U8,
                with_last(&[pc / 2]),
                t.packed,
            ));
        }
        Quantized::Mxfp4(t) => {
            t.validate()?;
            let groups = t.padded_cols() / mxfp4::BLOCK;
            out.push(Stored::owned(
                format!("{name}_blocks"),
                Dtype::U8,
                with_last(&[groups, mxfp4::BLOCK / 2]),
                t.packed,
            ));
            out.push(Stored::owned(
                format!("{name}_scales"),
                Dtype::U8,
                with_last(&[groups]),
                t.scales,
            ));
        }
        Quantized::Bnb(t) => expand_bnb(out, name, t, shape, source_dtype)?,
    }
    Ok(())
}

/// The keys `Linear4bit` saves (FORMATS.md §2.6), JSON byte-identical to bitsandbytes'.
fn expand_bnb(
    out: &mut Vec<Stored>,
    name: String,
    t: BnbTensor,
    shape: &[usize],
    source_dtype: &str,
) -> Result<()> {
    t.validate()?;
    if shape.iter().product::<usize>() != t.numel {
        return Err(Error::msg(format!(
            "tensor `{name}`: shape {shape:?} does not hold {} elements",
            t.numel
        )));
    }
    let json = quant_state_json(&t, source_dtype, shape);
    let f32s = |v: &[f32]| bytes_of(v);
    let nb = t.absmax.len();
    out.push(Stored::owned(
        format!("{name}.quant_map"),
        Dtype::F32,
        vec![16],
        f32s(t.kind.codebook()),
    ));
    match &t.absmax {
        Absmax::Plain(a) => out.push(Stored::owned(
            format!("{name}.absmax"),
            Dtype::F32,
            vec![nb],
            f32s(a),
        )),
        Absmax::Nested(n) => {
            out.push(Stored::owned(
                format!("{name}.absmax"),
                Dtype::U8,
                vec![nb],
                n.codes.clone(),
            ));
            out.push(Stored::owned(
                format!("{name}.nested_absmax"),
                Dtype::F32,
                vec![n.nested_absmax.len()],
                f32s(&n.nested_absmax),
            ));
            out.push(Stored::owned(
                format!("{name}.nested_quant_map"),
                Dtype::F32,
                vec![n.code_map.len()],
                f32s(&n.code_map),
            ));
        }
    }
    out.push(Stored::owned(
        format!("{name}.quant_state.bitsandbytes__{}", t.kind.name()),
        Dtype::U8,
        vec![json.len()],
        json.into_bytes(),
    ));
    let n_bytes = t.packed.len();
    out.push(Stored::owned(name, Dtype::U8, vec![n_bytes, 1], t.packed));
    Ok(())
}

/// Writes `tensors` to `path` atomically. `__metadata__` gets `format: pt` and, under `q4`, the
/// JSON object `q4_meta` (plus the logical shapes of rows q4 padded). Returns the stored
/// tensor names with their sizes in bytes.
pub fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, OutTensor)>,
    q4_meta: Map<String, Value>,
    progress: &dyn Progress,
) -> Result<Vec<(String, usize)>> {
    let (mut stored, padded) = expand(tensors)?;
    let mut seen = HashSet::new();
    for s in &stored {
        if !seen.insert(s.name.as_str()) {
            return Err(Error::msg(format!(
                "{}: two tensors would be named `{}`",
                path.display(),
                s.name
            )));
        }
    }
    // The order the safetensors crate writes in: larger alignment first, then by name.
    stored.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let mut meta = q4_meta;
    if !padded.is_empty() {
        meta.insert("shapes".into(), Value::Object(padded));
    }
    let header = header_bytes(&stored, meta).map_err(|e| write_error(path, e))?;
    progress.start(stored.len() as u64);
    write_atomically(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for s in &stored {
            let bytes = s.bytes()?;
            if bytes.len() != s.len {
                return Err(Error::msg(format!(
                    "tensor `{}`: produced {} bytes, expected {}",
                    s.name,
                    bytes.len(),
                    s.len
                )));
            }
            w.write_all(&bytes).map_err(io)?;
            progress.advance(&s.name, 1);
        }
        Ok(())
    })?;
    Ok(stored.into_iter().map(|s| (s.name, s.len)).collect())
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::msg(format!("cannot write {}: {e}", path.display()))
}

/// The JSON header, padded with spaces to a multiple of 8 bytes like the safetensors crate does.
fn header_bytes(stored: &[Stored], q4_meta: Map<String, Value>) -> Result<Vec<u8>> {
    let mut offset = 0;
    let infos = stored
        .iter()
        .map(|s| {
            let info = TensorInfo {
                dtype: s.dtype,
                shape: s.shape.clone(),
                data_offsets: (offset, offset + s.len),
            };
            offset += s.len;
            (s.name.clone(), info)
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        Q4_METADATA_KEY.to_string(),
        Value::Object(q4_meta).to_string(),
    );
    let metadata =
        Metadata::new(Some(meta), infos).map_err(|e| Error::msg(format!("bad header: {e}")))?;
    let mut header = serde_json::to_string(&metadata)
        .map_err(|e| Error::msg(format!("bad header: {e}")))?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok(header)
}

/// Runs `fill` on a buffered temporary file next to `path`, then renames it to `path`. The
/// temporary file is deleted if anything fails.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    let tmp = temp_builder(0o666).tempfile_in(dir).map_err(|e| {
        write_error(
            path,
            format!("cannot create a file in {}: {e}", dir.display()),
        )
    })?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
    fill(&mut w).map_err(|e| write_error(path, e))?;
    w.flush().map_err(|e| write_error(path, e))?;
    drop(w);
    tmp.as_file().sync_all().map_err(|e| write_error(path, e))?;
    tmp.persist(path).map_err(|e| write_error(path, e.error))?;
    Ok(())
}

/// The directory a path lives in (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Temporary files and directories named `.q4-*.tmp`, created with `mode` (0o666 for files,
/// 0o777 for directories; the umask applies) rather than tempfile's private 0600 / 0700, since
/// they become the output.
pub(crate) fn temp_builder(mode: u32) -> tempfile::Builder<'static, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(".q4-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    b
}

fn io(e: std::io::Error) -> Error {
    Error::msg(e.to_string())
}
