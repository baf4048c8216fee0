//! Next-token selection: greedy, or temperature / top-k / top-p sampling with a seeded RNG,
//! after an optional repetition penalty.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings; `temperature <= 0` means greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probabilities add up to `top_p`.
    pub top_p: Option<f64>,
    /// Keep the `top_k` most likely tokens.
    pub top_k: Option<usize>,
    /// HF-style penalty (> 1 discourages repeats); 1.0 is off.
    pub repeat_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("temperature must be >= 0, got {}", self.temperature);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("top-p must be in (0, 1], got {p}");
            }
        }
        if self.top_k == Some(0) {
            bail!("top-k must be at least 1");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            bail!("repeat penalty must be > 0, got {}", self.repeat_penalty);
        }
        Ok(())
    }
}

/// Picks tokens from logits; deterministic for a given seed.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Scratch,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            scratch: Scratch::default(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Next token from `logits` (`[vocab]`), given the ids produced so far (`history`).
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let mut logits: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if logits.is_empty() {
            bail!("cannot sample from empty logits");
        }
        self.apply_repeat_penalty(&mut logits, history);
        if self.params.temperature <= 0.0 {
            return Ok(argmax(&logits));
        }
        Ok(self.sample_from(&logits))
    }

    fn apply_repeat_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repeat_penalty;
        if penalty == 1.0 {
            return;
        }
        let start = history.len().saturating_sub(self.params.repeat_last_n);
        let mut seen = std::collections::HashSet::new();
        for &id in &history[start..] {
            let Some(l) = logits.get_mut(id as usize) else {
                continue;
            };
            if seen.insert(id) {
                *l = if *l >= 0.0 {
                    *l / penalty
                } else {
                    *l * penalty
                };
            }
        }
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature as f32;
        let (ids, probs) = nucleus(
            logits,
            inv_t,
            self.params.top_k,
            self.params.top_p,
            &mut self.scratch,
        );
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (p, &id) in probs.iter().zip(ids) {
            if u < *p {
                return id;
            }
            u -= p;
        }
        *ids.last().expect("at least one candidate")
    }
}

/// Candidate buffers kept across tokens, so a vocabulary-sized sample allocates nothing.
#[derive(Default)]
struct Scratch {
    ids: Vec<u32>,
    probs: Vec<f32>,
}

/// Candidates to sample from and their probabilities (softmax at `1 / inv_t` temperature over
/// the top-k candidates, or all): with top-p, the smallest prefix of the candidates in
/// descending logit order (ties by id) whose probabilities add up to `top_p`, in that order.
///
/// Only that prefix is sorted: the `m` most likely candidates are selected (`O(n)`) and sorted,
/// `m` growing 64, 256, ... until their mass reaches `top_p`. A full sort of a 49k-150k
/// vocabulary per token took ~7% of SmolLM2's CPU decode with the CLI's default top-p.
fn nucleus<'a>(
    logits: &[f32],
    inv_t: f32,
    top_k: Option<usize>,
    top_p: Option<f64>,
    scratch: &'a mut Scratch,
) -> (&'a [u32], &'a [f32]) {
    let by_logit_desc = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let Scratch { ids, probs } = scratch;
    ids.clear();
    ids.extend(0..logits.len() as u32);
    if let Some(k) = top_k.filter(|&k| k < ids.len()) {
        ids.select_nth_unstable_by(k - 1, by_logit_desc);
        ids.truncate(k);
    }
    let max = ids
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max)
        * inv_t;
    let prob = |i: u32| (logits[i as usize] * inv_t - max).exp();
    // Summed in f64: the total does not depend on the (selection-dependent) order of the ids.
    let total = ids.iter().map(|&i| prob(i) as f64).sum::<f64>() as f32;
    let Some(top_p) = top_p else {
        probs.clear();
        probs.extend(ids.iter().map(|&i| prob(i) / total));
        return (ids, probs);
    };
    let n = ids.len();
    let mut m = n.min(64);
    let keep = loop {
        if m < n {
            ids.select_nth_unstable_by(m - 1, by_logit_desc);
        }
        ids[..m].sort_unstable_by(by_logit_desc);
        probs.clear();
        probs.extend(ids[..m].iter().map(|&i| prob(i) / total));
        let mut cum = 0.0f64;
        let reached = probs.iter().position(|p| {
            cum += *p as f64;
            cum >= top_p
        });
        match reached {
            Some(i) => break i + 1,
            None if m == n => break n,
            None => m = n.min(m * 4),
        }
    };
    ids.truncate(keep);
    probs.truncate(keep);
    (ids, probs)
}

