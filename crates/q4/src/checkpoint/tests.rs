//! Checkpoint tests against the reference fixtures (tests/fixtures, produced by ModelOpt,
//! bitsandbytes, torchao and transformers).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use half::bf16;
use q4_formats::Format;
use serde_json::Map;

use super::safetensors_io::map_file;
use super::test_fixtures::DIR;
use super::*;
use crate::qtensor::{Buffer, QuantSpec};

/// Tensors to write, in order.
type Outputs = Vec<(String, OutTensor)>;

fn fixture(name: &str) -> PathBuf {
    Path::new(DIR).join(name)
}

/// The stored tensors of a file, by name.
fn raw(path: &Path) -> BTreeMap<String, super::safetensors_io::RawTensor> {
    map_file(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect()
}

fn f32s(t: &super::safetensors_io::RawTensor) -> Vec<f32> {
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

#[test]
fn detects_the_layout_of_every_fixture() {
    let counts = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let ok: &[(&str, BTreeMap<String, usize>)] = &[
        ("tiny-llama", counts(&[("dense", 20)])),
        ("tiny-qwen3", counts(&[("dense", 25)])),
        (
            "tiny-llama-nvfp4",
            counts(&[("dense", 6), ("modelopt nvfp4", 14)]),
        ),
        (
            "tiny-qwen3-nf4",
            counts(&[("dense", 11), ("bitsandbytes nf4", 14)]),
        ),
        ("tiny-llama/golden.safetensors", counts(&[("dense", 7)])),
        ("tiny-qwen3/golden.safetensors", counts(&[("dense", 7)])),
        (
            "tiny-llama-nvfp4/golden.safetensors",
            counts(&[("dense", 21)]),
        ),
        (
            "tiny-qwen3-nf4/golden.safetensors",
            counts(&[("dense", 21)]),
        ),
    ];
    for (name, want) in ok {
        let c = Checkpoint::open(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&layouts(&c), want, "{name}");
    }
    // The oracle vector files keep raw U8 codes under their own names (`packed`, `qdata`,
    // `torch_byte`, ...), which no checkpoint layout claims.
    for name in [
        "bnb_fp4_f32_bs64.safetensors",
        "e2m1.safetensors",
        "fp8_e4m3.safetensors",
        "fp8_e8m0.safetensors",
        "mxfp4.safetensors",
        "nf4_bf16_bs128.safetensors",
        "nf4_bf16_bs64.safetensors",
        "nf4_bf16_nested.safetensors",
        "nf4_f32_bs32.safetensors",
        "nf4_f32_bs64.safetensors",
        "nf4_f32_edges.safetensors",
        "nf4_f32_tail.safetensors",
        "nvfp4_modelopt.safetensors",
    ] {
        let e = Checkpoint::open(fixture(name)).err().unwrap().to_string();
        assert!(
            e.contains("unknown layout") && e.contains(name),
            "{name}: {e}"
        );
    }
    let nv = Checkpoint::open(fixture("tiny-llama-nvfp4")).unwrap();
    let d = nv.declared().unwrap();
    assert_eq!(
        (d.method.as_str(), d.layout()),
        ("modelopt", Some(Layout::ModelOpt))
    );
    let bnb = Checkpoint::open(fixture("tiny-qwen3-nf4")).unwrap();
    assert_eq!(bnb.declared().unwrap().layout(), Some(Layout::Bitsandbytes));
}

#[test]
fn modelopt_export_dequantizes_like_modelopt() {
    let c = Checkpoint::open(fixture("tiny-llama-nvfp4")).unwrap();
    let golden = raw(&fixture("tiny-llama-nvfp4/golden.safetensors"));
    let mut n = 0;
    for e in c.entries() {
        let Entry::Quant(q) = e else { continue };
        let want = f32s(&golden[&format!("dequant.{}", q.name)]);
        assert_bits_eq(&q.dequantize::<f32>(), &want, &q.name);
        let want_bf16: Vec<u16> = want.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let got_bf16: Vec<u16> = q.dequantize::<bf16>().iter().map(|x| x.to_bits()).collect();
        assert_eq!(got_bf16, want_bf16, "{}", q.name);
        // The owned q4-formats struct decodes the same.
        let crate::qtensor::Quantized::Nvfp4(t) = q.to_formats().unwrap() else {
            panic!()
        };
        assert_bits_eq(&t.dequantize::<f32>().unwrap(), &want, &q.name);
        assert!(q.input_scale.is_some() && q.tensor_scale.is_some());
        assert_eq!(q.members.len(), 4);
        n += 1;
    }
    assert_eq!(n, 14);
}

#[test]
fn bitsandbytes_checkpoint_dequantizes_like_bitsandbytes() {
    let c = Checkpoint::open(fixture("tiny-qwen3-nf4")).unwrap();
    let golden = raw(&fixture("tiny-qwen3-nf4/golden.safetensors"));
    let mut n = 0;
    for e in c.entries() {
        let Entry::Quant(q) = e else { continue };
        assert_eq!((q.format, q.block_size), (Format::Nf4, 64));
        assert!(matches!(
            &q.scales,
            ScaleData::Absmax {
                nested: Some(_),
                ..
            }
        ));
        let want = f32s(&golden[&format!("dequant.{}", q.name)]);
        assert_bits_eq(&q.dequantize::<f32>(), &want, &q.name);
        let crate::qtensor::Quantized::Bnb(t) = q.to_formats().unwrap() else {
            panic!()
        };
        assert_bits_eq(&t.dequantize::<f32>().unwrap(), &want, &q.name);
        n += 1;
    }
    assert_eq!(n, 14);
}

#[test]
fn to_qtensor_uses_the_mapped_bytes() {
    let c = Checkpoint::open(fixture("tiny-llama-nvfp4")).unwrap();
    let q = quant(&c, "model.layers.0.self_attn.q_proj.weight");
    let t = q.to_qtensor(&Device::Cpu).unwrap();
    let (Buffer::Host(codes), _) = t.buffers() else {
        panic!("host")
    };
    assert!(codes.is_mapped());
    assert_eq!(codes.as_ptr(), q.codes.as_ptr(), "no copy");
    assert_eq!(t.shape().dims(), &[64, 64]);
    let dense: Vec<f32> = t
        .dequantize(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_bits_eq(&dense, &q.dequantize::<f32>(), &q.name);

    let c = Checkpoint::open(fixture("tiny-qwen3-nf4")).unwrap();
    let q = quant(&c, "model.layers.1.mlp.down_proj.weight");
    let t = q.to_qtensor(&Device::Cpu).unwrap();
    assert_eq!(t.format(), Format::Nf4);
    assert_eq!(t.shape().dims(), &[64, 128]);
}

#[test]
fn gpt_oss_blocks_decode_like_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("mxfp4.safetensors");
    let p = dir.path().join("experts.safetensors");
    extract(
        &src,
        &[
            ("experts.down_proj_blocks", "gpt_oss.down_proj_blocks"),
            ("experts.down_proj_scales", "gpt_oss.down_proj_scales"),
            // The original gpt-oss spelling, with extreme scale bytes.
            ("block.0.mlp.mlp2_weight.blocks", "gpt_oss_raw.blocks"),
            ("block.0.mlp.mlp2_weight.scales", "gpt_oss_raw.scales"),
        ],
        &p,
    );
    let c = Checkpoint::open(&p).unwrap();
    let all = raw(&src);
    for (name, decoded) in [
        ("experts.down_proj", "gpt_oss.down_proj_decoded_f32"),
        ("block.0.mlp.mlp2_weight", "gpt_oss_raw.decoded_f32"),
    ] {
        let q = quant(&c, name);
        assert_eq!((q.layout, q.format), (Layout::GptOss, Format::Mxfp4));
        let want = &all[decoded];
        // transformers returns [E, in, out]; the checkpoint rows are [E, out, in].
        let (e, k, o) = (want.shape[0], want.shape[1], want.shape[2]);
        assert_eq!(q.shape, vec![e, o, k]);
        let want = f32s(want);
        let got = q.dequantize::<f32>();
        let mut transposed = vec![0f32; got.len()];
        for x in 0..e {
            for r in 0..o {
                for i in 0..k {
                    transposed[(x * k + i) * o + r] = got[(x * o + r) * k + i];
                }
            }
        }
        assert_bits_eq(&transposed, &want, name);
    }
}

#[test]
fn nvfp4_vectors_in_modelopt_naming_decode_like_modelopt() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("nvfp4_modelopt.safetensors");
    for case in ["f32", "bf16", "edge"] {
        let p = dir.path().join(format!("{case}.safetensors"));
        let names = ["weight", "weight_scale", "weight_scale_2"]
            .map(|s| (format!("lin.{s}"), format!("{case}.{s}")));
        let pick: Vec<(&str, &str)> = names
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        extract(&src, &pick, &p);
        let c = Checkpoint::open(&p).unwrap();
        let q = quant(&c, "lin.weight");
        let want = f32s(&raw(&src)[&format!("{case}.dequant")]);
        assert_bits_eq(&q.dequantize::<f32>(), &want, case);
    }
}

#[test]
fn bnb_vectors_in_checkpoint_naming_decode_like_bitsandbytes() {
    let dir = tempfile::tempdir().unwrap();
    for (file, nested) in [
        ("nf4_f32_bs64.safetensors", false),
        ("nf4_f32_tail.safetensors", false),
        ("nf4_f32_edges.safetensors", false),
        ("nf4_bf16_bs128.safetensors", false),
        ("bnb_fp4_f32_bs64.safetensors", false),
        ("nf4_bf16_nested.safetensors", true),
    ] {
        let src = fixture(file);
        let all = raw(&src);
        let json = String::from_utf8(all["quant_state_json"].bytes.to_vec()).unwrap();
        let kind = if json.contains("\"fp4\"") {
            "fp4"
        } else {
            "nf4"
        };
        let state = format!("w.quant_state.bitsandbytes__{kind}");
        let mut pick = vec![
            ("w", "packed"),
            ("w.absmax", "absmax"),
            ("w.quant_map", "quant_map"),
            (state.as_str(), "quant_state_json"),
        ];
        if nested {
            pick.push(("w.nested_absmax", "nested_absmax"));
            pick.push(("w.nested_quant_map", "nested_quant_map"));
        }
        let p = dir.path().join(file);
        extract(&src, &pick, &p);
        let c = Checkpoint::open(&p).unwrap();
        let q = quant(&c, "w");
        assert_eq!(q.shape, all["input"].shape, "{file}");
        assert_bits_eq(&q.dequantize::<f32>(), &f32s(&all["dequant_f32"]), file);
        if let Some(want) = all.get("dequant_bf16") {
            let want: Vec<u16> = bytemuck::pod_collect_to_vec(&want.bytes);
            let got: Vec<u16> = q.dequantize::<bf16>().iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "{file}");
        }
    }
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

#[test]
fn inconsistent_quantization_state_is_an_error_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let w = "model.layers.0.mlp.down_proj.weight";
    let p = modelopt_variant(dir.path(), |t| {
        t.retain(|(n, _)| *n != format!("{w}_scale"))
    });
    let e = open_err(&p);
    assert!(
        e.contains("bad.safetensors") && e.contains(w) && e.contains("missing"),
        "{e}"
    );

    let p = modelopt_variant(dir.path(), |t| {
        t.retain(|(n, _)| *n != format!("{w}_scale_2"))
    });
    let e = open_err(&p);
    assert!(
        e.contains(&format!("{w}_scale_2")) && e.contains("missing"),
        "{e}"
    );

    // A block-scale tensor of the wrong shape.
    let p = modelopt_variant(dir.path(), |t| {
        for (n, x) in t.iter_mut() {
            if *n == format!("{w}_scale") {
                let OutTensor::Dense(d) = x else { panic!() };
                d.shape = vec![d.shape[1], d.shape[0]];
            }
        }
    });
    let e = open_err(&p);
    assert!(
        e.contains(&format!("{w}_scale")) && e.contains("does not match"),
        "{e}"
    );

    // A tensor scale of the wrong dtype.
    let p = modelopt_variant(dir.path(), |t| {
        for (n, x) in t.iter_mut() {
            if *n == format!("{w}_scale_2") {
                let OutTensor::Dense(d) = x else { panic!() };
                d.dtype = Dtype::I32;
            }
        }
    });
    let e = open_err(&p);
    assert!(e.contains("dtype F32") && e.contains("found I32"), "{e}");

    // A lone E4M3 scale and a lone U8 tensor: unknown layouts.
    let p = modelopt_variant(dir.path(), |t| {
        t.retain(|(n, _)| !n.starts_with(w) || n.ends_with("_scale"));
    });
    let e = open_err(&p);
    assert!(
        e.contains("unknown layout") && e.contains(&format!("{w}_scale")),
        "{e}"
    );
    let p = modelopt_variant(dir.path(), |t| {
        t.retain(|(n, _)| !n.starts_with(w) || *n == w);
    });
    let e = open_err(&p);
    assert!(e.contains("unknown layout") && e.contains(w), "{e}");
}

