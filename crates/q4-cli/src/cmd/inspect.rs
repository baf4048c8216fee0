//! `q4 inspect`: tensors, layouts, formats, shapes, storage and bits per weight, of a
//! safetensors checkpoint or a GGUF file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use q4::checkpoint::{Checkpoint, Entry};
use serde_json::{json, Value};

use std::fmt::Write;

use super::quantize::{one_line, print};

/// Arguments of `q4 inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, an HF model directory or a `.gguf` file.
    pub input: PathBuf,
    /// Machine-readable JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One row of the report.
struct Row {
    name: String,
    layout: String,
    format: String,
    shape: Vec<usize>,
    storage: String,
    bytes: usize,
    params: usize,
    quantized: bool,
    detail: Value,
}

impl Row {
    fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

fn row(e: &Entry) -> Row {
    match e {
        Entry::Dense(d) => Row {
            name: d.name.clone(),
            layout: "dense".into(),
            format: d.dtype.to_string().to_ascii_lowercase(),
            shape: d.shape.clone(),
            storage: d.dtype.to_string(),
            bytes: d.nbytes(),
            params: d.numel(),
            quantized: false,
            detail: json!({"file": d.file.to_string()}),
        },
        Entry::Quant(q) => Row {
            name: q.name.clone(),
            layout: q.layout.to_string(),
            format: q.format.to_string(),
            shape: q.shape.clone(),
            storage: q
                .members
                .iter()
                .map(|m| m.dtype.to_string())
                .collect::<Vec<_>>()
                .join("+"),
            bytes: q.nbytes(),
            params: q.numel(),
            quantized: true,
            detail: json!({
                "file": q.file.to_string(),
                "block_size": q.block_size,
                "tensor_scale": q.tensor_scale,
                "input_scale": q.input_scale,
                "members": q.members.iter().map(|m| json!({
                    "name": m.name, "dtype": m.dtype.to_string(), "shape": m.shape, "bytes": m.nbytes,
                })).collect::<Vec<_>>(),
            }),
        },
    }
}

/// Sum of bytes and parameters, and the resulting bits per weight.
fn totals<'a>(rows: impl Iterator<Item = &'a Row>) -> (usize, usize, usize, f64) {
    let (n, bytes, params) =
        rows.fold((0, 0, 0), |(n, b, p), r| (n + 1, b + r.bytes, p + r.params));
    (n, bytes, params, bytes as f64 * 8.0 / params.max(1) as f64)
}

/// What the report says about the file as a whole besides its tensors.
struct Header {
    /// JSON `declared` (safetensors: the quantization config) or `gguf` (its metadata).
    json_key: &'static str,
    json: Option<Value>,
    /// Text lines printed after the table.
    lines: Vec<String>,
}

/// Whether `path` is a GGUF file: its first four bytes, whatever its name.
fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// A GGUF file's tensors (type, shape in row-major order, stored bytes) and metadata: scalars
/// as they are, arrays (such as the tokenizer's vocabulary) by element type and length.
fn gguf_report(path: &Path) -> Result<(Vec<Row>, Header)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file: {e}", path.display()))?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    // File order (by offset), as llama.cpp writes them: layer by layer.
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let rows = names
        .into_iter()
        .map(|name| {
            let info = &content.tensor_infos[name];
            let dtype = info.ggml_dtype;
            let params = info.shape.elem_count();
            let bytes = params / dtype.block_size() * dtype.type_size();
            let format = format!("{dtype:?}").to_ascii_lowercase();
            Row {
                name: name.clone(),
                layout: "gguf".into(),
                format: format.clone(),
                shape: info.shape.dims().to_vec(),
                storage: format!("{dtype:?}"),
                bytes,
                params,
                quantized: !matches!(
                    dtype,
                    candle_core::quantized::GgmlDType::F32
                        | candle_core::quantized::GgmlDType::F16
                        | candle_core::quantized::GgmlDType::BF16
                ),
                detail: json!({"file": path.display().to_string(), "offset": info.offset,
                               "block_size": dtype.block_size()}),
            }
        })
        .collect();
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    let metadata: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| ((*k).clone(), gguf_value(&content.metadata[*k])))
        .collect();
    let text = |k: &str| {
        content.metadata.get(k).map(|v| match gguf_value(v) {
            Value::String(s) => s,
            other => other.to_string(),
        })
    };
    let mut line = format!("gguf: {} metadata keys", metadata.len());
    for (key, label) in [
        ("general.architecture", "architecture"),
        ("general.name", "name"),
        ("general.file_type", "file_type"),
    ] {
        if let Some(v) = text(key) {
            line.push_str(&format!(", {label} {v}"));
        }
    }
    Ok((
        rows,
        Header {
            json_key: "gguf",
            json: Some(json!({"metadata": metadata})),
            lines: vec![line],
        },
    ))
}

