//! `q4 quantize`: a `.safetensors` file (every floating tensor of rank >= 2, stored under the
//! format's own naming) or an HF model directory (decoder linear weights, written as an HF
//! directory in the ecosystem's layout).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use q4::checkpoint::{quantize_file, quantize_model, Checkpoint, ModelSource, Progress};
use q4::{Format, NonFinite, QuantSpec};
use q4_formats::mxfp4::ScaleRule;

/// Arguments of `q4 quantize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, an HF model directory or a `.gguf` file.
    pub input: PathBuf,
    /// Target format.
    #[arg(long, value_parser = parse_format)]
    pub format: Format,
    /// Block size (NF4/FP4: 32..4096, default 64; NVFP4 is always 16, MXFP4 32).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// NF4/FP4: quantize the absmax statistics too (bitsandbytes double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// MXFP4 shared-exponent rule.
    #[arg(long, value_parser = parse_rule)]
    pub mx_scale: Option<ScaleRule>,
    /// Output `.safetensors` file, or directory for a model directory input.
    #[arg(long)]
    pub out: PathBuf,
    /// NVFP4/MXFP4: zero-pad rows to whole blocks instead of refusing such tensors.
    #[arg(long)]
    pub pad: bool,
    /// Quantize NaN and infinite weights as 0 instead of refusing them.
    #[arg(long)]
    pub allow_non_finite: bool,
    /// Quantize exactly this tensor (repeatable; `.safetensors` input only).
    #[arg(long = "tensor", value_name = "NAME")]
    pub tensors: Vec<String>,
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("unknown format `{s}` (nvfp4, nf4, fp4, mxfp4)"))
}

fn parse_rule(s: &str) -> Result<ScaleRule, String> {
    match s.to_ascii_lowercase().as_str() {
        "rceil" => Ok(ScaleRule::Rceil),
        "floor" => Ok(ScaleRule::Floor),
        _ => Err(format!("unknown MXFP4 scale rule `{s}` (rceil, floor)")),
    }
}

/// q4's errors already carry their whole context in one message.
pub(crate) fn one_line(e: q4::Error) -> anyhow::Error {
    anyhow::Error::msg(e.to_string())
}

/// Writes results to stdout; a closed pipe (`q4 inspect | head`) is not an error.
pub(crate) fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Inputs above this size get a progress bar.
const PROGRESS_MIN_BYTES: u64 = 100 * 1024 * 1024;

/// A progress bar on stderr (hidden when stderr is not a terminal or the input is small).
pub(crate) struct Bar(ProgressBar);

impl Bar {
    pub(crate) fn for_input(bytes: u64) -> Bar {
        let bar = ProgressBar::hidden();
        if bytes > PROGRESS_MIN_BYTES && std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {wide_msg}")
                    .expect("static template"),
            );
        }
        Bar(bar)
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
    }
    fn advance(&self, what: &str, n: u64) {
        self.0.set_message(what.to_string());
        self.0.inc(n);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn spec(a: &Args) -> Result<QuantSpec> {
    let mut spec = QuantSpec::new(a.format);
    let bnb = matches!(a.format, Format::Nf4 | Format::Fp4);
    if let Some(bs) = a.block_size {
        spec.block_size = bs;
    }
    if a.double_quant && !bnb {
        bail!("--double-quant applies to nf4 and fp4 only");
    }
    spec.double_quant = a.double_quant;
    if let Some(rule) = a.mx_scale {
        if a.format != Format::Mxfp4 {
            bail!("--mx-scale applies to mxfp4 only");
        }
        spec.mx_rule = rule;
    }
    if a.pad && bnb {
        bail!(
            "--pad applies to nvfp4 and mxfp4 only (bitsandbytes blocks run over the flat tensor)"
        );
    }
    spec.pad = a.pad;
    if a.allow_non_finite {
        spec.non_finite = NonFinite::Zero;
    }
    Ok(spec)
}

/// GGUF in, HF directory out: the runner's GGUF reader dequantizes every tensor to f32 under
/// HF names, then the export writes them in the format's ecosystem layout.
fn quantize_gguf(args: &Args, spec: &QuantSpec) -> Result<()> {
    if !args.tensors.is_empty() {
        bail!("--tensor applies to a .safetensors file, not to a GGUF model");
    }
    let input = &args.input;
    let model = q4_llm::export::gguf_to_hf(input)
        .with_context(|| format!("cannot read GGUF model {}", input.display()))?;
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let files = q4_llm::export::write_files(scratch.path(), &model.files)?;
    let label = input.display().to_string();
    let src =
        ModelSource::from_tensors(label, model.tensors, model.config, files).map_err(one_line)?;
    let bar = Bar::for_input(std::fs::metadata(input).map(|m| m.len()).unwrap_or(0));
    let s = quantize_model(&src, spec, &args.out, &bar).map_err(one_line)?;
    drop(bar);
    print(&format!(
        "quantized {} tensors to {} and copied {} into {}\n",
        s.quantized.len(),
        spec.format,
        s.copied.len(),
        args.out.display()
    ))
}

pub fn run(args: Args) -> Result<()> {
    let spec = spec(&args)?;
    let input = &args.input;
    if input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return quantize_gguf(&args, &spec);
    }
    let ckpt = Checkpoint::open(input).map_err(one_line)?;
    let bar = Bar::for_input(ckpt.file_bytes());
    let (quantized, copied) = if ckpt.is_dir() {
        if !args.tensors.is_empty() {
            bail!("--tensor applies to a .safetensors file, not to a model directory");
        }
        let src = ModelSource::from_checkpoint(&ckpt).map_err(one_line)?;
        let s = quantize_model(&src, &spec, &args.out, &bar).map_err(one_line)?;
        (s.quantized.len(), s.copied.len())
    } else {
        let only = (!args.tensors.is_empty()).then_some(args.tensors.as_slice());
        let s = quantize_file(&ckpt, &spec, only, &args.out, &bar).map_err(one_line)?;
        (s.quantized.len(), s.copied.len())
    };
    drop(bar);
    print(&format!(
        "quantized {quantized} tensors to {} and copied {copied} into {}\n",
        spec.format,
        args.out.display()
    ))
}
