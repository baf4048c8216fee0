//! Byte-for-byte agreement with the oracle vectors produced by the reference packages
//! (bitsandbytes 0.50.2, ModelOpt 0.47, torchao 0.18, torch 2.15, ml_dtypes 0.6, transformers).

use half::bf16;
use q4_formats::bnb::{self, Absmax, BnbKind, BnbOptions, BnbTensor, NestedAbsmax, NestedRounding};
use q4_formats::mxfp4::{self, Mxfp4Options, Mxfp4Tensor, ScaleRule};
use q4_formats::nvfp4::{self, Nvfp4Options, Nvfp4Tensor};
use q4_formats::scalar::{e2m1_decode, e2m1_encode, e4m3, e8m0, SignRule};
use safetensors::{Dtype, SafeTensors};

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn open(name: &str) -> Fixture {
        let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        Fixture {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn has(&self, key: &str) -> bool {
        self.st().tensor(key).is_ok()
    }
    fn shape(&self, key: &str) -> Vec<usize> {
        self.st().tensor(key).unwrap().shape().to_vec()
    }
    fn dtype(&self, key: &str) -> Dtype {
        self.st().tensor(key).unwrap().dtype()
    }
    fn u8(&self, key: &str) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("missing {key}"));
        t.data().to_vec()
    }
    fn f32(&self, key: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("missing {key}"));
        match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes(c.try_into().unwrap()) as u32) << 16))
                .collect(),
            d => panic!("{key}: unexpected dtype {d:?}"),
        }
    }
    fn bf16(&self, key: &str) -> Vec<bf16> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::BF16, "{key}");
        t.data()
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())))
            .collect()
    }
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ, first at {}: got {} want {}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} bytes differ, first at {}: got {:#04x} want {:#04x}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

#[test]
fn e4m3_encode_decode_matches_torch_and_ml_dtypes() {
    let f = Fixture::open("fp8_e4m3.safetensors");
    let input = f.f32("input");
    let torch = f.u8("torch_byte");
    let ml = f.u8("ml_dtypes_byte");
    let ours: Vec<u8> = input.iter().map(|&x| e4m3::encode(x)).collect();
    assert_bytes_eq("torch (saturating)", &ours, &torch);
    let ours: Vec<u8> = input
        .iter()
        .map(|&x| e4m3::encode_nonsaturating(x))
        .collect();
    assert_bytes_eq("ml_dtypes (non-saturating)", &ours, &ml);
    let decoded: Vec<f32> = f
        .u8("decode_byte")
        .iter()
        .map(|&b| e4m3::decode(b))
        .collect();
    for (name, want) in [
        ("torch_decode", f.f32("torch_decode")),
        ("ml_dtypes_decode", f.f32("ml_dtypes_decode")),
    ] {
        for (i, (g, w)) in decoded.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{name}[{i}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn e8m0_casts_match_torch_and_ml_dtypes() {
    let f = Fixture::open("fp8_e8m0.safetensors");
    for (inp, t, m) in [
        ("input", "torch_byte", "ml_dtypes_byte"),
        (
            "special_input",
            "special_torch_byte",
            "special_ml_dtypes_byte",
        ),
    ] {
        let input = f.f32(inp);
        let ours: Vec<u8> = input.iter().map(|&x| e8m0::from_f32_torch(x)).collect();
        assert_bytes_eq(t, &ours, &f.u8(t));
        let ours: Vec<u8> = input.iter().map(|&x| e8m0::from_f32_ml_dtypes(x)).collect();
        assert_bytes_eq(m, &ours, &f.u8(m));
    }
    let decoded: Vec<f32> = f
        .u8("decode_byte")
        .iter()
        .map(|&b| e8m0::decode(b))
        .collect();
    for want in [f.f32("torch_decode"), f.f32("ml_dtypes_decode")] {
        for (g, w) in decoded.iter().zip(&want) {
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()));
        }
    }
}

#[test]
fn e2m1_encode_decode_matches_every_reference() {
    let f = Fixture::open("e2m1.safetensors");
    let input = f.f32("input");
    let sign_bit: Vec<u8> = input
        .iter()
        .map(|&x| e2m1_encode(x, SignRule::SignBit))
        .collect();
    assert_bytes_eq("torchao", &sign_bit, &f.u8("torchao_code"));
    assert_bytes_eq("ml_dtypes", &sign_bit, &f.u8("ml_dtypes_code"));
    let negative: Vec<u8> = input
        .iter()
        .map(|&x| e2m1_encode(x, SignRule::Negative))
        .collect();
    assert_bytes_eq("modelopt", &negative, &f.u8("modelopt_nvfp4_code"));
    let decoded: Vec<f32> = f
        .u8("decode_code")
        .iter()
        .map(|&c| e2m1_decode(c))
        .collect();
    assert_bits_eq("torchao_decode", &decoded, &f.f32("torchao_decode"));
    assert_bits_eq("ml_dtypes_decode", &decoded, &f.f32("ml_dtypes_decode"));
}

/// Block size from the stored quant_state JSON.
fn json_field(json: &str, key: &str) -> String {
    let i = json
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("{key} in {json}"))
        + key.len()
        + 4;
    json[i..]
        .split([',', '}'])
        .next()
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_string()
}

fn check_bnb(file: &str) {
    let f = Fixture::open(file);
    let json = String::from_utf8(f.u8("quant_state_json")).unwrap();
    let kind = if json_field(&json, "quant_type") == "nf4" {
        BnbKind::Nf4
    } else {
        BnbKind::Fp4
    };
    let block_size: usize = json_field(&json, "blocksize").parse().unwrap();
    let nested = f.has("nested_absmax");
    let shape = f.shape("input");
    let opts = BnbOptions {
        kind,
        block_size,
        double_quant: nested,
        nested_rounding: NestedRounding::CpuLut,
        ..BnbOptions::nf4()
    };
    let q = if f.dtype("input") == Dtype::BF16 {
        bnb::quantize(&f.bf16("input"), &opts).unwrap()
    } else {
        bnb::quantize(&f.f32("input"), &opts).unwrap()
    };
    assert_bytes_eq(&format!("{file} packed"), &q.packed, &f.u8("packed"));
    assert_bits_eq(
        &format!("{file} quant_map"),
        kind.codebook(),
        &f.f32("quant_map"),
    );
    match &q.absmax {
        Absmax::Plain(a) => assert_bits_eq(&format!("{file} absmax"), a, &f.f32("absmax")),
        Absmax::Nested(n) => {
            assert_bits_eq(&format!("{file} offset"), &[n.offset], &f.f32("offset"));
            assert_bits_eq(
                &format!("{file} nested_absmax"),
                &n.nested_absmax,
                &f.f32("nested_absmax"),
            );
            assert_bytes_eq(&format!("{file} absmax codes"), &n.codes, &f.u8("absmax"));
            assert_bits_eq(
                &format!("{file} nested_quant_map"),
                &n.code_map,
                &f.f32("nested_quant_map"),
            );
            assert_bits_eq(
                &format!("{file} absmax_dequant"),
                &n.dequantize().unwrap(),
                &f.f32("absmax_dequant"),
            );
        }
    }
    let dtype = if f.dtype("input") == Dtype::BF16 {
        "bfloat16"
    } else {
        "float32"
    };
    assert_eq!(
        bnb::quant_state_json(&q, dtype, &shape),
        json,
        "{file} quant_state JSON"
    );

    // Decoding the *stored* tensors (not ours) reproduces the reference dequantization.
    let absmax = if nested {
        Absmax::Nested(NestedAbsmax {
            codes: f.u8("absmax"),
            nested_absmax: f.f32("nested_absmax"),
            offset: f.f32("offset")[0],
            code_map: f.f32("nested_quant_map"),
            block_size: 256,
        })
    } else {
        Absmax::Plain(f.f32("absmax"))
    };
    let stored = BnbTensor {
        kind,
        block_size,
        numel: shape.iter().product(),
        packed: f.u8("packed"),
        absmax,
    };
    assert_bits_eq(
        &format!("{file} dequant_f32"),
        &stored.dequantize::<f32>().unwrap(),
        &f.f32("dequant_f32"),
    );
    if f.has("dequant_bf16") {
        let ours: Vec<bf16> = stored.dequantize().unwrap();
        let want = f.bf16("dequant_bf16");
        assert!(
            ours.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{file} dequant_bf16"
        );
    }
}

#[test]
fn nf4_f32_bs64() {
    check_bnb("nf4_f32_bs64.safetensors");
}
#[test]
fn nf4_f32_bs32() {
    check_bnb("nf4_f32_bs32.safetensors");
}
#[test]
fn nf4_bf16_bs64() {
    check_bnb("nf4_bf16_bs64.safetensors");
}
#[test]
fn nf4_bf16_bs128() {
    check_bnb("nf4_bf16_bs128.safetensors");
}
#[test]
fn nf4_f32_tail() {
    check_bnb("nf4_f32_tail.safetensors");
}
#[test]
fn nf4_f32_edges() {
    check_bnb("nf4_f32_edges.safetensors");
}
#[test]
fn nf4_bf16_nested() {
    check_bnb("nf4_bf16_nested.safetensors");
}
#[test]
fn bnb_fp4_f32_bs64() {
    check_bnb("bnb_fp4_f32_bs64.safetensors");
}

#[test]
fn nested_exact_rounding_differs_from_cpu_lut_only_by_one_code_step() {
    let f = Fixture::open("nf4_bf16_nested.safetensors");
    let q = bnb::quantize(
        &f.bf16("input"),
        &BnbOptions {
            double_quant: true,
            ..BnbOptions::nf4()
        },
    )
    .unwrap();
    let Absmax::Nested(n) = &q.absmax else {
        panic!()
    };
    let stored = f.u8("absmax");
    let diffs: Vec<(u8, u8)> = n
        .codes
        .iter()
        .zip(&stored)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (*a, *b))
        .collect();
    // The CPU table's 2/65535-wide bins misplace values near the closely spaced entries around 0.
    assert!(
        diffs.len() * 100 <= stored.len(),
        "too many differences: {diffs:?}"
    );
    assert!(diffs.iter().all(|(a, b)| a.abs_diff(*b) == 1), "{diffs:?}");
}