fn gguf_value(v: &gguf_file::Value) -> Value {
    use gguf_file::Value as G;
    match v {
        G::U8(x) => json!(x),
        G::I8(x) => json!(x),
        G::U16(x) => json!(x),
        G::I16(x) => json!(x),
        G::U32(x) => json!(x),
        G::I32(x) => json!(x),
        G::U64(x) => json!(x),
        G::I64(x) => json!(x),
        G::F32(x) => json!(x),
        G::F64(x) => json!(x),
        G::Bool(x) => json!(x),
        G::String(x) => json!(x),
        G::Array(a) => {
            let ty = a
                .first()
                .map(|e| format!("{:?}", e.value_type()).to_ascii_lowercase())
                .unwrap_or_else(|| "empty".into());
            json!({"array": ty, "len": a.len()})
        }
    }
}

fn checkpoint_report(path: &Path) -> Result<(Vec<Row>, Header)> {
    let ckpt = Checkpoint::open(path).map_err(one_line)?;
    let rows = ckpt.entries().iter().map(row).collect();
    let d = ckpt.declared();
    let json = d.map(|d| {
        json!({"file": d.file, "quant_method": d.method, "detail": d.detail,
               "layout": d.layout().map(|l| l.to_string())})
    });
    let lines = d
        .map(|d| {
            format!(
                "declared: {}{} ({})",
                d.method,
                d.detail
                    .as_deref()
                    .map(|x| format!(" {x}"))
                    .unwrap_or_default(),
                d.file
            )
        })
        .into_iter()
        .collect();
    Ok((
        rows,
        Header {
            json_key: "declared",
            json,
            lines,
        },
    ))
}

pub fn run(args: Args) -> Result<()> {
    let (rows, header) = if is_gguf(&args.input) {
        gguf_report(&args.input)?
    } else {
        checkpoint_report(&args.input)?
    };
    let (n, bytes, params, bpw) = totals(rows.iter());
    let (nq, qbytes, qparams, qbpw) = totals(rows.iter().filter(|r| r.quantized));
    if args.json {
        let tensors: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut v = json!({
                    "name": r.name, "layout": r.layout, "format": r.format, "shape": r.shape,
                    "storage": r.storage, "bytes": r.bytes, "parameters": r.params,
                    "bits_per_weight": r.bits_per_weight(),
                });
                let obj = v.as_object_mut().expect("object");
                for (k, x) in r.detail.as_object().expect("object") {
                    obj.insert(k.clone(), x.clone());
                }
                v
            })
            .collect();
        let report = json!({
            "path": args.input.display().to_string(),
            header.json_key: header.json,
            "tensors": tensors,
            "totals": {
                "tensors": n, "parameters": params, "bytes": bytes, "bits_per_weight": bpw,
                "quantized_tensors": nq, "quantized_parameters": qparams,
                "quantized_bytes": qbytes, "quantized_bits_per_weight": qbpw,
            },
        });
        return print(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    let mut out = table(&rows);
    for l in &header.lines {
        writeln!(out, "{l}")?;
    }
    writeln!(
        out,
        "total: {n} tensors, {params} parameters, {bytes} bytes, {bpw:.3} bits/weight"
    )?;
    if nq > 0 {
        writeln!(
            out,
            "quantized: {nq} tensors, {qparams} parameters, {qbytes} bytes, {qbpw:.3} bits/weight"
        )?;
    }
    print(&out)
}

/// Left-aligned text columns, right-aligned numbers.
fn table(rows: &[Row]) -> String {
    let header = [
        "NAME", "LAYOUT", "FORMAT", "SHAPE", "STORAGE", "BYTES", "BITS/W",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.layout.clone(),
                r.format.clone(),
                format!("{:?}", r.shape),
                r.storage.clone(),
                r.bytes.to_string(),
                format!("{:.3}", r.bits_per_weight()),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.len());
        }
    }
    let mut out = String::new();
    let mut line = |c: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(width).enumerate() {
            if i >= 5 {
                s.push_str(&format!("  {cell:>w$}"));
            } else if i == 0 {
                s.push_str(&format!("{cell:<w$}"));
            } else {
                s.push_str(&format!("  {cell:<w$}"));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for c in &cells {
        line(c);
    }
    out
}
