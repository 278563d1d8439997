//! Training data: sources → token stream → packed rows → batches.
//!
//! Sources (mixed freely, except `.safetensors`):
//! - a text file, or a directory (every `*.txt` below it, recursively,
//!   sorted by path): each file is one document, tokenized by a
//!   [`Tokenizer`];
//! - a `.bin` file of little-endian u16 or u32 token ids
//!   ([`TokenWidth`]; LongLoRA stores its eval data as u16): one document;
//! - a `.safetensors` file with an integer tensor `input_ids` [rows, seq]:
//!   rows used exactly as given (no packing, no shuffling, no hold-out), for
//!   reproducible checks against a reference. It must be the only source of
//!   its set (train or validation).
//!
//! Packing follows LongLoRA: documents are concatenated with the EOS id
//! between them and the stream is cut into rows of `seq_len` tokens; the
//! tail that does not fill a row is dropped. Labels are the row itself
//! (the loss shifts by one), so a row is exactly `seq_len` tokens.
//!
//! Everything is deterministic given the seed: the validation hold-out and
//! each epoch's shuffle. A [`Loader`]'s [`LoaderState`] restores it exactly.

use super::tokenizer::Tokenizer;
use crate::ir::Tensor;
use crate::util::SplitMix64;
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes per token in `.bin` files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenWidth {
    /// 2 bytes (LongLoRA's eval data; vocabularies up to 65,536).
    #[default]
    U16,
    /// 4 bytes.
    U32,
}

impl TokenWidth {
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }
}

/// How to turn sources into rows.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Tokens per row (the training context length).
    pub seq_len: usize,
    /// Fraction of the training rows held out for validation when no
    /// validation paths are given (0 = none). When > 0 and there are at
    /// least 2 rows, at least 1 row is held out and at least 1 kept.
    pub valid_fraction: f64,
    /// Seed of the hold-out choice (and, by convention, of the loader).
    pub seed: u64,
    /// Width of the tokens in `.bin` files.
    pub token_width: TokenWidth,
    /// The model's vocabulary: every id must be below it.
    pub vocab_size: usize,
}

/// Rows of `seq_len` tokens: a shared token buffer plus the row starts that
/// belong to this set, so a train/validation split costs no token copies.
#[derive(Clone, Debug)]
pub struct Rows {
    tokens: Arc<Vec<u32>>,
    seq_len: usize,
    /// Row numbers (row r = tokens[r*seq_len .. (r+1)*seq_len]).
    rows: Vec<u32>,
    fixed: bool,
}

impl Rows {
    /// No rows.
    pub fn empty(seq_len: usize) -> Rows {
        Rows {
            tokens: Arc::new(Vec::new()),
            seq_len,
            rows: Vec::new(),
            fixed: false,
        }
    }

    /// All whole rows of a token stream (the tail is dropped).
    pub fn from_tokens(tokens: Vec<u32>, seq_len: usize) -> Rows {
        let n = tokens.len().checked_div(seq_len).unwrap_or(0);
        Rows {
            tokens: Arc::new(tokens),
            seq_len,
            rows: (0..n as u32).collect(),
            fixed: false,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokens in all rows of this set.
    pub fn num_tokens(&self) -> usize {
        self.rows.len() * self.seq_len
    }

    /// Whether the rows came from a `.safetensors` `input_ids` and must be
    /// used in order (a [`Loader`] never shuffles them).
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// Row `i` (panics when `i >= len()`, like slice indexing).
    pub fn row(&self, i: usize) -> &[u32] {
        let start = self.rows[i] as usize * self.seq_len;
        &self.tokens[start..start + self.seq_len]
    }

    /// The rows `indices` as an i64 tensor [indices.len(), seq_len] (e.g.
    /// evaluation batches in order: `rows.batch(&(0..8).collect::<Vec<_>>())`).
    pub fn batch(&self, indices: &[usize]) -> Tensor {
        let mut data = Vec::with_capacity(indices.len() * self.seq_len);
        for &i in indices {
            data.extend(self.row(i).iter().map(|&t| t as i64));
        }
        Tensor::i64(vec![indices.len(), self.seq_len], data)
    }

    fn subset(&self, rows: Vec<u32>) -> Rows {
        Rows {
            tokens: self.tokens.clone(),
            seq_len: self.seq_len,
            rows,
            fixed: self.fixed,
        }
    }
}

/// What [`load`] read, for the log line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Documents (files) in the training sources.
    pub docs: usize,
    /// Tokens of the training stream (EOS separators included), before
    /// packing dropped the tail.
    pub tokens: usize,
    /// Tokens the tail of the training stream dropped.
    pub dropped_tokens: usize,
    /// Documents and tokens of separate validation sources (0 when held out).
    pub valid_docs: usize,
    pub valid_tokens: usize,
}

/// Training and validation rows.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Rows,
    pub valid: Rows,
    pub stats: DataStats,
}

