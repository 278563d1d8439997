//! KV-cache decoding: runs a LLaMA-level forward graph on new tokens only,
//! as transformers' `generate` does with `use_cache=True`.
//!
//! Every node of a LLaMA-level graph but two acts on each position alone
//! (Embedding, RmsNorm, Linear, LoraLinear, SwiGlu, elementwise), so running
//! it on the new tokens gives the rows a full forward would give them. The
//! two that see other positions are handled here:
//!
//! - `Rope` gets explicit positions `cached..cached+new` (the graph's Rope
//!   nodes read none; the full forward uses `0..seq`).
//! - `Attention` appends the new K/V rows to its per-node cache and attends
//!   over all of them; `kernels::attention` aligns the causal frontier
//!   bottom-right when kv_len > q_len.
//!
//! Rope with dynamic (NTK) scaling computes its base from `max position + 1`,
//! which is the total length so far: like transformers with a cache, keys
//! already cached keep the rotation they were given, so beyond
//! `original_max_position_embeddings` the result differs from one full
//! forward (it matches it for every other scaling).

use super::{kernels, layout, run_kernel, ComputeDType};
use crate::ir::{AttentionPattern, Graph, NodeIndex, Op, Tensor, TensorData, Value};
use crate::runtime::schedule::{Schedule, LIVE_TO_END};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// A growing `[1, len, kv_heads*head_dim]` K or V cache.
#[derive(Clone, Debug)]
struct Cache {
    k: Tensor,
    v: Tensor,
}

/// Appends the rows of `new` (`[1, n, width]`) to `cache` (`[1, len, width]`)
/// in place; amortised O(n).
fn append_rows(cache: &mut Tensor, new: &Tensor) -> std::result::Result<(), String> {
    let (n, width) = match *new.shape.as_slice() {
        [1, n, w] => (n, w),
        _ => return Err(format!("expected [1, seq, width], got {:?}", new.shape)),
    };
    if cache.shape[2] != width {
        return Err(format!(
            "the cached rows are {} wide, the new ones {width}",
            cache.shape[2]
        ));
    }
    match (&mut cache.data, &new.data) {
        (TensorData::F32(c), TensorData::F32(x)) => c.extend_from_slice(x),
        (TensorData::F64(c), TensorData::F64(x)) => c.extend_from_slice(x),
        _ => {
            return Err(format!(
                "the cache holds {} and the new rows are {}",
                cache.dtype, new.dtype
            ))
        }
    }
    cache.shape[1] += n;
    Ok(())
}

/// [`DecodeSession::bytes_per_token`] of a graph with these caches.
fn token_bytes(graph: &Graph, caches: &HashMap<NodeIndex, Cache>, output: Value) -> u128 {
    let elem = 4u128; // f32 and narrower compute in f32 buffers
    let kv: u128 = caches
        .keys()
        .map(|&n| match &graph.node(n).op {
            Op::Attention(a) => 2 * (a.num_kv_heads * a.head_dim) as u128 * elem,
            _ => 0,
        })
        .sum();
    let out = graph.node(output.node).outputs[output.slot]
        .ty
        .as_ref()
        .and_then(|t| t.shape.as_ref())
        .and_then(|s| match s.last() {
            Some(crate::ir::Dim::Fixed(w)) => Some(u128::from(*w) * elem),
            _ => None,
        })
        .unwrap_or(0);
    kv + out
}

/// Incremental forward over one sequence (batch 1).
///
/// ```ignore
/// let mut s = DecodeSession::new(&graph)?;
/// let logits = s.feed(&prompt)?;          // [1, prompt.len(), vocab]
/// let next = s.feed(&[argmax])?;          // [1, 1, vocab]
/// ```
pub struct DecodeSession<'g> {
    graph: &'g Graph,
    sched: Schedule,
    /// The value returned by `feed` (the `logits` output, else the only one).
    output: Value,
    /// Weights decoded once, by Weight node.
    weights: HashMap<NodeIndex, Arc<Tensor>>,
    /// By Attention node.
    caches: HashMap<NodeIndex, Cache>,
    len: usize,
    /// See [`DecodeSession::bytes_per_token`].
    token_bytes: u128,
}