#[test]
fn bitsandbytes_state_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-qwen3-nf4/model.safetensors");
    let w = "model.layers.0.self_attn.k_proj.weight";
    let variant = |edit: &dyn Fn(&mut Outputs)| {
        let mut tensors: Vec<(String, OutTensor)> = raw(&src)
            .into_values()
            .map(|t| (t.name.clone(), OutTensor::Dense(DenseView::from_raw(t))))
            .collect();
        edit(&mut tensors);
        let p = dir.path().join("bad.safetensors");
        write_safetensors(&p, tensors, Map::new(), &NoProgress).unwrap();
        open_err(&p)
    };
    let e = variant(&|t| t.retain(|(n, _)| *n != format!("{w}.nested_absmax")));
    assert!(e.contains("nested_absmax") && e.contains("missing"), "{e}");
    // An FP4 codebook under an NF4 quant state.
    let e = variant(&|t| {
        for (n, x) in t.iter_mut() {
            if *n == format!("{w}.quant_map") {
                let OutTensor::Dense(d) = x else { panic!() };
                d.data = crate::HostBytes::owned(super::dense::bytes_of(
                    q4_formats::bnb::BnbKind::Fp4.codebook(),
                ));
            }
        }
    });
    assert!(e.contains("quant_map") && e.contains("nf4 codebook"), "{e}");
    let e = variant(&|t| t.retain(|(n, _)| !n.starts_with(&format!("{w}.quant_state"))));
    assert!(e.contains("unknown layout"), "{e}");
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
fn compressed_tensors_nvfp4_is_read_with_reciprocal_scales() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-llama-nvfp4/model.safetensors");
    let mut tensors: Outputs = Vec::new();
    for (name, t) in raw(&src) {
        let mut d = DenseView::from_raw(t);
        let reciprocal = |d: &mut DenseView| {
            let v = 1.0 / f32::from_le_bytes(d.data[..4].try_into().unwrap());
            d.data = crate::HostBytes::owned(v.to_le_bytes().to_vec());
        };
        let renamed = if let Some(p) = name.strip_suffix(".weight_scale_2") {
            reciprocal(&mut d);
            format!("{p}.weight_global_scale")
        } else if let Some(p) = name.strip_suffix(".input_scale") {
            reciprocal(&mut d);
            format!("{p}.input_global_scale")
        } else if name.ends_with("_proj.weight") {
            format!("{name}_packed")
        } else {
            name
        };
        d.name = renamed.clone();
        tensors.push((renamed, OutTensor::Dense(d)));
    }
    let p = dir.path().join("ct.safetensors");
    write_safetensors(&p, tensors, Map::new(), &NoProgress).unwrap();
    let ct = Checkpoint::open(&p).unwrap();
    let mo = Checkpoint::open(&src).unwrap();
    assert_eq!(layouts(&ct)["compressed-tensors nvfp4"], 14);
    for e in mo.entries() {
        let Entry::Quant(m) = e else { continue };
        let c = quant(&ct, &m.name);
        assert_eq!((c.layout, &c.shape), (Layout::CompressedTensors, &m.shape));
        assert!(c.codes.is_mapped());
        // compressed-tensors divides by the global scale: within an ulp of ModelOpt's product.
        for (a, b) in c.dequantize::<f32>().iter().zip(m.dequantize::<f32>()) {
            assert!(
                (a - b).abs() <= b.abs() * 2.0 * f32::EPSILON,
                "{}: {a} vs {b}",
                m.name
            );
        }
        let rel = (c.input_scale.unwrap() - m.input_scale.unwrap()).abs() / m.input_scale.unwrap();
        assert!(rel < 1e-6);
    }
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