fn check_nvfp4(case: &str) {
    let f = Fixture::open("nvfp4_modelopt.safetensors");
    let key = |k: &str| format!("{case}.{k}");
    let shape = f.shape(&key("input"));
    let cols = *shape.last().unwrap();
    let q = if f.dtype(&key("input")) == Dtype::BF16 {
        nvfp4::quantize(&f.bf16(&key("input")), cols, &Nvfp4Options::default()).unwrap()
    } else {
        nvfp4::quantize(&f.f32(&key("input")), cols, &Nvfp4Options::default()).unwrap()
    };
    assert_bits_eq(
        &key("weight_scale_2"),
        &[q.scale2],
        &f.f32(&key("weight_scale_2")),
    );
    assert_bytes_eq(&key("weight_scale"), &q.scales, &f.u8(&key("weight_scale")));
    assert_bytes_eq(&key("weight"), &q.packed, &f.u8(&key("weight")));
    let stored = Nvfp4Tensor {
        rows: q.rows,
        cols,
        packed: f.u8(&key("weight")),
        scales: f.u8(&key("weight_scale")),
        scale2: f.f32(&key("weight_scale_2"))[0],
    };
    assert_bits_eq(
        &key("dequant"),
        &stored.dequantize::<f32>().unwrap(),
        &f.f32(&key("dequant")),
    );
}