impl<'g> DecodeSession<'g> {
    /// Checks that `graph` can be decoded token by token and decodes its
    /// weights, to compute in f32.
    pub fn new(graph: &'g Graph) -> Result<Self> {
        Self::with_compute_dtype(graph, ComputeDType::F32)
    }

    /// The same, computing in `compute`.
    pub fn with_compute_dtype(graph: &'g Graph, compute: ComputeDType) -> Result<Self> {
        if graph.inputs.len() != 1 {
            let names: Vec<&str> = graph
                .inputs
                .iter()
                .map(|&i| graph.node(i).outputs[0].name.as_str())
                .collect();
            return Err(Error::invalid(format!(
                "a decode session feeds one input (input_ids); this graph has {} ({}). Load a Hugging Face directory, or raise an ONNX export with the `raise` pass",
                names.len(),
                names.join(", ")
            )));
        }
        let output = match graph.outputs.iter().find(|(n, _)| n == "logits") {
            Some((_, v)) => *v,
            None if graph.outputs.len() == 1 => graph.outputs[0].1,
            None => {
                return Err(Error::invalid(
                    "the graph has several outputs and none is named 'logits'; a decode session returns the logits",
                ))
            }
        };
        let sched = Schedule::new(graph)?;
        let mut by_name: HashMap<&str, Arc<Tensor>> = HashMap::new();
        let mut weights = HashMap::new();
        let mut caches = HashMap::new();
        for &n in &sched.order {
            let node = graph.node(n);
            let fail = |msg: String| Error::exec(graph.display_name(n), node.op.name(), msg);
            match &node.op {
                Op::Input
                | Op::Constant { .. }
                | Op::Identity
                | Op::Unary(_)
                | Op::Binary(_)
                | Op::Cast { .. }
                | Op::Embedding
                | Op::RmsNorm { .. }
                | Op::Linear
                | Op::LoraLinear(_)
                | Op::SwiGlu => {}
                Op::Weight { name } => {
                    let t = match by_name.get(name.as_str()) {
                        Some(t) => t.clone(),
                        None => {
                            let w = graph.weights.get(name).ok_or_else(|| {
                                fail(format!("weight '{name}' is not in the graph's weight store"))
                            })?;
                            let t =
                                Arc::new(compute.decode(w).map_err(|e| fail(e.to_string()))?);
                            by_name.insert(name.as_str(), t.clone());
                            t
                        }
                    };
                    weights.insert(n, t);
                }
                Op::Rope(_) => {
                    if graph.inputs_of(n).get(1).copied().flatten().is_some() {
                        return Err(fail(
                            "this Rope reads position ids from the graph; a decode session supplies positions itself, so build the graph without them".into(),
                        ));
                    }
                }
                Op::Attention(attrs) => {
                    if let AttentionPattern::ShiftedSparse { .. } = attrs.pattern {
                        return Err(fail(
                            "shifted sparse attention (S²-Attn) is for training; inference uses full attention: apply `s2attn` with inference: true, or not at all".into(),
                        ));
                    }
                    caches.insert(n, Cache::empty());
                }
                // Every other op, by group: a new op of these groups is
                // refused here, and a new LLaMA-level op does not compile
                // until decoding handles or refuses it.
                other @ crate::fused_ops!() => {
                    return Err(fail(format!(
                        "a decode session runs unfused graphs; {} is made by the `fuse` pass, which is for training and whole-sequence runs: decode the graph before `fuse`",
                        other.name()
                    )))
                }
                other @ (crate::onnx_math_ops!()
                | crate::onnx_shape_ops!()
                | crate::onnx_transformer_ops!()
                | crate::training_ops!()) => {
                    return Err(fail(format!(
                        "a decode session runs LLaMA-level graphs (Embedding, RmsNorm, Linear, Rope, Attention, SwiGlu); {} is not one of their ops. Raise an ONNX export with the `raise` pass first",
                        other.name()
                    )))
                }
            }
        }
        let token_bytes = token_bytes(graph, &caches, output);
        Ok(DecodeSession {
            graph,
            sched,
            output,
            weights,
            caches,
            len: 0,
            token_bytes,
        })
    }

