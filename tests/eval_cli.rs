//! Evaluation and generation as users run them: `lcc eval ppl`, `lcc eval
//! passkey`, `lcc generate`, and the library functions behind them.

mod common;

use common::*;
use lcc::ir::{Tensor, Weight};
use lcc::train::{eval, passkey, tokenizer::Tokenizer};
use std::path::{Path, PathBuf};

fn tiny_hf() -> PathBuf {
    tiny().join("hf")
}

/// `len` bytes of English text (so `len` byte-level tokens).
fn text_file(dir: &Path, len: usize) -> PathBuf {
    let sentence = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
    let text: String = sentence.chars().cycle().take(len).collect();
    let path = dir.join("valid.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn ppl_json_counts_windows_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = text_file(dir.path(), 1000);
    let o = lcc(&[
        "eval",
        "ppl",
        tiny_hf().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "64,128",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        let keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for k in ["ctx", "ppl", "ppl_token_weighted", "windows", "tokens"] {
            assert!(keys.contains(&k), "{k} missing from {row}");
        }
        let ppl = row["ppl"].as_f64().unwrap();
        // A random model on a 256-token vocabulary: near uniform.
        assert!(ppl > 50.0 && ppl < 1000.0, "{ppl}");
    }
    // Starts 0, 64, …, 896 (15 windows); 0, 128, …, 768 (7 windows).
    assert_eq!(rows[0]["ctx"], 64);
    assert_eq!(rows[0]["windows"], 15);
    assert_eq!(rows[0]["tokens"], 15 * 63);
    assert_eq!(rows[1]["windows"], 7);
    assert_eq!(rows[1]["tokens"], 7 * 127);

    // Stride and a window cap.
    let o = lcc(&[
        "eval",
        "ppl",
        tiny_hf().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "100",
        "--stride",
        "50",
        "--max-windows",
        "4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["windows"], 4);
    assert_eq!(v[0]["tokens"], 4 * 99);
}

#[test]
fn ppl_table_s2_attention_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let data = text_file(dir.path(), 600);
    let svg = dir.path().join("ppl.svg");
    let args = |attention: &str| {
        vec![
            "eval".to_string(),
            "ppl".into(),
            tiny_hf().to_str().unwrap().into(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--ctx".into(),
            "64,128".into(),
            "--attention".into(),
            attention.into(),
            "--plot".into(),
            svg.to_str().unwrap().into(),
        ]
    };
    let run = |attention: &str| {
        let a = args(attention);
        lcc(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let full = run("full");
    assert!(full.status.success(), "{}", stderr(&full));
    let table = stdout(&full);
    assert!(
        table.contains("windows") && table.contains("ppl"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 3, "{table}");
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawn.contains("<svg") && drawn.contains("polyline"),
        "{drawn}"
    );

    let s2 = run("s2");
    assert!(s2.status.success(), "{}", stderr(&s2));
    assert_ne!(stdout(&s2), table, "S²-Attn should change the perplexity");
}

#[test]
fn ppl_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = text_file(dir.path(), 100);
    let o = lcc(&[
        "eval",
        "ppl",
        tiny_hf().to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--ctx",
        "256",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("fewer than one window") && e.contains("shorter context"),
        "{e}"
    );

    let o = lcc(&[
        "eval",
        "ppl",
        tiny_hf().to_str().unwrap(),
        "--data",
        dir.path().join("missing.txt").to_str().unwrap(),
        "--ctx",
        "16",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("missing.txt"), "{}", stderr(&o));
}

#[test]
fn uniform_logits_have_perplexity_vocab_size() {
    let mut g = lcc::hf::load(&tiny_hf()).unwrap();
    let zeros = Tensor::f32(vec![256, 64], vec![0.0; 256 * 64]);
    g.weights
        .insert(Weight::from_tensor("lm_head.weight", &zeros, false));
    let tokens: Vec<u32> = (0..200).map(|i| (i * 37 % 256) as u32).collect();
    let r = eval::perplexity(&g, &tokens, 32, 32, None, lcc::runtime::ComputeDType::F32).unwrap();
    assert_eq!((r.windows, r.tokens), (6, 6 * 31));
    assert!((r.ppl - 256.0).abs() < 1e-9, "{}", r.ppl);
    assert!((r.ppl_token_weighted - 256.0).abs() < 1e-9);
}

#[test]
fn generate_is_deterministic_with_a_seed() {
    let hf = tiny_hf();
    let run = |seed: &str, temperature: &str| {
        let o = lcc(&[
            "generate",
            hf.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--max-new-tokens",
            "12",
            "--temperature",
            temperature,
            "--top-p",
            "0.9",
            "--seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
        o.stdout
    };
    assert_eq!(run("1", "0.8"), run("1", "0.8"));
    assert_ne!(run("1", "5"), run("2", "5"));
    assert_eq!(run("1", "0"), run("2", "0"), "greedy ignores the seed");

    // Greedy via the CLI is greedy via the library.
    let g = lcc::hf::load(&hf).unwrap();
    let tok = Tokenizer::bytes();
    let ids = tok.encode("Once upon a time").unwrap();
    let out = lcc::train::generate::generate(
        &g,
        &ids,
        12,
        &lcc::train::generate::Sampling::greedy(),
        Some(2),
        lcc::runtime::ComputeDType::F32,
    )
    .unwrap();
    let cli = String::from_utf8_lossy(&run("0", "0")).into_owned();
    assert_eq!(cli.strip_suffix('\n').unwrap(), tok.decode(&out));
}

#[test]
fn generate_with_an_adapter_and_trainable_params() {
    let peft = fixtures().join("peft");
    let o = lcc(&[
        "generate",
        tiny_hf().to_str().unwrap(),
        "--adapter",
        peft.join("adapter").to_str().unwrap(),
        "--trainable",
        peft.join("trainable_params.safetensors").to_str().unwrap(),
        "--prompt",
        "abc",
        "--max-new-tokens",
        "4",
        "--threads",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let o = lcc(&[
        "generate",
        tiny_hf().to_str().unwrap(),
        "--prompt",
        "",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--prompt is empty"), "{}", stderr(&o));
}

#[test]
fn passkey_prompt_is_sized_and_holds_the_key() {
    let tok = Tokenizer::bytes();
    let mut rng = lcc::util::SplitMix64::new(11);
    let p = passkey::passkey_prompt(&tok, 1024, &mut rng).unwrap();
    assert!(
        p.tokens.len() <= 1024 && p.tokens.len() >= 1020,
        "{}",
        p.tokens.len()
    );
    assert!(p.text.contains(&format!("The pass key is {}.", p.key)));
    assert!(p.text.ends_with("What is the pass key? The pass key is"));

    let o = lcc(&[
        "eval",
        "passkey",
        tiny_hf().to_str().unwrap(),
        "--lengths",
        "256,320",
        "--trials",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["length"], 256);
    assert_eq!(v[0]["trials"], 2);
    let acc = v[1]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(v[1]["mean_prompt_tokens"].as_f64().unwrap() <= 320.0);
}

#[test]
fn help_lists_the_defaults() {
    let o = lcc(&["eval", "ppl", "--help"]);
    let h = stdout(&o);
    for s in [
        "--stride",
        "--max-windows",
        "--attention",
        "[default: full]",
        "--plot",
    ] {
        assert!(h.contains(s), "{s} missing from\n{h}");
    }
    let h = stdout(&lcc(&["generate", "--help"]));
    for s in [
        "--temperature",
        "[default: 0]",
        "--top-p",
        "[default: 1]",
        "--seed",
    ] {
        assert!(h.contains(s), "{s} missing from\n{h}");
    }
    let h = stdout(&lcc(&["eval", "passkey", "--help"]));
    assert!(h.contains("[default: 10]"), "{h}");
}