#[test]
fn nvfp4_modelopt_f32() {
    check_nvfp4("f32");
}
#[test]
fn nvfp4_modelopt_bf16() {
    check_nvfp4("bf16");
}
#[test]
fn nvfp4_modelopt_edge() {
    check_nvfp4("edge");
}

#[test]
fn nvfp4_swizzled_scales_match_torchao_to_blocked() {
    let f = Fixture::open("nvfp4_modelopt.safetensors");
    let shape = f.shape("swizzle.scale_linear");
    let linear = f.u8("swizzle.scale_linear");
    let z = nvfp4::swizzle_scales(&linear, shape[0], shape[1]);
    assert_bytes_eq("to_blocked", &z, &f.u8("swizzle.scale_blocked"));
    assert_bytes_eq("is_swizzled_scales", &z, &f.u8("swizzle.scale_blocked_2d"));
}

fn check_mxfp4(case: &str, rule: ScaleRule) {
    let f = Fixture::open("mxfp4.safetensors");
    let key = |k: &str| format!("{case}.{}.{k}", rule.name());
    let input = format!("{case}.input");
    let cols = *f.shape(&input).last().unwrap();
    let opts = Mxfp4Options {
        rule,
        ..Default::default()
    };
    let q = if f.dtype(&input) == Dtype::BF16 {
        mxfp4::quantize(&f.bf16(&input), cols, &opts).unwrap()
    } else {
        mxfp4::quantize(&f.f32(&input), cols, &opts).unwrap()
    };
    assert_bytes_eq(&key("scale"), &q.scales, &f.u8(&key("scale")));
    assert_bytes_eq(&key("qdata"), &q.packed, &f.u8(&key("qdata")));
    let stored = Mxfp4Tensor {
        rows: q.rows,
        cols,
        packed: f.u8(&key("qdata")),
        scales: f.u8(&key("scale")),
    };
    assert_bits_eq(
        &key("dequant"),
        &stored.dequantize::<f32>().unwrap(),
        &f.f32(&key("dequant")),
    );
}