    /// Bytes one more token costs: its K and V rows in every cache, and its
    /// row of the output (when the output's width is known).
    pub fn bytes_per_token(&self) -> u128 {
        self.token_bytes
    }

    /// Refuses, before anything is allocated, a sequence of `tokens` tokens
    /// in all whose cache and output cannot fit in memory (`what` names the
    /// option that asked for it).
    pub fn check_room(&self, tokens: usize, what: &str) -> Result<()> {
        crate::memory::check(tokens as u128 * self.bytes_per_token(), what)
    }

    /// Tokens fed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the cached tokens (the weights stay decoded).
    pub fn reset(&mut self) {
        for c in self.caches.values_mut() {
            *c = Cache::empty();
        }
        self.len = 0;
    }

    /// Runs the graph on `tokens` (which follow those fed before) and
    /// returns their logits, `[1, tokens.len(), vocab]`.
    /// On error the session is as it was before the call.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::invalid("feed at least one token"));
        }
        // What this call adds (the tokens fed before are allocated already).
        self.check_room(
            tokens.len(),
            &format!("decoding {} tokens after {}", tokens.len(), self.len),
        )?;
        let result = self.step(tokens);
        if result.is_err() {
            // Layers before the failing node have cached the new rows.
            let len = self.len;
            for c in self.caches.values_mut() {
                c.truncate(len);
            }
        }
        result
    }

    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let n = tokens.len();
        let ids = Tensor::i64(vec![1, n], tokens.iter().map(|&t| t as i64).collect());
        let positions = Tensor::i64(
            vec![n],
            (self.len..self.len + n).map(|p| p as i64).collect(),
        );
        let graph = self.graph;
        let bound = petgraph::visit::NodeIndexable::node_bound(&graph.g);
        let mut values: Vec<Vec<Option<Arc<Tensor>>>> = vec![Vec::new(); bound];
        let get = |values: &Vec<Vec<Option<Arc<Tensor>>>>, v: Value| {
            values
                .get(v.node.index())
                .and_then(|s| s.get(v.slot))
                .and_then(|t| t.clone())
        };

        for (step, &n_idx) in self.sched.order.iter().enumerate() {
            let node = graph.node(n_idx);
            let fail = |msg: String| Error::exec(graph.display_name(n_idx), node.op.name(), msg);
            let mut ins: Vec<Option<Arc<Tensor>>> = Vec::with_capacity(node.num_inputs);
            for (port, v) in graph.inputs_of(n_idx).into_iter().enumerate() {
                ins.push(match v {
                    None => None,
                    Some(v) => Some(get(&values, v).ok_or_else(|| {
                        fail(format!(
                            "input {port} was not computed; the schedule is broken"
                        ))
                    })?),
                });
            }
            for &v in self.sched.frees_at(step) {
                if let Some(slot) = values[v.node.index()].get_mut(v.slot) {
                    *slot = None;
                }
            }
            let outs: Vec<Arc<Tensor>> = match &node.op {
                Op::Input => vec![Arc::new(ids.clone())],
                Op::Weight { .. } => vec![self.weights[&n_idx].clone()],
                Op::Rope(attrs) => {
                    let x = ins
                        .first()
                        .and_then(|t| t.as_deref())
                        .ok_or_else(|| fail("required input 0 is missing".into()))?;
                    vec![Arc::new(
                        kernels::rope(x, Some(&positions), attrs).map_err(fail)?,
                    )]
                }
                Op::Attention(attrs) => {
                    let input = |i: usize| {
                        ins.get(i)
                            .and_then(|t| t.as_deref())
                            .ok_or_else(|| fail(format!("required input {i} is missing")))
                    };
                    let (q, k, v) = (input(0)?, input(1)?, input(2)?);
                    let cache = self
                        .caches
                        .get_mut(&n_idx)
                        .ok_or_else(|| fail("no KV cache for this node".into()))?;
                    cache
                        .append(k, v)
                        .map_err(|m| fail(format!("KV cache: {m}")))?;
                    vec![Arc::new(
                        kernels::attention(q, &cache.k, &cache.v, attrs).map_err(fail)?,
                    )]
                }
                op => run_kernel(op, &mut { ins }, node.outputs.len()).map_err(fail)?,
            };
            let slots = &mut values[n_idx.index()];
            *slots = outs.into_iter().map(Some).collect();
            for &v in self.sched.frees_at(step) {
                if v.node == n_idx {
                    if let Some(slot) = values[n_idx.index()].get_mut(v.slot) {
                        *slot = None;
                    }
                }
            }
        }
        debug_assert_eq!(self.sched.last_use.get(&self.output), Some(&LIVE_TO_END));
        let out = get(&values, self.output).ok_or_else(|| {
            Error::invalid("the graph's logits were not computed; the schedule is broken")
        })?;
        drop(values);
        self.len += n;
        let t = Arc::try_unwrap(out).unwrap_or_else(|t| (*t).clone());
        layout::check_consistent(&t).map_err(|m| Error::invalid(format!("logits: {m}")))?;
        Ok(t)
    }

    /// Feeds `tokens` and returns the logits of the last one (`[vocab]`, f32).
    pub fn feed_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let t = self.feed(tokens)?;
        last_row(&t)
    }
}