/// Loads `paths` as training rows and `valid_paths` as validation rows;
/// with no `valid_paths`, `opts.valid_fraction` of the training rows are
/// held out (chosen from `opts.seed`), except for `.safetensors` rows,
/// which are never split.
pub fn load(
    paths: &[PathBuf],
    valid_paths: &[PathBuf],
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<Dataset> {
    if opts.seq_len == 0 {
        return Err(Error::invalid("the sequence length must be at least 1"));
    }
    if paths.is_empty() {
        return Err(Error::invalid(
            "no training data given; pass text files, directories of *.txt, .bin token files or a .safetensors with input_ids",
        ));
    }
    if !(0.0..1.0).contains(&opts.valid_fraction) {
        return Err(Error::invalid(format!(
            "the validation fraction must be in [0, 1), got {}",
            opts.valid_fraction
        )));
    }
    let (train_all, docs, tokens, dropped) = load_set(paths, tok, opts, "training")?;
    let mut stats = DataStats {
        docs,
        tokens,
        dropped_tokens: dropped,
        ..DataStats::default()
    };
    if !valid_paths.is_empty() {
        let (valid, vdocs, vtokens, _) = load_set(valid_paths, tok, opts, "validation")?;
        stats.valid_docs = vdocs;
        stats.valid_tokens = vtokens;
        return Ok(Dataset {
            train: train_all,
            valid,
            stats,
        });
    }
    let n = train_all.len();
    if opts.valid_fraction == 0.0 || train_all.fixed || n < 2 {
        return Ok(Dataset {
            valid: Rows::empty(opts.seq_len),
            train: train_all,
            stats,
        });
    }
    let n_valid = ((opts.valid_fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<u32> = (0..n as u32).collect();
    // Its own stream, so the hold-out does not shift when the loader's
    // shuffle (also seeded by `seed`) changes.
    SplitMix64::new(opts.seed ^ 0x7661_6c69_6420_7365).shuffle(&mut order);
    let mut held = vec![false; n];
    for &r in &order[..n_valid] {
        held[r as usize] = true;
    }
    let (valid_rows, train_rows): (Vec<u32>, Vec<u32>) =
        (0..n as u32).partition(|&r| held[r as usize]);
    Ok(Dataset {
        valid: train_all.subset(valid_rows),
        train: train_all.subset(train_rows),
        stats,
    })
}

/// One set (training or validation): rows, documents, stream tokens,
/// dropped tail tokens.
fn load_set(
    paths: &[PathBuf],
    tok: &Tokenizer,
    opts: &DataOptions,
    what: &str,
) -> Result<(Rows, usize, usize, usize)> {
    let files = expand(paths)?;
    let n_st = files.iter().filter(|f| is_ext(f, "safetensors")).count();
    if n_st > 0 {
        if files.len() > 1 {
            return Err(Error::invalid(format!(
                "the {what} data mixes a .safetensors input_ids file with other sources; a .safetensors is used exactly as given, so pass it alone"
            )));
        }
        let rows = load_input_ids(&files[0], opts)?;
        let (n, t) = (rows.len(), rows.num_tokens());
        return Ok((rows, n, t, 0));
    }
    let eos = tok.eos_id().ok_or_else(|| {
        Error::invalid(
            "the tokenizer has no end-of-document token to separate documents; give the model config an eos_token_id",
        )
    })?;
    if eos as usize >= opts.vocab_size {
        return Err(Error::invalid(format!(
            "the end-of-document id {eos} is outside the model's vocabulary ({})",
            opts.vocab_size
        )));
    }
    // Tokenize in parallel, concatenate in file order: deterministic.
    let docs: Vec<Vec<u32>> = files
        .par_iter()
        .map(|f| read_document(f, tok, opts))
        .collect::<Result<_>>()?;
    let total: usize = docs.iter().map(Vec::len).sum::<usize>() + docs.len().saturating_sub(1);
    let mut stream = Vec::with_capacity(total);
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            stream.push(eos);
        }
        stream.extend_from_slice(d);
    }
    drop(docs);
    if stream.len() < opts.seq_len {
        return Err(Error::invalid(format!(
            "the {what} data has {} tokens, need at least {} (one row of the sequence length); add data or lower the sequence length",
            stream.len(),
            opts.seq_len
        )));
    }
    let n = stream.len();
    let dropped = n % opts.seq_len;
    stream.truncate(n - dropped);
    stream.shrink_to_fit();
    Ok((
        Rows::from_tokens(stream, opts.seq_len),
        files.len(),
        n,
        dropped,
    ))
}

fn is_ext(path: &Path, ext: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// Files of the given paths: directories become their `*.txt` files,
/// recursively, sorted by path. A directory reached again through a link
/// (a loop) is walked once, and a file reached twice is read once.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut seen_files = std::collections::HashSet::new();
    let mut seen_dirs = std::collections::HashSet::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk_txt(p, &mut found, &mut seen_dirs)?;
            if found.is_empty() {
                return Err(Error::invalid(format!(
                    "{}: the directory holds no *.txt files",
                    p.display()
                )));
            }
            found.sort();
            for f in found {
                if seen_files.insert(canonical(&f)?) {
                    files.push(f);
                }
            }
        } else if p.is_file() {
            if seen_files.insert(canonical(p)?) {
                files.push(p.clone());
            }
        } else if p.exists() {
            return Err(Error::format(
                p,
                "is a FIFO, device or socket, not a regular file; lcc reads regular files only",
            ));
        } else {
            return Err(Error::invalid(format!(
                "{}: no such file or directory",
                p.display()
            )));
        }
    }
    Ok(files)
}

