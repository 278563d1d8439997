//! `s2attn`: shifted sparse attention (LongLoRA S²-Attn). The tiny LLaMA
//! with the pass matches a PyTorch reference patched into transformers
//! (tests/fixtures/gen/make_s2attn_fixtures.py); the CPU kernel matches a
//! naive masked softmax in f64; the ONNX export runs in onnxruntime at any
//! length with lcc's outputs; `inference: true` undoes the pass exactly.

mod common;

use common::*;
use lcc::ir::{
    self, AttentionAttrs, AttentionPattern, DType, Dim, Graph, GroupSize, Op, Tensor, TensorType,
};
use lcc::passes::{Pipeline, RunOptions};
use lcc::runtime::cpu::kernels;
use lcc::runtime::{cpu::CpuBackend, Backend};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn s2() -> PathBuf {
    fixtures().join("s2attn")
}

fn tiny_hf() -> Graph {
    lcc::hf::load(&tiny().join("hf")).unwrap()
}

/// Runs a one-pass pipeline given as YAML options, e.g. `{group_size: 4}`.
fn apply(graph: &mut Graph, options: &str) -> lcc::passes::Report {
    let p = Pipeline::from_yaml_str(
        &format!("passes:\n  - s2attn: {options}\n"),
        Path::new("test.yaml"),
    )
    .unwrap();
    p.run(
        graph,
        &RunOptions {
            verify: true,
            ..Default::default()
        },
        |_, _| {},
    )
    .unwrap()
    .remove(0)
}

fn try_apply(graph: &mut Graph, options: &str) -> lcc::Result<Vec<lcc::passes::Report>> {
    let p = Pipeline::from_yaml_str(
        &format!("passes:\n  - s2attn: {options}\n"),
        Path::new("test.yaml"),
    )?;
    p.run(
        graph,
        &RunOptions {
            verify: true,
            ..Default::default()
        },
        |_, _| {},
    )
}

fn exec(graph: &Graph, inputs: &Path) -> HashMap<String, Tensor> {
    CpuBackend::new().run(graph, &read(inputs)).unwrap()
}

#[test]
fn tiny_llama_matches_the_pytorch_reference() {
    let cases = [
        ("{}", "inputs_s16", "logits_s16_fraction"),
        ("{group_size: 4}", "inputs_s18", "logits_s18_size4"),
        ("{wrap: true}", "inputs_s16", "logits_s16_wrap"),
        (
            "{group_fraction: 0.25, wrap: false}",
            "inputs_s16",
            "logits_s16_fraction",
        ),
    ];
    let full = read(&s2().join("logits_s16_full.safetensors"));
    for (options, inputs, golden) in cases {
        let mut g = tiny_hf();
        let report = apply(&mut g, options);
        assert_eq!(report.matched, 2, "{options}: one attention per layer");
        let got = exec(&g, &s2().join(format!("{inputs}.safetensors")));
        let want = read(&s2().join(format!("{golden}.safetensors")));
        let d = max_abs_diff(&got["logits"], &want["logits"]);
        eprintln!("{options}: max |lcc − torch| = {d:.2e}");
        assert!(d < 1e-4, "{options}: {d}");
        if inputs == "inputs_s16" {
            // The pattern matters: full attention is far from it.
            assert!(max_abs_diff(&got["logits"], &full["logits"]) > 0.1);
        }
    }
    // Unpatched lcc agrees with unpatched torch on these inputs.
    let got = exec(&tiny_hf(), &s2().join("inputs_s16.safetensors"));
    assert!(max_abs_diff(&got["logits"], &full["logits"]) < 1e-4);
}

#[test]
fn wrap_and_no_wrap_differ_only_where_tokens_cross_the_end() {
    let ids = s2().join("inputs_s16.safetensors");
    let (mut a, mut b) = (tiny_hf(), tiny_hf());
    apply(&mut a, "{}");
    apply(&mut b, "{wrap: true}");
    let (a, b) = (exec(&a, &ids), exec(&b, &ids));
    assert!(max_abs_diff(&a["logits"], &b["logits"]) > 0.1);
}

