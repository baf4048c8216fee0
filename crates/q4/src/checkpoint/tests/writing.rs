//! Writing: byte-exact rewrites, padding, atomic failure, model-directory export.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use q4_formats::Format;
use serde_json::Map;

use super::*;

/// Re-writes every entry of a checkpoint through `to_formats` and the writer.
fn rewrite(c: &Checkpoint, out: &Path) {
    let tensors = c
        .entries()
        .iter()
        .map(|e| {
            let t = match e {
                Entry::Dense(d) => OutTensor::Dense(d.clone()),
                Entry::Quant(q) => OutTensor::Quantized {
                    q: q.to_formats().unwrap(),
                    shape: q.shape.clone(),
                    source_dtype: q.source_dtype.clone().unwrap_or("float32".into()),
                },
            };
            (e.name().to_string(), t)
        })
        .collect();
    write_safetensors(out, tensors, Map::new(), &NoProgress).unwrap();
}

#[test]
fn writer_reproduces_the_bitsandbytes_checkpoint_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-qwen3-nf4/model.safetensors");
    let out = dir.path().join("out.safetensors");
    rewrite(&Checkpoint::open(&src).unwrap(), &out);
    assert_same(&stored(&out), &stored(&src));
    let meta = map_file(&out).unwrap().metadata;
    assert_eq!(meta["format"], "pt");
    assert!(meta.contains_key("q4"));
}

#[test]
fn writer_reproduces_the_modelopt_checkpoint_except_activation_scales() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama-nvfp4/model.safetensors");
    let out = dir.path().join("out.safetensors");
    rewrite(&Checkpoint::open(&src).unwrap(), &out);
    let mut want = stored(&src);
    want.retain(|n, _| !n.ends_with(".input_scale"));
    assert_same(&stored(&out), &want);
}