fn canonical(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::io(p, e))
}

fn walk_txt(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    if !seen.insert(canonical(dir)?) {
        return Ok(()); // a link back to a directory already walked
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            walk_txt(&path, out, seen)?;
        } else if is_ext(&path, "txt") {
            crate::util::check_regular_file(&path)?;
            out.push(path);
        }
    }
    Ok(())
}

/// One file as one document's tokens.
fn read_document(path: &Path, tok: &Tokenizer, opts: &DataOptions) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if is_ext(path, "bin") {
        return decode_bin(path, &bytes, opts);
    }
    let ids = match tok {
        // Byte-level needs no UTF-8: take the bytes as they are.
        Tokenizer::Bytes { .. } => bytes.iter().map(|&b| u32::from(b)).collect(),
        _ => {
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                Error::format(
                    path,
                    format!(
                        "not UTF-8 text ({e}); convert it to UTF-8 or pre-tokenize it to a .bin"
                    ),
                )
            })?;
            tok.encode(text)
                .map_err(|e| Error::format(path, e.to_string()))?
        }
    };
    check_vocab(path, &ids, opts.vocab_size)?;
    Ok(ids)
}

fn decode_bin(path: &Path, bytes: &[u8], opts: &DataOptions) -> Result<Vec<u32>> {
    let w = opts.token_width.bytes();
    if bytes.len() % w != 0 {
        return Err(Error::format(
            path,
            format!(
                "{} bytes is not a whole number of {w}-byte tokens; is the token width right ({:?})?",
                bytes.len(),
                opts.token_width
            ),
        ));
    }
    let ids: Vec<u32> = match opts.token_width {
        TokenWidth::U16 => bytes
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        TokenWidth::U32 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    check_vocab(path, &ids, opts.vocab_size)?;
    Ok(ids)
}

fn check_vocab(path: &Path, ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(pos) = ids.iter().position(|&t| t as usize >= vocab) {
        return Err(Error::format(
            path,
            format!(
                "token {} (at position {pos}) is outside the model's vocabulary ({vocab}); wrong tokenizer or token width?",
                ids[pos]
            ),
        ));
    }
    Ok(())
}

/// A `.safetensors` with `input_ids` [rows, seq_len], as fixed rows.
fn load_input_ids(path: &Path, opts: &DataOptions) -> Result<Rows> {
    let tensors = crate::hf::read_tensors(path)?;
    let Some((_, t)) = tensors.into_iter().find(|(n, _)| n == "input_ids") else {
        return Err(Error::format(
            path,
            "no tensor named 'input_ids' (expected integer token ids [rows, seq])",
        ));
    };
    if !t.dtype.is_int() || t.rank() != 2 {
        return Err(Error::format(
            path,
            format!(
                "'input_ids' is {}{:?}; expected an integer tensor [rows, seq]",
                t.dtype, t.shape
            ),
        ));
    }
    if t.shape[1] != opts.seq_len {
        return Err(Error::format(
            path,
            format!(
                "'input_ids' rows have {} tokens but the training sequence length is {}; set the sequence length to {} or regenerate the file",
                t.shape[1], opts.seq_len, t.shape[1]
            ),
        ));
    }
    if t.shape[0] == 0 {
        return Err(Error::format(path, "'input_ids' has no rows"));
    }
    let vals = t.to_i64_vec();
    let mut ids = Vec::with_capacity(vals.len());
    for (pos, &v) in vals.iter().enumerate() {
        if v < 0 || v as u64 >= opts.vocab_size as u64 {
            return Err(Error::format(
                path,
                format!(
                    "'input_ids' holds {v} (at flat position {pos}), outside the model's vocabulary ({})",
                    opts.vocab_size
                ),
            ));
        }
        ids.push(v as u32);
    }
    let mut rows = Rows::from_tokens(ids, opts.seq_len);
    rows.fixed = true;
    Ok(rows)
}

/// Where a [`Loader`] stands: the epoch and the next row's position in that
/// epoch's order. Saved in checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub position: u64,
}