/// The last row of `[.., vocab]` logits as f32.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let vocab = *logits
        .shape
        .last()
        .ok_or_else(|| Error::invalid("the logits are a scalar"))?;
    let all = logits.to_f64_vec();
    if vocab == 0 || all.len() < vocab {
        return Err(Error::invalid(format!(
            "the logits have shape {:?}; expected [batch, seq, vocab]",
            logits.shape
        )));
    }
    Ok(all[all.len() - vocab..].iter().map(|&x| x as f32).collect())
}

impl Cache {
    fn truncate(&mut self, len: usize) {
        if len == 0 {
            *self = Cache::empty();
            return;
        }
        for t in [&mut self.k, &mut self.v] {
            let width = t.shape[2];
            match &mut t.data {
                TensorData::F32(d) => d.truncate(len * width),
                TensorData::F64(d) => d.truncate(len * width),
                _ => {}
            }
            t.shape[1] = t.shape[1].min(len);
        }
    }

    fn empty() -> Cache {
        Cache {
            k: Tensor::f32(vec![1, 0, 0], Vec::new()),
            v: Tensor::f32(vec![1, 0, 0], Vec::new()),
        }
    }

    fn append(&mut self, k: &Tensor, v: &Tensor) -> std::result::Result<(), String> {
        if self.k.shape[1] == 0 {
            // The first feed fixes width and dtype.
            self.k = k.clone();
            self.v = v.clone();
            if k.shape.first() != Some(&1) || v.shape.first() != Some(&1) {
                return Err(format!("a decode session runs batch 1; k is {:?}", k.shape));
            }
            return Ok(());
        }
        append_rows(&mut self.k, k)?;
        append_rows(&mut self.v, v)
    }
}

