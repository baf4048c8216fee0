//! Checkpoint tests against the reference fixtures (tests/fixtures, produced by ModelOpt,
//! bitsandbytes, torchao and transformers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Map;

use super::safetensors_io::{map_file, RawTensor};
use super::test_fixtures::DIR;
use super::*;
use crate::qtensor::QuantSpec;

mod reading;
mod writing;

/// Tensors to write, in order.
type Outputs = Vec<(String, OutTensor)>;

fn fixture(name: &str) -> PathBuf {
    Path::new(DIR).join(name)
}

/// The stored tensors of a file, by name.
fn raw(path: &Path) -> BTreeMap<String, RawTensor> {
    map_file(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

fn f32s(t: &RawTensor) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&t.bytes)
}

/// Writes `(new name, tensor)` pairs of a fixture into a new file, unchanged.
fn extract(src: &Path, pick: &[(&str, &str)], dst: &Path) {
    let all = raw(src);
    let out = pick
        .iter()
        .map(|(to, from)| {
            let mut d = DenseView::from_raw(all[*from].clone());
            d.name = to.to_string();
            (to.to_string(), OutTensor::Dense(d))
        })
        .collect();
    write_safetensors(dst, out, Map::new(), &NoProgress).unwrap();
}

fn quant<'a>(c: &'a Checkpoint, name: &str) -> &'a QuantView {
    match c.get(name) {
        Some(Entry::Quant(q)) => q,
        other => panic!("{name}: {other:?}"),
    }
}

fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: {g} vs {w}");
    }
}

/// Layout counts of an opened checkpoint.
fn layouts(c: &Checkpoint) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in c.entries() {
        let k = match e {
            Entry::Dense(_) => "dense".to_string(),
            Entry::Quant(q) => format!("{} {}", q.layout, q.format),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Every stored tensor of a file: name -> (dtype, shape, bytes).
fn stored(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    raw(path)
        .into_iter()
        .map(|(n, t)| (n, (t.dtype, t.shape.clone(), t.bytes.to_vec())))
        .collect()
}

/// Same names, dtypes, shapes and bytes (without dumping megabytes on failure).
fn assert_same(
    got: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    want: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (n, w) in want {
        let g = &got[n];
        assert_eq!((g.0, &g.1), (w.0, &w.1), "{n}");
        assert!(g.2 == w.2, "{n}: bytes differ");
    }
}

/// A copy of the ModelOpt checkpoint with some tensors changed.
fn modelopt_variant(dir: &Path, edit: impl Fn(&mut Outputs)) -> PathBuf {
    let src = fixture("tiny-llama-nvfp4/model.safetensors");
    let mut tensors: Vec<(String, OutTensor)> = raw(&src)
        .into_values()
        .map(|t| (t.name.clone(), OutTensor::Dense(DenseView::from_raw(t))))
        .collect();
    edit(&mut tensors);
    let p = dir.join("bad.safetensors");
    write_safetensors(&p, tensors, Map::new(), &NoProgress).unwrap();
    p
}

fn open_err(p: &Path) -> String {
    Checkpoint::open(p).err().expect("must fail").to_string()
}
