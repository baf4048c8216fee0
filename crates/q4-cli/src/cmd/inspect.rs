//! `q4 inspect`: tensors, layouts, formats, shapes, storage and bits per weight.

use std::path::PathBuf;

use anyhow::Result;
use q4::checkpoint::{Checkpoint, Entry};
use serde_json::{json, Value};

use std::fmt::Write;

use super::quantize::{one_line, print};

/// Arguments of `q4 inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file or an HF model directory.
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

pub fn run(args: Args) -> Result<()> {
    let ckpt = Checkpoint::open(&args.input).map_err(one_line)?;
    let rows: Vec<Row> = ckpt.entries().iter().map(row).collect();
    let (n, bytes, params, bpw) = totals(rows.iter());
    let (nq, qbytes, qparams, qbpw) = totals(rows.iter().filter(|r| r.quantized));
    let declared = ckpt.declared().map(|d| {
        json!({"file": d.file, "quant_method": d.method, "detail": d.detail,
               "layout": d.layout().map(|l| l.to_string())})
    });
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
            "declared": declared,
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
    if let Some(d) = ckpt.declared() {
        writeln!(
            out,
            "declared: {}{} ({})",
            d.method,
            d.detail
                .as_deref()
                .map(|x| format!(" {x}"))
                .unwrap_or_default(),
            d.file
        )?;
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
