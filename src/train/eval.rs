//! Perplexity with LongLoRA's protocol (`eval.py`): the token stream is cut
//! into windows of `ctx` tokens starting every `stride` tokens, each window
//! runs as one forward at `[1, ctx]` and is scored on its `ctx − 1`
//! predicted tokens, and perplexity is `exp` of the mean over windows of the
//! per-window mean loss.
//!
//! LongLoRA's `get_as_batch` also drops the last complete window
//! (`all_ix.pop()`); lcc keeps every complete window and drops only a
//! partial one at the end, so its window count can be one higher.

use super::tokenizer::Tokenizer;
use crate::ir::{Graph, Tensor};
use crate::runtime::{self, CompileOptions, ComputeDType};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// Perplexity at one context length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PplResult {
    pub ctx: usize,
    /// exp(mean over windows of the per-window mean loss), as LongLoRA reports.
    pub ppl: f64,
    /// exp(total loss / total scored tokens). Equal to `ppl` while every
    /// window has the same length; kept for protocols where they differ.
    pub ppl_token_weighted: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens scored (windows × (ctx − 1)).
    pub tokens: usize,
}

/// The start of every window: `0, stride, 2·stride, …` while a whole window
/// fits, then at most `max_windows` of them, evenly spaced.
pub fn window_starts(
    len: usize,
    ctx: usize,
    stride: usize,
    max_windows: Option<usize>,
) -> Vec<usize> {
    if ctx == 0 || stride == 0 || len < ctx {
        return Vec::new();
    }
    let all: Vec<usize> = (0..=len - ctx).step_by(stride).collect();
    match max_windows {
        Some(m) if m < all.len() => (0..m).map(|i| all[i * all.len() / m]).collect(),
        _ => all,
    }
}

/// The mean negative log-likelihood of `targets[t]` under `logits[t]`
/// (rows of `vocab`), with log-softmax in f64.
pub fn mean_nll(logits: &[f32], vocab: usize, targets: &[u32]) -> Result<f64> {
    if targets.is_empty() {
        return Err(Error::invalid("no tokens to score"));
    }
    if logits.len() < targets.len() * vocab {
        return Err(Error::invalid(format!(
            "{} logits cannot score {} tokens over a vocabulary of {vocab}",
            logits.len(),
            targets.len()
        )));
    }
    let mut total = 0.0;
    for (t, &target) in targets.iter().enumerate() {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let target = target as usize;
        if target >= vocab {
            return Err(Error::invalid(format!(
                "token {target} is outside the model's vocabulary ({vocab}); the data was tokenized for another model"
            )));
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        total += max + sum.ln() - row[target] as f64;
    }
    Ok(total / targets.len() as f64)
}

/// Perplexity of `graph` (input `input_ids` [1, ctx] → `logits`) on
/// `tokens` at context `ctx`, windows every `stride` tokens, at most
/// `max_windows` of them (evenly spaced) when given.
pub fn perplexity(
    graph: &Graph,
    tokens: &[u32],
    ctx: usize,
    stride: usize,
    max_windows: Option<usize>,
    compute: ComputeDType,
) -> Result<PplResult> {
    if ctx < 2 {
        return Err(Error::invalid(format!(
            "context length {ctx} scores no token; use at least 2"
        )));
    }
    if stride == 0 {
        return Err(Error::invalid("the stride must be at least 1 token"));
    }
    if max_windows == Some(0) {
        return Err(Error::invalid("--max-windows must be at least 1"));
    }
    let starts = window_starts(tokens.len(), ctx, stride, max_windows);
    if starts.is_empty() {
        return Err(Error::invalid(format!(
            "the evaluation data has {} tokens, fewer than one window of {ctx}; use more data or a shorter context",
            tokens.len()
        )));
    }
    let input = graph
        .inputs
        .first()
        .map(|&i| graph.node(i).outputs[0].name.clone())
        .unwrap_or_else(|| "input_ids".into());
    // Weights decoded once for all windows.
    let mut session = runtime::backend(runtime::Device::Cpu, None)?.compile(
        graph,
        &CompileOptions {
            compute,
            training: false,
        },
    )?;
    let mut sum_window_means = 0.0;
    let mut total_loss = 0.0;
    let mut scored = 0usize;
    for &start in &starts {
        let window = &tokens[start..start + ctx];
        let ids = Tensor::i64(vec![1, ctx], window.iter().map(|&t| t as i64).collect());
        let mut out = session.run(&HashMap::from([(input.clone(), ids)]))?;
        let logits = out
            .remove("logits")
            .or_else(|| out.into_values().next())
            .ok_or_else(|| Error::invalid("the graph has no logits output"))?;
        let vocab = *logits.shape.last().unwrap_or(&0);
        if logits.numel() != ctx * vocab || vocab == 0 {
            return Err(Error::invalid(format!(
                "the logits have shape {:?}; expected [1, {ctx}, vocab]",
                logits.shape
            )));
        }
        let values: Vec<f32> = match logits.as_f32() {
            Some(v) => v.to_vec(),
            None => logits.to_f64_vec().iter().map(|&x| x as f32).collect(),
        };
        let mean = mean_nll(&values, vocab, &window[1..])?;
        sum_window_means += mean;
        total_loss += mean * (ctx - 1) as f64;
        scored += ctx - 1;
    }
    Ok(PplResult {
        ctx,
        ppl: (sum_window_means / starts.len() as f64).exp(),
        ppl_token_weighted: (total_loss / scored as f64).exp(),
        windows: starts.len(),
        tokens: scored,
    })
}

/// Evaluation tokens from `path`: a `.bin` of little-endian u16 tokens (as
/// LongLoRA's pg19/proof-pile files), a text file, or a directory of `*.txt`
/// files (sorted by name; documents separated by the tokenizer's EOS).
/// Kept local to evaluation until the training data loader covers it.
pub fn load_eval_tokens(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt") && p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::format(
                path,
                "holds no *.txt files; give a text file, a directory of .txt files or a .bin of u16 tokens",
            ));
        }
        let mut tokens = Vec::new();
        for f in &files {
            if !tokens.is_empty() {
                tokens.extend(tokenizer.eos_id());
            }
            tokens.extend(read_text_tokens(f, tokenizer)?);
        }
        return Ok(tokens);
    }
    crate::util::check_regular_file(path)?;
    if path.extension().is_some_and(|e| e == "bin") {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.len() % 2 != 0 {
            return Err(Error::format(
                path,
                "has an odd number of bytes; a .bin must hold little-endian u16 tokens",
            ));
        }
        return Ok(bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
            .collect());
    }
    read_text_tokens(path, tokenizer)
}