/// Endless batches of rows. Each epoch visits every row once, in an order
/// that depends only on (seed, epoch) when shuffling, so a loader restored
/// from its [`LoaderState`] yields exactly the batches the original would
/// have. A batch that crosses an epoch's end continues into the next epoch.
/// Fixed rows ([`Rows::is_fixed`]) are never shuffled.
#[derive(Clone, Debug)]
pub struct Loader {
    rows: Rows,
    seed: u64,
    shuffle: bool,
    state: LoaderState,
    order: Vec<u32>,
}

impl Loader {
    /// A loader at the start of epoch 0. `rows` must not be empty.
    pub fn new(rows: Rows, seed: u64, shuffle: bool) -> Result<Loader> {
        Loader::restore(rows, seed, shuffle, &LoaderState::default())
    }

    /// A loader continuing from `state` (as returned by [`Loader::state`]).
    pub fn restore(rows: Rows, seed: u64, shuffle: bool, state: &LoaderState) -> Result<Loader> {
        if rows.is_empty() {
            return Err(Error::invalid(
                "cannot load batches from an empty set of rows",
            ));
        }
        if state.position > rows.len() as u64 {
            return Err(Error::invalid(format!(
                "the saved loader position {} is past the {} rows of the data; was the data or the sequence length changed since the checkpoint?",
                state.position,
                rows.len()
            )));
        }
        let shuffle = shuffle && !rows.fixed;
        let mut loader = Loader {
            rows,
            seed,
            shuffle,
            state: *state,
            order: Vec::new(),
        };
        loader.order = loader.epoch_order(state.epoch);
        Ok(loader)
    }

