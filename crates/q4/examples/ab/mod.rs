//! The same-process A/B harness the `ab_*` examples share: calls of two variants alternate, each
//! on the next of many weight copies (cache-cold), so the host's noise hits both alike.

/// `OUTxIN` as `(out, in)`.
pub fn parse_shape(s: &str) -> (usize, usize) {
    let (n, k) = s.split_once('x').expect("shape as OUTxIN");
    (n.parse().expect("OUT"), k.parse().expect("IN"))
}

/// Runs `rounds` rounds of `call(copy)` under `select(true)` then `select(false)`, each call on
/// the next copy (`copies` of them), leaves `select(true)` in force, and returns the median µs
/// per call of each variant, the first `warmup` rounds not counted (at least one round is).
pub fn interleave(
    rounds: usize,
    warmup: usize,
    copies: usize,
    select: &dyn Fn(bool),
    call: &dyn Fn(usize),
) -> (f64, f64) {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..rounds.max(warmup + 1) {
        for (flag, times) in [(true, &mut on), (false, &mut off)] {
            select(flag);
            let t = std::time::Instant::now();
            call((2 * i + usize::from(flag)) % copies);
            if i >= warmup {
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    select(true);
    (median(&mut on), median(&mut off))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bytes of weight copies a cache-cold rotation covers: three times the last-level cache the OS
/// reports (hundreds of MiB on some servers), or 96 MiB where it reports none.
#[allow(dead_code)] // not every example that includes this module uses it
pub fn cold_rotation_bytes() -> usize {
    3 * (q4::probe::last_level_cache_mib() << 20)
}

/// The command line the cache-cold A/B examples share: `[SHAPES [BATCHES [ROUNDS [LLC_MIB]]]]`.
#[allow(dead_code)] // not every example that includes this module uses it
pub struct ColdArgs {
    pub shapes: String,
    pub batches: Vec<usize>,
    pub rounds: usize,
    pub llc_mib: usize,
}

#[allow(dead_code)]
impl ColdArgs {
    /// From the process arguments, with these defaults for the first two.
    pub fn parse(shapes: &str, batches: &str) -> ColdArgs {
        let args: Vec<String> = std::env::args().collect();
        ColdArgs {
            shapes: args.get(1).map_or(shapes, |s| s.as_str()).to_string(),
            batches: args
                .get(2)
                .map_or(batches, |s| s.as_str())
                .split(',')
                .map(|b| b.parse().expect("batch"))
                .collect(),
            rounds: args.get(3).and_then(|v| v.parse().ok()).unwrap_or(200),
            // Default: the last-level cache the OS reports (hundreds of MiB on some servers).
            llc_mib: args
                .get(4)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(q4::probe::last_level_cache_mib),
        }
    }

    /// For every shape, format and batch: the median µs of `select(true)` against
    /// `select(false)` on weight copies rotating over 3 x `llc_mib` of memory, one printed row
    /// each under a header naming the two variants.
    pub fn run(&self, formats: &[q4::Format], names: (&str, &str), select: &dyn Fn(bool)) {
        self.run_layers(formats, names, select, &|q| {
            q4::QLinear::new(q, None).unwrap()
        });
    }

    /// [`ColdArgs::run`] on W4A8 layers (int8 activations) of each weight copy.
    pub fn run_w4a8(&self, formats: &[q4::Format], names: (&str, &str), select: &dyn Fn(bool)) {
        self.run_layers(formats, names, select, &|q| {
            q4::QLinear::new(q, None)
                .unwrap()
                .with_act_quant(q4::qlinear::ActQuant::Int8)
                .unwrap()
        });
    }

    /// [`ColdArgs::run`] on the layers `layer` makes of each weight copy (a mode, W4A8, ...).
    pub fn run_layers(
        &self,
        formats: &[q4::Format],
        names: (&str, &str),
        select: &dyn Fn(bool),
        layer: &dyn Fn(q4::QTensor) -> q4::QLinear,
    ) {
        use candle_core::{Device, Module, Tensor};
        let dev = Device::Cpu;
        let (on, off) = (format!("{}_us", names.0), format!("{}_us", names.1));
        println!("shape        format batch copies  {on:>14} {off:>14}  ratio");
        for shape in self.shapes.split(',') {
            let (n, k) = parse_shape(shape);
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
            for &format in formats {
                let copies = ((3 * self.llc_mib) << 20) / (n * k * 9 / 16) + 1;
                let lins: Vec<q4::QLinear> = (0..copies)
                    .map(|_| {
                        let spec = q4::QuantSpec::new(format);
                        layer(q4::QTensor::quantize(&w, &spec).unwrap())
                    })
                    .collect();
                for &batch in &self.batches {
                    let x = Tensor::randn(0f32, 1.0, (batch, k), &dev).unwrap();
                    let rounds = self.rounds.max(copies);
                    let (a, b) = interleave(rounds, 10, copies, select, &|c| {
                        std::hint::black_box(lins[c].forward(&x).unwrap());
                    });
                    println!(
                        "{shape:<12} {:<6} {batch:>5} {copies:>6} {a:>16.1} {b:>14.1} {:>6.3}",
                        format.name(),
                        a / b
                    );
                }
            }
        }
    }
}