/// Index of the largest value (the first one on ties, like `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    // Two passes that vectorize (the maximum, then its first position) instead of one loop
    // carried through `best`: a 152k-entry vocabulary took ~0.1 ms a token that way. NaN is
    // never the maximum.
    let max = v
        .chunks(64)
        .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .fold(f32::NEG_INFINITY, f32::max);
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    proptest::proptest! {
        /// The two-pass argmax picks what a plain first-maximum loop picks (ties included:
        /// values from a small set repeat often).
        #[test]
        fn argmax_agrees_with_a_plain_loop(v in proptest::collection::vec(-4i8..4, 1..300)) {
            let v: Vec<f32> = v.iter().map(|&x| x as f32 * 0.5).collect();
            let mut best = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] {
                    best = i;
                }
            }
            proptest::prop_assert_eq!(argmax(&v), best as u32);
        }
    }

    #[test]
    fn argmax_skips_nan() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, f32::NAN, 3.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&logits(&[0.1, 3.0, 2.0, 3.0]), &[]).unwrap(), 1);
    }

    #[test]
    fn repeat_penalty_changes_the_choice() {
        let p = SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p).unwrap();
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&logits(&[0.1, 3.0, 2.0]), &[1]).unwrap(), 2);
        // negative logits are multiplied
        assert_eq!(s.sample(&logits(&[-1.0, -0.6, -2.0]), &[1]).unwrap(), 0);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            seed: 7,
            ..Default::default()
        };
        let l = logits(&[1.0, 1.1, 0.9, 1.05, -5.0]);
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            (0..200)
                .map(|_| s.sample(&l, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run(p.clone());
        assert_eq!(a, run(p.clone()));
        assert!(a.iter().all(|&i| i == 1 || i == 3), "{a:?}");
        assert!(a.contains(&1) && a.contains(&3));
        let b = run(SamplingParams { seed: 8, ..p });
        assert_ne!(a, b);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: Some(0.5),
            ..Default::default()
        };
        let mut s = Sampler::new(p).unwrap();
        // p(0) ~ 0.84: the nucleus is token 0 alone.
        let l = logits(&[3.0, 1.0, 0.5, 0.0]);
        assert!((0..100).all(|_| s.sample(&l, &[]).unwrap() == 0));
    }

    /// The nucleus as a full sort computes it: every candidate sorted by descending logit (ties
    /// by id), the top-k of them, then the shortest prefix reaching `top_p`.
    fn full_sort_nucleus(
        logits: &[f32],
        inv_t: f32,
        top_k: Option<usize>,
        top_p: f64,
    ) -> (Vec<u32>, Vec<f32>) {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        ids.truncate(top_k.unwrap_or(ids.len()));
        let max = logits[ids[0] as usize] * inv_t;
        let e: Vec<f32> = ids
            .iter()
            .map(|&i| (logits[i as usize] * inv_t - max).exp())
            .collect();
        let total = e.iter().map(|&v| v as f64).sum::<f64>() as f32;
        let probs: Vec<f32> = e.iter().map(|v| v / total).collect();
        let mut cum = 0.0f64;
        let keep = probs
            .iter()
            .position(|p| {
                cum += *p as f64;
                cum >= top_p
            })
            .map_or(ids.len(), |i| i + 1);
        (ids[..keep].to_vec(), probs[..keep].to_vec())
    }

    use proptest::prelude::*;

    proptest! {
        /// The partial-selection nucleus equals the full sort's: same ids in the same order and
        /// the same probabilities, across vocabularies that need one, two or three rounds of
        /// selection, with ties, with and without top-k.
        #[test]
        fn nucleus_equals_the_full_sort(
            logits in prop::collection::vec(
                prop_oneof![
                    (-40i32..40).prop_map(|v| v as f32 / 4.0),
                    -20f32..20.0,
                ],
                1..1200,
            ),
            top_p in 0.01f64..=1.0,
            top_k in prop::option::of(1usize..400),
            temperature in 0.2f32..2.0,
        ) {
            let inv_t = 1.0 / temperature;
            let mut scratch = Scratch::default();
            let (ids, probs) = nucleus(&logits, inv_t, top_k, Some(top_p), &mut scratch);
            let (want_ids, want_probs) = full_sort_nucleus(&logits, inv_t, top_k, top_p);
            prop_assert_eq!(ids, &want_ids[..]);
            prop_assert_eq!(probs, &want_probs[..]);
        }
    }

    #[test]
    fn bad_params_are_rejected() {
        let p = SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(Sampler::new(p).is_err());
    }
}