#[test]
fn inference_restores_the_original_print_and_logits() {
    let original = tiny_hf();
    let ids = s2().join("inputs_s16.safetensors");
    let mut g = tiny_hf();
    apply(&mut g, "{wrap: true, group_size: 4}");
    assert_ne!(ir::print(&g).unwrap(), ir::print(&original).unwrap());
    let r = apply(&mut g, "{inference: true, group_size: 4}");
    assert_eq!(r.matched, 2);
    assert!(r.notes.iter().any(|n| n.contains("ignored")), "{r:?}");
    assert_eq!(ir::print(&g).unwrap(), ir::print(&original).unwrap());
    assert_eq!(exec(&g, &ids)["logits"], exec(&original, &ids)["logits"]);
    // On a full-attention graph it changes nothing.
    let r = apply(&mut g, "{inference: true}");
    assert_eq!(r.matched, 0);
    assert_eq!(ir::print(&g).unwrap(), ir::print(&original).unwrap());
}

#[test]
fn attention_print_line_after_the_pass() {
    let mut g = tiny_hf();
    apply(&mut g, "{}");
    let text = ir::print(&g).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("= Attention{"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        "  %7 = Attention{heads=4, kv_heads=2, head_dim=16, scale=0.25, pattern=shifted_sparse, \
         group_fraction=0.25}(%3, %5, %6) : f32[batch,seq,64]"
    );
    let mut g = tiny_hf();
    apply(&mut g, "{group_size: 4096, wrap: true}");
    let text = ir::print(&g).unwrap();
    let line = text.lines().find(|l| l.contains("= Attention{")).unwrap();
    assert_eq!(
        line,
        "  %7 = Attention{heads=4, kv_heads=2, head_dim=16, scale=0.25, pattern=shifted_sparse, \
         group_size=4096, wrap=1}(%3, %5, %6) : f32[batch,seq,64]"
    );
}

#[test]
fn a_second_run_is_a_no_op_and_new_settings_replace_old_ones() {
    let mut g = tiny_hf();
    apply(&mut g, "{}");
    let once = ir::print(&g).unwrap();
    let r = apply(&mut g, "{}");
    assert_eq!(r.matched, 0);
    assert!(
        r.notes.iter().any(|n| n.contains("already applied")),
        "{r:?}"
    );
    assert_eq!(ir::print(&g).unwrap(), once);
    let r = apply(&mut g, "{group_size: 4}");
    assert_eq!(r.matched, 2);
    assert!(ir::print(&g).unwrap().contains("group_size=4"));
    let mut h = tiny_hf();
    apply(&mut h, "{group_size: 4}");
    assert_eq!(ir::print(&g).unwrap(), ir::print(&h).unwrap());
}

#[test]
fn option_and_graph_errors_say_what_to_do() {
    let mut g = tiny_hf();
    let e = try_apply(&mut g, "{group_fraction: 0.5, group_size: 8}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("exclusive"), "{e}");
    let e = try_apply(&mut g, "{group_fraction: 1.5}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("(0, 1]"), "{e}");
    let e = try_apply(&mut g, "{groups: 4}").unwrap_err().to_string();
    assert!(
        e.contains("pass 's2attn': bad options") && e.contains("groups"),
        "{e}"
    );

    // A primitive ONNX graph has no LLaMA-level Attention yet.
    // (raised on demand; with --no-raise, refused).
    let mut onnx = lcc::onnx::load(&tiny().join(EXPORTS[0])).unwrap();
    let e = run_no_raise(&mut onnx.clone(), "passes: [s2attn]");
    assert!(
        e.contains("pass 's2attn'") && e.contains("primitive ONNX") && e.contains("raise"),
        "{e}"
    );
    let reports = try_apply(&mut onnx, "{}").unwrap();
    assert!(reports[0].automatic && reports[1].matched == 2);

    // Odd head counts cannot be split in halves.
    let mut odd = one_attention_graph(3, 1, 4);
    let e = try_apply(&mut odd, "{}").unwrap_err().to_string();
    assert!(e.contains("3 heads") && e.contains("even"), "{e}");
}

#[test]
fn a_group_longer_than_the_sequence_is_a_run_time_error() {
    let mut g = tiny_hf();
    apply(&mut g, "{group_size: 32}");
    let inputs = read(&s2().join("inputs_s16.safetensors"));
    let e = CpuBackend::new().run(&g, &inputs).unwrap_err().to_string();
    assert!(
        e.contains("group size 32 exceeds the sequence length 16"),
        "{e}"
    );
}

fn one_attention_graph(heads: usize, kv_heads: usize, hd: usize) -> Graph {
    let mut g = Graph::new();
    let ty = |h: usize| {
        TensorType::new(
            DType::F32,
            vec![
                Dim::sym("batch"),
                Dim::sym("seq"),
                Dim::Fixed((h * hd) as u64),
            ],
        )
    };
    let q = g.add_input("q", ty(heads));
    let k = g.add_input("k", ty(kv_heads));
    let v = g.add_input("v", ty(kv_heads));
    let a = g
        .add(
            "attn",
            Op::Attention(AttentionAttrs {
                num_heads: heads,
                num_kv_heads: kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                pattern: AttentionPattern::FullCausal,
            }),
            &[q, k, v],
            Some(ty(heads)),
        )
        .unwrap();
    g.outputs.push(("y".into(), a));
    g
}

// ---------------------------------------------------------------------------
// The kernel against a naive reference

/// Deterministic values in [-2, 2).
fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect()
}

fn t64(shape: [usize; 3], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        dtype: DType::F64,
        shape: shape.to_vec(),
        data: ir::TensorData::F64(values(seed, n)),
    }
}

