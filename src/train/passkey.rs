//! Passkey retrieval, after LongLoRA's `passkey_retrivial.py` (itself from
//! Landmark Attention): a random 5-digit key hidden at a random depth in
//! filler text; the model must repeat it after "The pass key is".

use super::generate::{generate_with, Sampling};
use super::tokenizer::Tokenizer;
use crate::ir::Graph;
use crate::runtime::ComputeDType;
use crate::util::SplitMix64;
use crate::{Error, Result};
use serde::Serialize;

const TASK: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.";
const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = "What is the pass key? The pass key is";

/// One test prompt.
#[derive(Clone, Debug)]
pub struct PasskeyPrompt {
    pub text: String,
    pub tokens: Vec<u32>,
    pub key: u32,
    /// Where the key sits in the filler, 0 (start) to 1 (end).
    pub depth: f64,
}

/// Accuracy at one prompt length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PasskeyResult {
    /// The target prompt length in tokens.
    pub length: usize,
    pub trials: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// The prompts' mean actual length (at most `length`).
    pub mean_prompt_tokens: f64,
}

/// The prompt with `filler_chars` characters of filler, the key line after
/// `depth` of them (LongLoRA slices both filler parts from the start of the
/// repeated text).
fn assemble(filler: &str, filler_chars: usize, depth: f64, key: u32) -> String {
    let prefix = ((filler_chars as f64 * depth).round() as usize).min(filler_chars);
    let info = format!("The pass key is {key}. Remember it. {key} is the pass key.");
    [
        TASK,
        &filler[..prefix],
        &info,
        &filler[..filler_chars - prefix],
        QUESTION,
    ]
    .join("\n")
}

/// A prompt of at most `target_tokens` tokens (the longest filler that
/// fits), with a random key and depth drawn from `rng`.
pub fn passkey_prompt(
    tokenizer: &Tokenizer,
    target_tokens: usize,
    rng: &mut SplitMix64,
) -> Result<PasskeyPrompt> {
    let key = 10_000 + rng.below(90_000) as u32;
    let depth = rng.next_f64();
    // A token is at least one character of the filler (which is ASCII), so
    // the filler never needs more characters than 8 per token.
    let max_chars = target_tokens.saturating_mul(8);
    let mut filler = String::with_capacity(max_chars + FILLER.len() + 1);
    while filler.len() < max_chars {
        filler.push_str(FILLER);
        filler.push(' ');
    }
    filler.truncate(max_chars);
    let count = |chars: usize| -> Result<Vec<u32>> {
        tokenizer.encode(&assemble(&filler, chars, depth, key))
    };
    let shortest = count(0)?;
    if shortest.len() > target_tokens {
        return Err(Error::invalid(format!(
            "a passkey prompt needs at least {} tokens, more than the {target_tokens} asked for; ask for longer lengths",
            shortest.len()
        )));
    }
    // The longest filler that fits, by bisection (token counts grow with
    // the filler).
    let (mut lo, mut hi) = (0usize, max_chars);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if count(mid)?.len() <= target_tokens {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let text = assemble(&filler, lo, depth, key);
    let tokens = tokenizer.encode(&text)?;
    Ok(PasskeyPrompt {
        text,
        tokens,
        key,
        depth,
    })
}

/// Accuracy of greedy passkey retrieval at each length over `trials`
/// prompts; a trial is correct when the key appears in the continuation.
pub fn passkey_retrieval(
    graph: &Graph,
    tokenizer: &Tokenizer,
    lengths: &[usize],
    trials: usize,
    seed: u64,
    compute: ComputeDType,
    mut progress: impl FnMut(&PasskeyResult),
) -> Result<Vec<PasskeyResult>> {
    if trials == 0 {
        return Err(Error::invalid("--trials must be at least 1"));
    }
    let mut session = super::generate::decoder(graph, compute)?;
    if let Some(&longest) = lengths.iter().max() {
        // The prompt's text and tokens, then its KV cache and logits.
        let prompt = longest as u128 * 16;
        crate::memory::check(
            longest as u128 * session.bytes_per_token() + prompt,
            &format!("--lengths {longest}"),
        )?;
    }
    let mut rng = SplitMix64::new(seed);
    let mut results = Vec::with_capacity(lengths.len());
    for &length in lengths {
        let mut correct = 0;
        let mut prompt_tokens = 0;
        for _ in 0..trials {
            let p = passkey_prompt(tokenizer, length, &mut rng)?;
            let answer = p.key.to_string();
            let max_new = tokenizer.encode(&format!(" {answer}"))?.len() + 2;
            let out = generate_with(
                session.as_mut(),
                &p.tokens,
                max_new,
                &Sampling::greedy(),
                tokenizer.eos_id(),
            )?;
            if tokenizer.decode(&out).contains(&answer) {
                correct += 1;
            }
            prompt_tokens += p.tokens.len();
        }
        let r = PasskeyResult {
            length,
            trials,
            correct,
            accuracy: correct as f64 / trials as f64,
            mean_prompt_tokens: prompt_tokens as f64 / trials as f64,
        };
        progress(&r);
        results.push(r);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_fits_the_target_and_holds_the_key() {
        let tok = Tokenizer::bytes();
        let mut rng = SplitMix64::new(5);
        for target in [300, 512, 1000] {
            let p = passkey_prompt(&tok, target, &mut rng).unwrap();
            assert!(p.tokens.len() <= target && p.tokens.len() + 2 >= target);
            let line = format!(
                "The pass key is {}. Remember it. {} is the pass key.",
                p.key, p.key
            );
            assert!(p.text.contains(&line));
            assert!((10_000..100_000).contains(&p.key));
            assert!(p.text.starts_with(TASK) && p.text.ends_with(QUESTION));
        }
        let e = passkey_prompt(&tok, 50, &mut rng).unwrap_err().to_string();
        assert!(e.contains("at least"), "{e}");
    }
}
