//! Reading: layout detection, bit-exact decoding, zero-copy views, bad quantization state.

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use half::bf16;
use q4_formats::Format;
use serde_json::Map;

use super::*;
use crate::qtensor::Buffer;

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