/// May query i see key j: straight from the definition, group by group.
fn visible(i: usize, j: usize, len: usize, g: usize, shifted: bool, wrap: bool) -> bool {
    let s = g / 2;
    let (pi, pj, start) = match (shifted, wrap) {
        (false, _) => (i, j, 0),
        // Rolled by −G/2: token i sits at (i − G/2) mod L.
        (true, true) => ((i + len - s) % len, (j + len - s) % len, 0),
        (true, false) => (i, j, s),
    };
    // Group bounds: [0,start) then [start + kG, start + (k+1)G).
    let group_of = |p: usize| if p < start { 0 } else { 1 + (p - start) / g };
    pj <= pi && group_of(pi) == group_of(pj)
}

fn naive(q: &Tensor, k: &Tensor, v: &Tensor, a: &AttentionAttrs, g: usize, wrap: bool) -> Vec<f64> {
    let (q, k, v) = (q.to_f64_vec(), k.to_f64_vec(), v.to_f64_vec());
    let (h, kvh, d) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let len = q.len() / (h * d) / 2;
    let batch = q.len() / (len * h * d);
    let mut out = vec![0.0; q.len()];
    for b in 0..batch {
        for hh in 0..h {
            let kh = hh / (h / kvh);
            for i in 0..len {
                let qi = &q[(b * len + i) * h * d + hh * d..][..d];
                let scores: Vec<Option<f64>> = (0..len)
                    .map(|j| {
                        visible(i, j, len, g, hh >= h / 2, wrap).then(|| {
                            let kj = &k[(b * len + j) * kvh * d + kh * d..][..d];
                            qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>() * a.scale as f64
                        })
                    })
                    .collect();
                let m = scores
                    .iter()
                    .flatten()
                    .fold(f64::NEG_INFINITY, |x, &y| x.max(y));
                let w: Vec<f64> = scores
                    .iter()
                    .map(|s| s.map_or(0.0, |s| (s - m).exp()))
                    .collect();
                let z: f64 = w.iter().sum();
                for (j, wj) in w.iter().enumerate() {
                    let vj = &v[(b * len + j) * kvh * d + kh * d..][..d];
                    let o = &mut out[(b * len + i) * h * d + hh * d..][..d];
                    for c in 0..d {
                        o[c] += wj / z * vj[c];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn kernel_matches_a_naive_masked_softmax() {
    // (heads, kv_heads, len, group, wrap): GQA across the halves, odd
    // lengths, L < 2G, G = 1, groups over one 128-row tile.
    let cases = [
        (4, 2, 16, GroupSize::Fraction(0.25), false),
        (4, 2, 16, GroupSize::Fraction(0.25), true),
        (6, 3, 11, GroupSize::Tokens(4), false),
        (6, 3, 11, GroupSize::Tokens(4), true),
        (4, 1, 11, GroupSize::Fraction(0.25), true), // G = round(2.75) = 3
        (2, 2, 6, GroupSize::Tokens(4), false),      // L < 2G
        (2, 2, 6, GroupSize::Tokens(4), true),
        (4, 4, 7, GroupSize::Tokens(7), true), // one group
        (2, 1, 5, GroupSize::Tokens(1), false),
        (4, 2, 300, GroupSize::Fraction(0.5), false), // G = 150 > one tile
        (4, 2, 300, GroupSize::Tokens(130), true),
    ];
    for (n, &(h, kvh, len, group, wrap)) in cases.iter().enumerate() {
        let d = 8;
        let a = AttentionAttrs {
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            scale: 0.35,
            pattern: AttentionPattern::ShiftedSparse { group, wrap },
        };
        let seed = 10 * n as u64;
        let q = t64([2, len, h * d], seed + 1);
        let k = t64([2, len, kvh * d], seed + 2);
        let v = t64([2, len, kvh * d], seed + 3);
        let got = kernels::attention(&q, &k, &v, &a).unwrap();
        let want = naive(&q, &k, &v, &a, group.tokens(len), wrap);
        let worst = got
            .to_f64_vec()
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-12, "case {n} {:?}: {worst}", cases[n]);
        // Deterministic, bit for bit.
        assert_eq!(got, kernels::attention(&q, &k, &v, &a).unwrap());
        // And f32 agrees with f64.
        let f = |t: &Tensor| {
            Tensor::f32(
                t.shape.clone(),
                t.to_f64_vec().iter().map(|&x| x as f32).collect(),
            )
        };
        let got32 = kernels::attention(&f(&q), &f(&k), &f(&v), &a).unwrap();
        let worst32 = got32
            .to_f64_vec()
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst32 < 1e-5, "case {n} f32: {worst32}");
    }
}

#[test]
fn kernel_errors() {
    let a = |h: usize, group: GroupSize| AttentionAttrs {
        num_heads: h,
        num_kv_heads: 1,
        head_dim: 4,
        scale: 0.5,
        pattern: AttentionPattern::ShiftedSparse { group, wrap: false },
    };
    let q = t64([1, 6, 8], 1);
    let kv = t64([1, 6, 4], 2);
    let e = kernels::attention(&q, &kv, &kv, &a(2, GroupSize::Tokens(8))).unwrap_err();
    assert!(
        e.contains("group size 8 exceeds the sequence length 6"),
        "{e}"
    );
    let q3 = t64([1, 6, 12], 1);
    let e = kernels::attention(&q3, &kv, &kv, &a(3, GroupSize::Tokens(2))).unwrap_err();
    assert!(e.contains("(odd)"), "{e}");
}

// ---------------------------------------------------------------------------
// ONNX export

/// /work/pyenv's Python when present (this project's venv), else tests/common's.
fn onnx_python() -> Option<PathBuf> {
    let venv = PathBuf::from("/work/pyenv/bin/python");
    if std::env::var_os("LCC_PYTHON").is_none() && venv.exists() {
        return Some(venv);
    }
    python()
}

#[test]
fn onnx_export_runs_in_onnxruntime_at_any_length() {
    let dir = tempfile::tempdir().unwrap();
    // Lengths 16, 18 (fraction 0.25 → G = round(4.5) = 5) and 7 (G = 2).
    let cases = [
        ("{}", "s16"),
        ("{}", "s18"),
        ("{wrap: true}", "s18"),
        ("{group_size: 4}", "s18"),
        ("{group_size: 4, wrap: true}", "s18"),
        ("{group_fraction: 0.3, wrap: true}", "s7"),
    ];
    let py = onnx_python();
    for (n, (options, seq)) in cases.iter().enumerate() {
        let mut g = tiny_hf();
        apply(&mut g, options);
        let inputs = if *seq == "s7" {
            tiny().join("inputs_s7.safetensors")
        } else {
            s2().join(format!("inputs_{seq}.safetensors"))
        };
        let want = exec(&g, &inputs);
        let model = dir.path().join(format!("m{n}.onnx"));
        lcc::onnx::save(&g, &model, &Default::default()).unwrap();
        // lcc runs its own export with the same result.
        let back = lcc::onnx::load(&model).unwrap();
        let got = exec(&back, &inputs);
        let d = max_abs_diff(&got["logits"], &want["logits"]);
        assert!(
            d < 1e-4,
            "{options} {seq}: exported graph in lcc differs by {d}"
        );
        if let Some(py) = &py {
            let expected = dir.path().join(format!("m{n}_expected.safetensors"));
            lcc::hf::write_tensors(&expected, &[("logits".into(), want["logits"].clone())])
                .unwrap();
            check_with_onnxruntime(py, &model, &inputs, &expected, 1e-4);
        }
    }
}
