//! Text generation with a KV cache: greedy, or temperature + top-p
//! (nucleus) sampling, seeded so that a run can be repeated.

use crate::ir::Graph;
use crate::runtime::ComputeDType;
use crate::runtime::{self, CompileOptions, Decoder};
use crate::util::SplitMix64;
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 (or below) is greedy: the most likely token, first on ties.
    pub temperature: f64,
    /// Sample from the smallest set of most likely tokens whose
    /// probabilities sum to at least `top_p` (1 keeps them all).
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(format!(
                "--temperature {} must be 0 (greedy decoding) or positive",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks a token from one row of logits.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if sampling.temperature <= 0.0 || logits.is_empty() {
        return argmax();
    }
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - max) / sampling.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if !(total.is_finite() && total > 0.0) {
        return argmax();
    }
    // Stable sort: equal probabilities keep token order, so a seed repeats.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        mass += p.1 / total;
        kept += 1;
        if mass >= sampling.top_p {
            break;
        }
    }
    let probs = &probs[..kept];
    let kept_total: f64 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.next_f64() * kept_total;
    for &(i, p) in probs {
        if r < p {
            return i as u32;
        }
        r -= p;
    }
    probs[probs.len() - 1].0 as u32
}

/// Continues `prompt` by up to `max_new` tokens, stopping after `eos` (which
/// is not returned). Returns the new tokens only.
pub fn generate(
    graph: &Graph,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    eos: Option<u32>,
    compute: ComputeDType,
) -> Result<Vec<u32>> {
    let mut session = decoder(graph, compute)?;
    generate_with(session.as_mut(), prompt, max_new, sampling, eos)
}

/// A KV-cache decoder for `graph` on the CPU backend, computing in `compute`.
pub fn decoder(graph: &Graph, compute: ComputeDType) -> Result<Box<dyn Decoder + '_>> {
    runtime::backend(runtime::Device::Cpu, None)?.decoder(
        graph,
        &CompileOptions {
            compute,
            training: false,
        },
    )
}

/// [`generate`] on an existing session (reset first), so that repeated
/// generations decode the weights once.
pub fn generate_with(
    session: &mut dyn Decoder,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    sampling.check()?;
    if prompt.is_empty() {
        return Err(Error::invalid(
            "the prompt is empty; generation needs at least one token to continue",
        ));
    }
    session.reset();
    // Generation that does not meet EOS fills the cache to the end: refuse a
    // count whose cache cannot fit rather than fail (or be killed) hours in.
    session.check_room(
        prompt.len().saturating_add(max_new),
        &format!(
            "--max-new-tokens {max_new} after a prompt of {} tokens",
            prompt.len()
        ),
    )?;
    let mut rng = SplitMix64::new(sampling.seed);
    // Not `with_capacity(max_new)`: the count is the user's, the tokens
    // come one by one (and end at EOS).
    let mut out = Vec::new();
    if max_new == 0 {
        return Ok(out);
    }
    let mut logits = session.feed_last(prompt)?;
    loop {
        let next = sample(&logits, sampling, &mut rng);
        if Some(next) == eos {
            break;
        }
        out.push(next);
        if out.len() == max_new {
            break;
        }
        logits = session.feed_last(&[next])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = SplitMix64::new(1);
        assert_eq!(
            sample(&[0.0, 3.0, 3.0, 1.0], &Sampling::greedy(), &mut rng),
            1
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One token holds almost all the mass: top-p 0.5 keeps only it.
        let logits = [0.0f32, 10.0, 0.0, 0.0];
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
        };
        let mut rng = SplitMix64::new(s.seed);
        for _ in 0..50 {
            assert_eq!(sample(&logits, &s, &mut rng), 1);
        }
        // Uniform logits with top-p 1: every token is drawn sometimes.
        let s = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 3,
        };
        let mut seen = [false; 4];
        for _ in 0..200 {
            seen[sample(&[1.0; 4], &s, &mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|&b| b));
    }
}