fn read_text_tokens(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    crate::util::check_regular_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    tokenizer.encode(&text)
}

/// An SVG line plot of perplexity against context length.
pub fn plot_ppl_svg(results: &[PplResult], file: &Path, title: &str) -> Result<()> {
    use plotters::prelude::*;
    if results.is_empty() {
        return Err(Error::invalid("no perplexities to plot"));
    }
    let fail = |e: String| Error::invalid(format!("{}: cannot draw the plot: {e}", file.display()));
    let xs: Vec<f64> = results.iter().map(|r| r.ctx as f64).collect();
    let ys: Vec<f64> = results.iter().map(|r| r.ppl).collect();
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::MAX, f64::min),
        xs.iter().cloned().fold(f64::MIN, f64::max),
    );
    let (y0, y1) = (
        ys.iter().cloned().fold(f64::MAX, f64::min),
        ys.iter().cloned().fold(f64::MIN, f64::max),
    );
    let xpad = ((x1 - x0) * 0.05).max(1.0);
    let ypad = ((y1 - y0) * 0.1).max(y1.abs() * 0.01).max(1e-3);
    let root = SVGBackend::new(file, (640, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0 - ypad)..(y1 + ypad))
        .map_err(|e| fail(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("context length (tokens)")
        .y_desc("perplexity")
        .draw()
        .map_err(|e| fail(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            xs.iter().cloned().zip(ys.iter().cloned()),
            &BLUE,
        ))
        .map_err(|e| fail(e.to_string()))?;
    chart
        .draw_series(
            xs.iter()
                .zip(&ys)
                .map(|(&x, &y)| Circle::new((x, y), 3, BLUE.filled())),
        )
        .map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Switches `graph` to shifted sparse attention with groups of a quarter of
/// the context (LongLoRA's S²-Attn), for `lcc eval ppl --attention s2`.
pub fn use_shifted_sparse_attention(graph: &mut Graph) -> Result<()> {
    let mut s2 = crate::passes::Pipeline::from_names("s2attn")?;
    s2.set("s2attn.group_fraction=0.25")?;
    s2.run(graph, &crate::passes::RunOptions::default(), |_, _| {})?;
    Ok(())
}

/// [`perplexity`] at each context of `ctxs` (windows every `stride` tokens,
/// else every `ctx`); `done` sees each result and the time it took.
pub fn perplexity_at_contexts(
    graph: &Graph,
    tokens: &[u32],
    ctxs: &[usize],
    stride: Option<usize>,
    max_windows: Option<usize>,
    compute: ComputeDType,
    done: &mut dyn FnMut(&PplResult, std::time::Duration),
) -> Result<Vec<PplResult>> {
    let mut results = Vec::with_capacity(ctxs.len());
    for &ctx in ctxs {
        let start = std::time::Instant::now();
        let r = perplexity(
            graph,
            tokens,
            ctx,
            stride.unwrap_or(ctx),
            max_windows,
            compute,
        )
        .map_err(|e| Error::invalid(format!("perplexity at context {ctx}: {e}")))?;
        done(&r, start.elapsed());
        results.push(r);
    }
    Ok(results)
}

/// The model an evaluation (perplexity, passkey, generation) runs: a base
/// model, with a run's adapter and trainable weights, or given ones.
#[derive(Clone, Copy, Debug)]
pub struct EvalModel<'a> {
    pub model: &'a Path,
    /// A `run-train` output dir: its pi, adapter and trainable weights.
    pub run: Option<&'a Path>,
    pub adapter: Option<&'a Path>,
    pub trainable: Option<&'a Path>,
    /// Refuse a primitive graph instead of raising it.
    pub no_raise: bool,
}

/// Loads the model for evaluation — raised to LLaMA ops when it is an ONNX
/// export, with the run's or the given adapter and trainable params applied
/// — and its tokenizer. Warnings and notes (unused tensors, an automatic
/// raise) go to `note`.
pub fn load_for_eval(m: &EvalModel, note: &mut dyn FnMut(&str)) -> Result<(Graph, Tokenizer)> {
    let mut graph = crate::model::load_noting(m.model, note)?;
    if let Some(line) =
        crate::model::raise_on_demand(&mut graph, m.model, m.no_raise, "evaluation")?
    {
        note(&line);
    }
    match m.run {
        Some(run) => {
            crate::merge::apply_run(&mut graph, run)?;
        }
        None => crate::merge::apply(&mut graph, m.adapter, m.trainable)?,
    }
    let vocab = crate::model::vocab_size(&graph).ok_or_else(|| {
        Error::invalid(format!(
            "cannot tell the vocabulary size of {} (no logits output of known shape)",
            m.model.display()
        ))
    })?;
    let dir = m.model.is_dir().then_some(m.model);
    let tokenizer = Tokenizer::for_model(dir, vocab, dir.and_then(config_eos))?;
    Ok((graph, tokenizer))
}

/// `eos_token_id` from a Hugging Face config.json (the first of a list).
fn config_eos(dir: &Path) -> Option<u32> {
    let text = crate::util::read_text_capped(&dir.join("config.json"), crate::util::MAX_TEXT_BYTES)
        .ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    let eos = cfg.get("eos_token_id")?;
    let id = eos.as_u64().or_else(|| eos.as_array()?.first()?.as_u64())?;
    u32::try_from(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_step_by_stride_and_drop_the_partial_one() {
        assert_eq!(window_starts(10, 4, 4, None), vec![0, 4]);
        assert_eq!(window_starts(12, 4, 4, None), vec![0, 4, 8]);
        assert_eq!(window_starts(10, 4, 2, None), vec![0, 2, 4, 6]);
        assert_eq!(window_starts(3, 4, 4, None), Vec::<usize>::new());
        assert_eq!(window_starts(40, 4, 4, Some(3)), vec![0, 12, 24]);
        assert_eq!(window_starts(40, 4, 4, Some(50)).len(), 10);
    }

    #[test]
    fn uniform_logits_score_ln_vocab() {
        let logits = vec![0.5f32; 3 * 8];
        let nll = mean_nll(&logits, 8, &[1, 2, 7]).unwrap();
        assert!((nll - 8f64.ln()).abs() < 1e-12);
        assert!(mean_nll(&logits, 8, &[9]).is_err());
    }
}