#[test]
fn mxfp4_torchao_every_case_and_rule() {
    for case in ["f32", "bf16", "edge"] {
        for rule in [ScaleRule::Rceil, ScaleRule::Floor, ScaleRule::Even] {
            check_mxfp4(case, rule);
        }
    }
}

/// transformers' `_convert_moe_packed_tensors`: decode then transpose `[E, out, in] -> [E, in, out]`.
fn gpt_oss_decode(blocks: &[u8], scales: &[u8], shape: &[usize]) -> Vec<f32> {
    let (e, out) = (shape[0], shape[1]);
    let k = shape[2] * shape[3] * 2;
    let t = Mxfp4Tensor {
        rows: e * out,
        cols: k,
        packed: blocks.to_vec(),
        scales: scales.to_vec(),
    };
    let dense: Vec<f32> = t.dequantize().unwrap();
    let mut tr = vec![0f32; dense.len()];
    for x in 0..e {
        for o in 0..out {
            for i in 0..k {
                tr[(x * k + i) * out + o] = dense[(x * out + o) * k + i];
            }
        }
    }
    tr
}

#[test]
fn gpt_oss_layout_decodes_like_transformers() {
    let f = Fixture::open("mxfp4.safetensors");
    let shape = f.shape("gpt_oss.down_proj_blocks");
    let blocks = f.u8("gpt_oss.down_proj_blocks");
    let scales = f.u8("gpt_oss.down_proj_scales");
    assert_bits_eq(
        "decoded_f32",
        &gpt_oss_decode(&blocks, &scales, &shape),
        &f.f32("gpt_oss.down_proj_decoded_f32"),
    );
    let bf: Vec<f32> = gpt_oss_decode(&blocks, &scales, &shape)
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect();
    assert_bits_eq(
        "decoded_bf16",
        &bf,
        &f.f32("gpt_oss.down_proj_decoded_bf16"),
    );
    // Re-quantizing the source with RCEIL gives the stored blocks.
    let src = f.bf16("gpt_oss.source_weight");
    let k = f.shape("gpt_oss.source_weight")[2];
    let q = mxfp4::quantize(&src, k, &Mxfp4Options::default()).unwrap();
    assert_bytes_eq("down_proj_blocks", &q.packed, &blocks);
    assert_bytes_eq("down_proj_scales", &q.scales, &scales);
    let raw_shape = f.shape("gpt_oss_raw.blocks");
    let raw = gpt_oss_decode(
        &f.u8("gpt_oss_raw.blocks"),
        &f.u8("gpt_oss_raw.scales"),
        &raw_shape,
    );
    assert_bits_eq("raw decoded", &raw, &f.f32("gpt_oss_raw.decoded_f32"));
}