#[test]
fn padded_rows_round_trip_with_their_logical_shape() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = (0..3 * 40)
        .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
        .collect();
    let d = DenseView {
        name: "w".into(),
        dtype: Dtype::F32,
        shape: vec![3, 40],
        data: crate::HostBytes::owned(super::dense::bytes_of(&values)),
        file: "mem".into(),
    };
    for format in [Format::Nvfp4, Format::Mxfp4] {
        let mut spec = QuantSpec::new(format);
        let e = quantize_dense(&d, &spec).err().unwrap().to_string();
        assert!(
            e.contains("tensor `w`") && e.contains("not a multiple"),
            "{e}"
        );
        spec.pad = true;
        let q = quantize_dense(&d, &spec).unwrap();
        let p = dir.path().join(format!("{format}.safetensors"));
        let out = vec![(
            "w".to_string(),
            OutTensor::Quantized {
                q,
                shape: d.shape.clone(),
                source_dtype: "float32".into(),
            },
        )];
        write_safetensors(&p, out, Map::new(), &NoProgress).unwrap();
        let c = Checkpoint::open(&p).unwrap();
        let q = quant(&c, "w");
        assert_eq!(q.shape, vec![3, 40], "{format}");
        let back = q.dequantize::<f32>();
        let bound = values.iter().fold(0f32, |m, x| m.max(x.abs())) / 4.0;
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= bound, "{format}: {a} vs {b}");
        }
    }
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = DenseView {
        name: "a".into(),
        dtype: Dtype::F32,
        shape: vec![1],
        data: crate::HostBytes::owned(vec![0; 4]),
        file: "mem".into(),
    };
    // Two outputs with one name: refused before anything is created.
    let p = dir.path().join("x.safetensors");
    let dup = vec![
        ("a".to_string(), OutTensor::Dense(d.clone())),
        ("a".to_string(), OutTensor::Dense(d.clone())),
    ];
    assert!(write_safetensors(&p, dup, Map::new(), &NoProgress).is_err());
    // A tensor whose bytes do not match its shape fails mid-write.
    let mut lying = d.clone();
    lying.name = "b".into();
    lying.dtype = Dtype::F8_E4M3;
    lying.shape = vec![3];
    let bad = vec![("b".to_string(), OutTensor::Convert(lying, OutDtype::F32))];
    let e = write_safetensors(&p, bad, Map::new(), &NoProgress)
        .err()
        .unwrap();
    assert!(e.to_string().contains("x.safetensors"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let missing = dir.path().join("no/such/dir/x.safetensors");
    let one = vec![("a".to_string(), OutTensor::Dense(d))];
    let e = write_safetensors(&missing, one, Map::new(), &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no/such/dir"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn quantizes_a_model_directory_like_modelopt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nvfp4");
    let ckpt = Checkpoint::open(fixture("tiny-llama")).unwrap();
    let src = ModelSource::from_checkpoint(&ckpt).unwrap();
    let s = quantize_model(&src, &QuantSpec::new(Format::Nvfp4), &out, &NoProgress).unwrap();
    assert_eq!(s.quantized.len(), 14);
    let got = stored(&out.join(MODEL_FILE));
    let mut want = stored(&fixture("tiny-llama-nvfp4/model.safetensors"));
    want.retain(|n, _| !n.ends_with(".input_scale"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (n, w) in &want {
        let g = &got[n];
        assert_eq!((g.0, &g.1), (w.0, &w.1), "{n}");
        assert!(g.2 == w.2, "{n}: bytes differ");
    }
    let c = Checkpoint::open(&out).unwrap();
    assert_eq!(c.declared().unwrap().layout(), Some(Layout::ModelOpt));
    assert!(out.join("tokenizer.json").is_file());
    // No temporary directory is left next to the output.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["nvfp4".to_string()]);
    // A second run refuses to overwrite it.
    let e = quantize_model(&src, &QuantSpec::new(Format::Nvfp4), &out, &NoProgress)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
}

/// tiny-llama split into two shards, with layer 0's q_proj and k_proj in different files.
fn sharded_tiny_llama(dir: &Path) {
    let src = fixture("tiny-llama");
    let all = raw(&src.join(MODEL_FILE));
    let mut weight_map = serde_json::Map::new();
    let mut shards: [Outputs; 2] = [Vec::new(), Vec::new()];
    for (i, (name, t)) in all.into_iter().enumerate() {
        let file = if name.contains("q_proj") || name.contains("gate_proj") {
            0
        } else if name.contains("k_proj") || name.contains("up_proj") {
            1
        } else {
            i % 2
        };
        weight_map.insert(
            name.clone(),
            format!("model-0000{}-of-00002.safetensors", file + 1).into(),
        );
        shards[file].push((name, OutTensor::Dense(DenseView::from_raw(t))));
    }
    for (i, tensors) in shards.into_iter().enumerate() {
        let p = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        write_safetensors(&p, tensors, Map::new(), &NoProgress).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn sharded_directories_are_read_and_written_shard_by_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir(&input).unwrap();
    sharded_tiny_llama(&input);
    let c = Checkpoint::open(&input).unwrap();
    assert_eq!(c.files().len(), 2);
    assert_eq!(c.entries().len(), 20);
    let q = c.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    let k = c.get("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_ne!(q.file(), k.file(), "the fused group spans both shards");

    let out = tmp.path().join("out");
    let src = ModelSource::from_checkpoint(&c).unwrap();
    quantize_model(&src, &QuantSpec::new(Format::Nvfp4), &out, &NoProgress).unwrap();
    // Same bytes as ModelOpt's single-file export, spread over the same two shard names.
    let mut got = BTreeMap::new();
    for i in 1..=2 {
        got.extend(stored(
            &out.join(format!("model-0000{i}-of-00002.safetensors")),
        ));
    }
    let mut want = stored(&fixture("tiny-llama-nvfp4/model.safetensors"));
    want.retain(|n, _| !n.ends_with(".input_scale"));
    assert_same(&got, &want);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(INDEX_FILE)).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), want.len());
    let c = Checkpoint::open(&out).unwrap();
    assert_eq!(c.files().len(), 2);
    assert!(matches!(
        c.get("model.layers.1.mlp.up_proj.weight"),
        Some(Entry::Quant(_))
    ));

    // An index naming a tensor its shard does not hold.
    let mut bad = index.clone();
    bad["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(out.join(INDEX_FILE), bad.to_string()).unwrap();
    let e = open_err(&out);
    assert!(e.contains("ghost.weight") && e.contains(INDEX_FILE), "{e}");
}

#[test]
fn tensors_from_another_reader_can_be_exported() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(fixture("tiny-qwen3")).unwrap();
    let tensors = ckpt
        .entries()
        .iter()
        .map(|e| {
            let Entry::Dense(d) = e else { panic!() };
            let t =
                candle_core::Tensor::from_vec(d.to_f32().unwrap(), d.shape.clone(), &Device::Cpu)
                    .unwrap();
            (d.name.clone(), t)
        })
        .collect();
    let src =
        ModelSource::from_tensors("gguf", tensors, ckpt.config().unwrap().clone(), vec![]).unwrap();
    let out = dir.path().join("fp4");
    let mut spec = QuantSpec::new(Format::Fp4);
    spec.block_size = 128;
    let s = quantize_model(&src, &spec, &out, &NoProgress).unwrap();
    assert_eq!(s.quantized.len(), 14);
    let c = Checkpoint::open(&out).unwrap();
    let q = quant(&c, "model.layers.1.self_attn.o_proj.weight");
    assert_eq!(
        (q.format, q.block_size, q.layout),
        (Format::Fp4, 128, Layout::Bitsandbytes)
    );
    assert!(matches!(c.get("lm_head.weight"), Some(Entry::Dense(_))));
}