    /// The row order of `epoch`.
    fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.rows.len() as u32).collect();
        if self.shuffle {
            let mut mix = SplitMix64::new(self.seed);
            let base = mix.next_u64();
            let mut rng = SplitMix64::new(base ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // Warm the generator so neighbouring epochs decorrelate at once.
            rng.next_u64();
            rng.shuffle(&mut order);
        }
        order
    }

    /// The next `batch` rows as i64 token ids [batch, seq_len].
    pub fn next_batch(&mut self, batch: usize) -> Tensor {
        let seq = self.rows.seq_len;
        let mut data = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            if self.state.position as usize >= self.order.len() {
                self.state.epoch += 1;
                self.state.position = 0;
                self.order = self.epoch_order(self.state.epoch);
            }
            let r = self.order[self.state.position as usize] as usize;
            data.extend(self.rows.row(r).iter().map(|&t| t as i64));
            self.state.position += 1;
        }
        Tensor::i64(vec![batch, seq], data)
    }

    /// Where the loader stands (for checkpoints).
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Rows per epoch.
    pub fn rows_per_epoch(&self) -> usize {
        self.rows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seq_len: usize) -> DataOptions {
        DataOptions {
            seq_len,
            valid_fraction: 0.0,
            seed: 7,
            token_width: TokenWidth::U16,
            vocab_size: 256,
        }
    }

    fn rows_of(rows: &Rows) -> Vec<Vec<u32>> {
        (0..rows.len()).map(|i| rows.row(i).to_vec()).collect()
    }

    #[test]
    fn documents_are_packed_with_eos_and_the_tail_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "cd").unwrap();
        std::fs::write(dir.path().join("a.txt"), "ab").unwrap();
        std::fs::write(dir.path().join("sub/c.txt"), "efg").unwrap();
        std::fs::write(dir.path().join("skip.md"), "zzz").unwrap();
        let tok = Tokenizer::Bytes { eos: 1 };
        let ds = load(&[dir.path().to_path_buf()], &[], &tok, &opts(3)).unwrap();
        // a b EOS c d EOS e f g  → 9 tokens, 3 rows.
        let (a, b, c, d, e, f, g) = (97, 98, 99, 100, 101, 102, 103);
        assert_eq!(
            rows_of(&ds.train),
            vec![vec![a, b, 1], vec![c, d, 1], vec![e, f, g]]
        );
        assert_eq!(ds.stats.docs, 3);
        assert_eq!(ds.stats.tokens, 9);
        assert_eq!(ds.stats.dropped_tokens, 0);
        let ds = load(&[dir.path().to_path_buf()], &[], &tok, &opts(4)).unwrap();
        assert_eq!(rows_of(&ds.train), vec![vec![a, b, 1, c], vec![d, 1, e, f]]);
        assert_eq!(ds.stats.dropped_tokens, 1);
        assert!(ds.valid.is_empty());
        let t = ds.train.batch(&[1, 0]);
        assert_eq!(t.shape, vec![2, 4]);
        assert_eq!(t.as_i64().unwrap()[..4], [d as i64, 1, e as i64, f as i64]);
    }

    #[test]
    fn validation_hold_out_is_deterministic_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..1000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let p = dir.path().join("t.txt");
        std::fs::write(&p, text).unwrap();
        let tok = Tokenizer::bytes();
        let mut o = opts(10);
        o.valid_fraction = 0.01;
        let ds = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap();
        assert_eq!((ds.train.len(), ds.valid.len()), (99, 1));
        o.valid_fraction = 0.25;
        let a = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap();
        let b = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap();
        assert_eq!((a.train.len(), a.valid.len()), (75, 25));
        assert_eq!(rows_of(&a.valid), rows_of(&b.valid));
        o.seed = 8;
        let c = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap();
        assert_ne!(a.valid.rows, c.valid.rows);
        // Two rows: one each way.
        o.seq_len = 500;
        o.valid_fraction = 0.001;
        let d = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap();
        assert_eq!((d.train.len(), d.valid.len()), (1, 1));
        // Separate validation paths.
        let v = dir.path().join("v.txt");
        std::fs::write(&v, "x".repeat(25)).unwrap();
        o.seq_len = 10;
        let e = load(std::slice::from_ref(&p), std::slice::from_ref(&v), &tok, &o).unwrap();
        assert_eq!((e.train.len(), e.valid.len()), (100, 2));
        assert_eq!(e.stats.valid_tokens, 25);
    }

    #[test]
    fn shuffle_is_seeded_and_restore_continues_identically() {
        let rows = Rows::from_tokens((0..70).collect(), 7);
        let mut a = Loader::new(rows.clone(), 3, true).unwrap();
        let mut b = Loader::new(rows.clone(), 3, true).unwrap();
        let first: Vec<Tensor> = (0..5).map(|_| a.next_batch(3)).collect();
        let again: Vec<Tensor> = (0..5).map(|_| b.next_batch(3)).collect();
        assert_eq!(first, again);
        // An epoch is a permutation of the rows, and epochs differ.
        let mut c = Loader::new(rows.clone(), 3, true).unwrap();
        let e0 = c.next_batch(10).to_i64_vec();
        let e1 = c.next_batch(10).to_i64_vec();
        let firsts = |v: &[i64]| -> Vec<i64> { v.chunks(7).map(|r| r[0] / 7).collect() };
        let mut s0 = firsts(&e0);
        assert_ne!(s0, (0..10).collect::<Vec<_>>());
        assert_ne!(firsts(&e0), firsts(&e1));
        s0.sort();
        assert_eq!(s0, (0..10).collect::<Vec<_>>());
        // Restore mid-epoch and across an epoch boundary.
        let state = a.state();
        assert_eq!(
            state,
            LoaderState {
                epoch: 1,
                position: 5
            }
        );
        let mut r = Loader::restore(rows.clone(), 3, true, &state).unwrap();
        for _ in 0..7 {
            assert_eq!(a.next_batch(4), r.next_batch(4));
        }
        // Unshuffled: rows in order.
        let mut u = Loader::new(rows.clone(), 3, false).unwrap();
        assert_eq!(u.next_batch(2).to_i64_vec(), (0..14).collect::<Vec<_>>());
        let bad = LoaderState {
            epoch: 0,
            position: 11,
        };
        assert!(Loader::restore(rows, 3, true, &bad).is_err());
        assert!(Loader::new(Rows::empty(4), 0, true).is_err());
    }

    #[test]
    fn bin_files_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        let p16 = dir.path().join("a.bin");
        let ids: [u16; 5] = [1, 2, 300, 4, 5];
        std::fs::write(
            &p16,
            ids.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<_>>(),
        )
        .unwrap();
        let p32 = dir.path().join("b.bin");
        let ids32: [u32; 3] = [70000, 6, 7];
        std::fs::write(
            &p32,
            ids32
                .iter()
                .flat_map(|t| t.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let tok = Tokenizer::Bytes { eos: 0 };
        let mut o = opts(3);
        o.vocab_size = 100_000;
        let ds = load(std::slice::from_ref(&p16), &[], &tok, &o).unwrap();
        assert_eq!(rows_of(&ds.train), vec![vec![1, 2, 300]]);
        // Mixed with text: EOS between documents.
        let t = dir.path().join("c.txt");
        std::fs::write(&t, "A").unwrap();
        let ds = load(&[p16.clone(), t.clone()], &[], &tok, &o).unwrap();
        assert_eq!(rows_of(&ds.train), vec![vec![1, 2, 300], vec![4, 5, 0]]);
        o.token_width = TokenWidth::U32;
        let ds = load(std::slice::from_ref(&p32), &[], &tok, &o).unwrap();
        assert_eq!(rows_of(&ds.train), vec![vec![70000, 6, 7]]);
        // 10 bytes is not a whole number of u32 tokens.
        let err = load(std::slice::from_ref(&p16), &[], &tok, &o).unwrap_err();
        assert!(
            err.to_string().contains("not a whole number of 4-byte"),
            "{err}"
        );
        // Out of vocabulary.
        o.vocab_size = 1000;
        let err = load(std::slice::from_ref(&p32), &[], &tok, &o).unwrap_err();
        assert!(err.to_string().contains("token 70000"), "{err}");
    }

    #[test]
    fn safetensors_input_ids_are_used_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ids.safetensors");
        let ids: Vec<i64> = (0..12).map(|i| (i * 5) % 256).collect();
        crate::hf::write_tensors(
            &p,
            &[("input_ids".into(), Tensor::i64(vec![3, 4], ids.clone()))],
        )
        .unwrap();
        let tok = Tokenizer::bytes();
        let mut o = opts(4);
        o.valid_fraction = 0.5;
        let ds = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap();
        assert!(ds.train.is_fixed());
        assert_eq!(ds.train.len(), 3);
        assert!(ds.valid.is_empty());
        let mut l = Loader::new(ds.train, 1, true).unwrap();
        assert_eq!(l.next_batch(3).to_i64_vec(), ids);
        o.seq_len = 6;
        let err = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap_err();
        assert!(err.to_string().contains("sequence length is 6"), "{err}");
        let t = dir.path().join("x.txt");
        std::fs::write(&t, "hello").unwrap();
        o.seq_len = 4;
        let err = load(&[p, t], &[], &tok, &o).unwrap_err();
        assert!(err.to_string().contains("pass it alone"), "{err}");
    }

    #[test]
    fn bad_sources_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::bytes();
        let err = load(&[dir.path().join("missing")], &[], &tok, &opts(4)).unwrap_err();
        assert!(
            err.to_string().contains("no such file or directory"),
            "{err}"
        );
        let err = load(&[dir.path().to_path_buf()], &[], &tok, &opts(4)).unwrap_err();
        assert!(err.to_string().contains("no *.txt files"), "{err}");
        let err = load(&[], &[], &tok, &opts(4)).unwrap_err();
        assert!(err.to_string().contains("no training data"), "{err}");
        let p = dir.path().join("short.txt");
        std::fs::write(&p, "abc").unwrap();
        let err = load(std::slice::from_ref(&p), &[], &tok, &opts(4)).unwrap_err();
        assert!(
            err.to_string().contains("3 tokens, need at least 4"),
            "{err}"
        );
        let mut o = opts(2);
        o.vocab_size = 98;
        let err = load(std::slice::from_ref(&p), &[], &tok, &o).unwrap_err();
        assert!(
            err.to_string().contains("outside the model's vocabulary"),
            "{err}"
        );
    }

    #[test]
    fn hf_tokenized_text() {
        let dir = tempfile::tempdir().unwrap();
        let tok_path = super::super::tokenizer::tests::write_word_level(dir.path());
        let tok = Tokenizer::from_file(&tok_path).unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "hello world . the cat").unwrap();
        let q = dir.path().join("b.txt");
        std::fs::write(&q, "the the").unwrap();
        let mut o = opts(4);
        o.vocab_size = 7;
        let ds = load(&[p, q], &[], &tok, &o).unwrap();
        assert_eq!(rows_of(&ds.train), vec![vec![2, 3, 6, 4], vec![5, 1, 4, 4]]);
    }

    /// `cargo test --release --lib train::data::tests::corpus -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn corpus_tokenization_time() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
        let root = if root.is_dir() {
            root
        } else {
            PathBuf::from("/work/shared/corpus")
        };
        let tok = Tokenizer::bytes();
        let mut o = opts(4096);
        o.valid_fraction = 0.01;
        let t0 = std::time::Instant::now();
        let ds = load(&[root.join("train")], &[], &tok, &o).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "corpus/train: {} docs, {} tokens, {} train rows + {} valid rows of {}, {:.3} s ({:.1} M tokens/s)",
            ds.stats.docs,
            ds.stats.tokens,
            ds.train.len(),
            ds.valid.len(),
            o.seq_len,
            dt,
            ds.stats.tokens as f64 / dt / 1e6
        );
        let t0 = std::time::Instant::now();
        let mut l = Loader::new(ds.train, 1, true).unwrap();
        for _ in 0..100 {
            l.next_batch(1);
        }
        println!("100 batches of 1×4096: {:.3} s", t0.elapsed().as_secs_f64());
    }
}