impl super::Decoder for DecodeSession<'_> {
    fn reset(&mut self) {
        DecodeSession::reset(self)
    }

    fn len(&self) -> usize {
        DecodeSession::len(self)
    }

    fn bytes_per_token(&self) -> u128 {
        DecodeSession::bytes_per_token(self)
    }

    fn check_room(&self, tokens: usize, what: &str) -> Result<()> {
        DecodeSession::check_room(self, tokens, what)
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor> {
        DecodeSession::feed(self, tokens)
    }

    fn feed_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        DecodeSession::feed_last(self, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::{Pipeline, RunOptions};
    use std::path::Path;

    fn tiny() -> Graph {
        crate::hf::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/hf"))
            .unwrap()
    }

    fn full_logits(g: &Graph, tokens: &[u32]) -> Vec<f64> {
        let ids = Tensor::i64(
            vec![1, tokens.len()],
            tokens.iter().map(|&t| t as i64).collect(),
        );
        let out =
            crate::runtime::cpu::run(g, &HashMap::from([("input_ids".to_string(), ids)])).unwrap();
        out["logits"].to_f64_vec()
    }

    fn tokens(n: usize) -> Vec<u32> {
        let mut rng = crate::util::SplitMix64::new(7);
        (0..n).map(|_| rng.below(256) as u32).collect()
    }

    /// Feeds `toks` in chunks of the given sizes (cycled) and compares every
    /// position's logits with one full forward.
    fn check(g: &Graph, toks: &[u32], chunks: &[usize]) {
        let want = full_logits(g, toks);
        let vocab = want.len() / toks.len();
        let mut s = DecodeSession::new(g).unwrap();
        let mut got = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < toks.len() {
            let n = chunks[i % chunks.len()].min(toks.len() - at);
            let t = s.feed(&toks[at..at + n]).unwrap();
            assert_eq!(t.shape, vec![1, n, vocab]);
            got.extend(t.to_f64_vec());
            at += n;
            i += 1;
        }
        assert_eq!(s.len(), toks.len());
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-5, "chunks {chunks:?}: max abs diff {diff}");
    }

    #[test]
    fn decode_token_by_token_matches_a_full_forward() {
        let g = tiny();
        let toks = tokens(40);
        check(&g, &toks, &[1]);
        check(&g, &toks, &[7, 1, 3]);
        check(&g, &toks, &[40]);
    }

    #[test]
    fn decode_matches_after_pi_and_a_lora_adapter() {
        let mut g = tiny();
        let mut pi = Pipeline::from_names("pi").unwrap();
        pi.set("pi.factor=4").unwrap();
        pi.run(&mut g, &RunOptions::default(), |_, _| {}).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
        let adapter = crate::hf::peft::load_adapter(&dir.join("adapter")).unwrap();
        crate::passes::lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
        crate::hf::peft::load_trainable(&mut g, &dir.join("trainable_params.safetensors")).unwrap();
        assert!(g.op_histogram().contains_key("LoraLinear"));
        let toks = tokens(33);
        check(&g, &toks, &[1]);
        check(&g, &toks, &[5, 2]);
    }

    #[test]
    fn decode_reset_starts_over() {
        let g = tiny();
        let toks = tokens(9);
        let mut s = DecodeSession::new(&g).unwrap();
        let a = s.feed(&toks).unwrap();
        s.reset();
        assert!(s.is_empty());
        let b = s.feed(&toks).unwrap();
        assert_eq!(a.to_f64_vec(), b.to_f64_vec());
        assert!(s.feed(&[]).is_err());
        // A token outside the vocabulary fails in Embedding, before any
        // cache grows; the session carries on as if it was never fed.
        assert!(s.feed(&[1000]).is_err());
        assert_eq!(s.len(), toks.len());
        s.reset();
        s.feed(&toks[..4]).unwrap();
        let rest = s.feed(&toks[4..]).unwrap();
        let want = &a.to_f64_vec()[4 * 256..];
        let diff = rest
            .to_f64_vec()
            .iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn decode_refuses_shifted_sparse_attention() {
        let mut g = tiny();
        Pipeline::from_names("s2attn")
            .unwrap()
            .run(&mut g, &RunOptions::default(), |_, _| {})
            .unwrap();
        let e = DecodeSession::new(&g).err().unwrap().to_string();
        assert!(e.contains("inference: true"), "{e}");
    }
}
