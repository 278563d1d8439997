//! LoRA, trainable, merge-lora and PEFT adapters against PEFT's own numbers
//! (tests/fixtures/peft, made by tests/fixtures/gen/make_peft_fixtures.py).

mod common;

use common::{fixtures, max_abs_diff, read, run_no_raise, tiny};
use lcc::hf::peft::{self, load_adapter, load_trainable, save_adapter};
use lcc::ir::{print, Graph, Op, Tensor};
use lcc::passes::{lora, Pipeline, Report, RunOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn peft_dir() -> PathBuf {
    fixtures().join("peft")
}

fn tiny_graph() -> Graph {
    lcc::hf::load(&tiny().join("hf")).unwrap()
}

fn logits(graph: &Graph) -> Tensor {
    let inputs = read(&tiny().join("inputs_s7.safetensors"));
    let mut out = lcc::runtime::cpu::run(graph, &inputs).unwrap();
    out.remove("logits").unwrap()
}

fn golden(file: &str) -> Tensor {
    read(&peft_dir().join(file)).remove("logits").unwrap()
}

fn run_passes(graph: &mut Graph, recipe: &str) -> Vec<Report> {
    let p = Pipeline::from_yaml_str(recipe, Path::new("test.yaml")).unwrap();
    p.run(
        graph,
        &RunOptions {
            verify: true,
            ..Default::default()
        },
        |_, _| {},
    )
    .unwrap()
}

fn run_err(graph: &mut Graph, recipe: &str) -> String {
    let p = Pipeline::from_yaml_str(recipe, Path::new("test.yaml")).unwrap();
    p.run(
        graph,
        &RunOptions {
            verify: true,
            ..Default::default()
        },
        |_, _| {},
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn adapter_logits_match_peft() {
    let mut g = tiny_graph();
    let adapter = load_adapter(&peft_dir().join("adapter")).unwrap();
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.config.lora_alpha, 16.0);
    assert_eq!(adapter.tensors.len(), 2 * 4 * 2);
    let report = lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
    assert_eq!(report.matched, 8);
    lcc::ir::verify(&g).unwrap();
    let d = max_abs_diff(&logits(&g), &golden("logits_s7.safetensors"));
    eprintln!("adapter logits vs PEFT: max abs diff {d:.3e}");
    assert!(d < 1e-4, "{d}");
    // The adapter changes the output (B is not zero).
    let base = read(&tiny().join("logits_s7.safetensors"))
        .remove("logits")
        .unwrap();
    assert!(max_abs_diff(&logits(&g), &base) > 0.1);
}

#[test]
fn rslora_adapter_logits_match_peft() {
    let mut g = tiny_graph();
    let adapter = load_adapter(&peft_dir().join("rslora")).unwrap();
    assert!(adapter.config.use_rslora);
    lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
    let d = max_abs_diff(&logits(&g), &golden("rslora_logits_s7.safetensors"));
    eprintln!("rsLoRA (r=4, alpha=8, q/v/gate) logits vs PEFT: max abs diff {d:.3e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn merge_matches_peft_merge_and_unload() {
    let g = lcc::merge::merge(&tiny().join("hf"), &peft_dir().join("adapter"), None).unwrap();
    assert!(!g
        .g
        .node_weights()
        .any(|n| matches!(n.op, Op::LoraLinear(_))));
    assert!(!g.weights.iter().any(|w| w.name.contains("lora_")));
    assert_eq!(g.weights.len(), 1 + 2 * 9 + 2);
    let want = read(&peft_dir().join("merged_layer0.safetensors"));
    assert_eq!(want.len(), 2);
    for (name, t) in &want {
        let got = g.weights.get(name).unwrap().to_tensor().unwrap();
        let d = max_abs_diff(&got, t);
        eprintln!("merged {name} vs PEFT: max abs diff {d:.3e}");
        assert!(d < 1e-6, "{name}: {d}");
    }
    let d = max_abs_diff(&logits(&g), &golden("merged_logits_s7.safetensors"));
    eprintln!("merged logits vs PEFT: max abs diff {d:.3e}");
    assert!(d < 1e-4, "{d}");

    // With LongLoRA's trainable params (embed + norms, PEFT-prefixed names).
    let g = lcc::merge::merge(
        &tiny().join("hf"),
        &peft_dir().join("adapter"),
        Some(&peft_dir().join("trainable_params.safetensors")),
    )
    .unwrap();
    let d = max_abs_diff(
        &logits(&g),
        &golden("merged_trainable_logits_s7.safetensors"),
    );
    eprintln!("merged + trainable params logits vs PEFT: max abs diff {d:.3e}");
    assert!(d < 1e-4, "{d}");

    // The merged model saves as a plain HF dir and reloads to the same logits.
    let tmp = tempfile::tempdir().unwrap();
    lcc::hf::save(&g, tmp.path()).unwrap();
    let back = lcc::hf::load(tmp.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&back), &logits(&g)), 0.0);
}

#[test]
fn merge_lora_pass_composes_with_lora() {
    let mut g = tiny_graph();
    let adapter = load_adapter(&peft_dir().join("adapter")).unwrap();
    lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
    let params = g.weights.num_params() as i64;
    let r = run_passes(&mut g, "passes: [merge-lora]");
    assert_eq!(r[0].matched, 8);
    assert_eq!(r[0].params_added, -(2 * 8 * (128 + 96 + 96 + 128)));
    assert_eq!(g.weights.num_params() as i64, params + r[0].params_added);
    // Nothing left to merge: a no-op.
    let r = run_passes(&mut g, "passes: [merge-lora]");
    assert_eq!((r[0].matched, r[0].params_added), (0, 0));
    assert!(r[0].notes[0].contains("nothing to merge"));
}

#[test]
fn lora_pass_adds_peft_named_weights_with_peft_init() {
    let mut g = tiny_graph();
    let base_logits = logits(&g);
    let reports = run_passes(&mut g, "passes: [lora]");
    let r = &reports[0];
    assert_eq!(r.matched, 8);
    // Per layer: q, o [64←64], k, v [32←64]; rank 8.
    assert_eq!(r.params_added, 2 * 8 * (128 + 96 + 96 + 128));
    let mut lora: Vec<&str> = g
        .weights
        .iter()
        .filter(|w| w.name.contains("lora_"))
        .map(|w| w.name.as_str())
        .collect();
    lora.sort();
    let mut want = Vec::new();
    for l in 0..2 {
        for m in ["k", "o", "q", "v"] {
            for ab in ["A", "B"] {
                want.push(format!(
                    "base_model.model.model.layers.{l}.self_attn.{m}_proj.lora_{ab}.weight"
                ));
            }
        }
    }
    assert_eq!(lora, want);
    // PEFT's own adapter file uses exactly these names.
    let adapter = load_adapter(&peft_dir().join("adapter")).unwrap();
    let mut peft_names: Vec<&str> = adapter.tensors.iter().map(|(n, _)| n.as_str()).collect();
    peft_names.sort();
    assert_eq!(lora, peft_names);

    let a = g
        .weights
        .get("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape, vec![8, 64]);
    assert!(a.trainable);
    let a = a.to_tensor().unwrap();
    let v = a.to_f64_vec();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let absmax = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    eprintln!("lora_A [8,64]: mean {mean:.4} std {std:.4} absmax {absmax:.4} (bound 0.125)");
    // kaiming_uniform(a=√5) on fan_in 64: U(-1/8, 1/8), std 1/(8√3) = 0.0722.
    assert!(absmax < 0.125 && absmax > 0.12, "{absmax}");
    assert!((std - 0.0722).abs() < 0.006, "{std}");
    assert!(mean.abs() < 0.012, "{mean}");
    let b = g
        .weights
        .get("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape, vec![32, 8]);
    assert!(b.trainable);
    assert!(b
        .to_tensor()
        .unwrap()
        .to_f64_vec()
        .iter()
        .all(|&x| x == 0.0));
    assert!(
        !g.weights
            .get("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .trainable
    );
    // B = 0: the model computes what it did.
    assert!(max_abs_diff(&logits(&g), &base_logits) < 1e-6);

    let text = print(&g).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("LoraLinear") && l.contains("layers.0.self_attn.q_proj.weight"))
        .unwrap();
    assert_eq!(
        line,
        "  %2 = LoraLinear{rank=8, alpha=16.0}(%1, @model.layers.0.self_attn.q_proj.weight, @base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, @base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight) : f32[batch,seq,64]"
    );
    assert!(text.contains(
        "  weight @base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: f32[8,64] trainable\n"
    ));

    // Already applied: a no-op; more targets add only the new ones.
    let before = print(&g).unwrap();
    let r = run_passes(&mut g, "passes: [lora]");
    assert_eq!((r[0].matched, r[0].params_added), (0, 0));
    assert!(
        r[0].notes[0].contains("8 target projections already"),
        "{:?}",
        r[0].notes
    );
    assert_eq!(print(&g).unwrap(), before);
    let r = run_passes(
        &mut g,
        "passes: [lora: {targets: [q, v, gate], rank: 4, alpha: 8, rslora: true}]",
    );
    assert_eq!(r[0].matched, 2);
    assert_eq!(r[0].params_added, 2 * 4 * (64 + 128));
    let text = print(&g).unwrap();
    assert!(
        text.contains("LoraLinear{rank=4, alpha=8.0, rslora=1}"),
        "{text}"
    );

    // Seeds: same seed, same values; another seed, other values.
    let mut g2 = tiny_graph();
    run_passes(&mut g2, "passes: [lora: {targets: [k]}]");
    let name = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight";
    let same = g2.weights.get(name).unwrap().to_tensor().unwrap();
    assert_eq!(same, a);
    let mut g3 = tiny_graph();
    run_passes(&mut g3, "passes: [lora: {targets: [k], seed: 7}]");
    assert_ne!(g3.weights.get(name).unwrap().to_tensor().unwrap(), same);
}

#[test]
fn trainable_marks_embed_and_norms() {
    let mut g = tiny_graph();
    let r = run_passes(&mut g, "passes: [lora, trainable]");
    assert_eq!(r[1].matched, 6);
    let mut t: Vec<&str> = g
        .weights
        .iter()
        .filter(|w| w.trainable && !w.name.contains("lora_"))
        .map(|w| w.name.as_str())
        .collect();
    t.sort();
    assert_eq!(
        t,
        vec![
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.norm.weight",
        ]
    );
    assert_eq!(
        g.weights
            .iter()
            .filter(|w| w.name.contains("lora_") && w.trainable)
            .count(),
        16
    );
    // lm_head added; a second run with the same patterns changes nothing.
    let r = run_passes(
        &mut g,
        "passes: [trainable: {patterns: [embed, norm, lm_head]}]",
    );
    assert_eq!(r[0].matched, 7);
    let r = run_passes(
        &mut g,
        "passes: [trainable: {patterns: [embed, norm, lm_head]}]",
    );
    assert!(
        r[0].notes[0].contains("flags changed: 0"),
        "{:?}",
        r[0].notes
    );
    // Globs; everything else is frozen again.
    run_passes(
        &mut g,
        "passes: [trainable: {patterns: ['model.layers.1.*']}]",
    );
    let t = g
        .weights
        .iter()
        .filter(|w| w.trainable && !w.name.contains("lora_"))
        .count();
    assert_eq!(t, 9);
    let e = run_err(&mut g, "passes: [trainable: {patterns: [bogus]}]");
    assert!(e.contains("pattern 'bogus' matches no weight"), "{e}");
}

#[test]
fn save_adapter_round_trips() {
    let mut g = tiny_graph();
    let adapter = load_adapter(&peft_dir().join("adapter")).unwrap();
    lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    save_adapter(&g, &dir).unwrap();
    let back = load_adapter(&dir).unwrap();
    assert_eq!(back.config.r, 8);
    assert_eq!(back.config.lora_alpha, 16.0);
    assert!(!back.config.use_rslora);
    assert_eq!(
        back.config.target_modules,
        vec!["k_proj", "o_proj", "q_proj", "v_proj"]
    );
    let want: HashMap<_, _> = adapter.tensors.iter().cloned().collect();
    assert_eq!(back.tensors.len(), want.len());
    for (name, t) in &back.tensors {
        assert_eq!(t, &want[name], "{name}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["bias"], "none");
    assert!(cfg["base_model_name_or_path"].is_null());
    // Re-applied to a fresh model, the saved adapter gives PEFT's logits.
    let mut g2 = tiny_graph();
    lora::apply_adapter(&mut g2, &back.lora()).unwrap();
    assert!(max_abs_diff(&logits(&g2), &golden("logits_s7.safetensors")) < 1e-4);

    // Trainable params written and read back.
    run_passes(&mut g, "passes: [trainable]");
    let file = tmp.path().join("trainable_params.safetensors");
    assert_eq!(peft::save_trainable(&g, &file).unwrap(), 6);
    let mut g3 = tiny_graph();
    assert_eq!(load_trainable(&mut g3, &file).unwrap(), 6);
}

#[test]
fn errors_name_what_is_wrong() {
    let mut g = tiny_graph();
    let e = run_err(&mut g, "passes: [lora: {targets: [q, x]}]");
    assert!(
        e.contains("unknown target 'x'") && e.contains("gate"),
        "{e}"
    );
    let e = run_err(&mut g, "passes: [lora: {rank: 0}]");
    assert!(e.contains("rank must be at least 1"), "{e}");
    let e = run_err(&mut g, "passes: [lora: {ranks: 4}]");
    assert!(
        e.contains("pass 'lora': bad options") && e.contains("ranks"),
        "{e}"
    );

    // A model without LLaMA-level projections (a raw torch ONNX export).
    // A torch export: raised on demand, or refused with --no-raise.
    let mut onnx = lcc::onnx::load(&tiny().join("tiny_opset17_torchscript.onnx")).unwrap();
    let e = run_no_raise(&mut onnx.clone(), "passes: [lora]");
    assert!(
        e.contains("pass 'lora'") && e.contains("primitive ONNX") && e.contains("'raise'"),
        "{e}"
    );
    let reports = run_passes(&mut onnx, "passes: [lora]");
    assert!(reports[0].automatic && reports[0].pass == "raise");
    assert_eq!(reports[1].matched, 8);

    let tmp = tempfile::tempdir().unwrap();
    let e = load_adapter(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("has no adapter_config.json"), "{e}");

    // An adapter whose rank does not match its tensors.
    let src = peft_dir().join("adapter");
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        bad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("adapter_config.json"))
        .unwrap()
        .replace("\"r\": 8", "\"r\": 4");
    std::fs::write(bad.join("adapter_config.json"), cfg).unwrap();
    let adapter = load_adapter(&bad).unwrap();
    let e = lora::apply_adapter(&mut tiny_graph(), &adapter.lora())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight' has shape [8, 64], the model's weight is [4, 64]"),
        "{e}"
    );

    // A target whose tensors are missing from the file.
    let cfg = std::fs::read_to_string(src.join("adapter_config.json"))
        .unwrap()
        .replace("\"k_proj\"", "\"k_proj\", \"up_proj\"");
    std::fs::write(bad.join("adapter_config.json"), cfg).unwrap();
    let adapter = load_adapter(&bad).unwrap();
    let e = lora::apply_adapter(&mut tiny_graph(), &adapter.lora())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no tensor 'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'"),
        "{e}"
    );
}

#[test]
fn lora_graph_exports_to_onnx_and_runs_in_onnxruntime() {
    let mut g = tiny_graph();
    let adapter = load_adapter(&peft_dir().join("adapter")).unwrap();
    lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
    let ours = logits(&g);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("lora.onnx");
    lcc::onnx::save(&g, &model, &lcc::onnx::ExportOptions::default()).unwrap();
    // The LoRA weights keep their PEFT names and layouts in the export.
    let back = lcc::onnx::load(&model).unwrap();
    let a = back
        .weights
        .get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape, vec![8, 64]);
    let d = max_abs_diff(&logits(&back), &ours);
    eprintln!("re-imported ONNX export (lcc) vs lcc: max abs diff {d:.3e}");
    assert!(d < 1e-4, "{d}");
    let Some(py) = common::python() else {
        return;
    };
    let expected = tmp.path().join("expected.safetensors");
    lcc::hf::write_tensors(&expected, &[("logits".to_string(), ours)]).unwrap();
    common::check_with_onnxruntime(
        &py,
        &model,
        &tiny().join("inputs_s7.safetensors"),
        &expected,
        1e-4,
    );
}

/// Writes the adapter that `save_adapter` makes, for checking by hand that
/// PEFT loads it: `LCC_KEEP_ADAPTER=DIR cargo test --test pass_lora keep`.
#[test]
fn keep_saved_adapter_for_peft() {
    let Some(dir) = std::env::var_os("LCC_KEEP_ADAPTER") else {
        return;
    };
    let mut g = tiny_graph();
    run_passes(
        &mut g,
        "passes: [lora: {targets: [q, v, down], rank: 4, alpha: 8, rslora: true, seed: 3}]",
    );
    // Give B values so that the adapter changes the output.
    for w in g.weights.iter().map(|w| w.name.clone()).collect::<Vec<_>>() {
        if w.ends_with("lora_B.weight") {
            let shape = g.weights.get(&w).unwrap().shape.clone();
            let n: usize = shape.iter().product();
            let t = Tensor::f32(
                shape,
                (0..n).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect(),
            );
            g.weights.insert(lcc::ir::Weight::from_tensor(&w, &t, true));
        }
    }
    let dir = PathBuf::from(dir);
    save_adapter(&g, &dir).unwrap();
    lcc::hf::write_tensors(
        &dir.join("lcc_logits_s7.safetensors"),
        &[("logits".into(), logits(&g))],
    )
    .unwrap();
}

/// A LoraLinear with a bias, built by hand: the CPU kernel against the
/// formula, and its ONNX lowering in onnxruntime.
#[test]
fn lora_linear_with_bias_matches_the_formula() {
    use lcc::ir::{DType, Dim, LoraAttrs, TensorType, Weight};
    let (in_f, out_f, rank) = (5usize, 3usize, 2usize);
    let vals = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
    let mut g = Graph::new();
    let x = g.add_input(
        "x",
        TensorType::new(DType::F32, vec![Dim::sym("batch"), Dim::Fixed(in_f as u64)]),
    );
    let w = Tensor::f32(vec![out_f, in_f], vals(out_f * in_f, 0.7));
    let a = Tensor::f32(vec![rank, in_f], vals(rank * in_f, 1.3));
    let b = Tensor::f32(vec![out_f, rank], vals(out_f * rank, 2.1));
    let bias = Tensor::f32(vec![out_f], vec![0.5, -0.25, 1.0]);
    for (name, t) in [("w", &w), ("a", &a), ("b", &b), ("bias", &bias)] {
        g.weights.insert(Weight::from_tensor(name, t, false));
    }
    let ins = [
        x,
        g.weight_value("w").unwrap(),
        g.weight_value("a").unwrap(),
        g.weight_value("b").unwrap(),
        g.weight_value("bias").unwrap(),
    ];
    let attrs = LoraAttrs {
        rank,
        alpha: 3.0,
        rslora: true,
        dropout: 0.1,
    };
    let y = g
        .add(
            "proj",
            Op::LoraLinear(attrs.clone()),
            &ins,
            Some(TensorType::new(
                DType::F32,
                vec![Dim::sym("batch"), Dim::Fixed(out_f as u64)],
            )),
        )
        .unwrap();
    g.outputs.push(("y".into(), y));
    lcc::ir::verify(&g).unwrap();
    assert!(print(&g)
        .unwrap()
        .contains("= LoraLinear{rank=2, alpha=3.0, rslora=1, dropout=0.1}(%x, @w, @a, @b, @bias) : f32[batch,3]"));
    let xs = Tensor::f32(vec![4, in_f], vals(4 * in_f, 0.37));
    let inputs: HashMap<String, Tensor> = [("x".to_string(), xs.clone())].into();
    let got = lcc::runtime::cpu::run(&g, &inputs)
        .unwrap()
        .remove("y")
        .unwrap();
    // y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ + bias, scale = alpha/√rank.
    let scale = 3.0 / (2f64).sqrt();
    let (xv, wv, av, bv) = (
        xs.to_f64_vec(),
        w.to_f64_vec(),
        a.to_f64_vec(),
        b.to_f64_vec(),
    );
    let mut want = Vec::new();
    for r in 0..4 {
        let row = &xv[r * in_f..(r + 1) * in_f];
        let down: Vec<f64> = (0..rank)
            .map(|k| (0..in_f).map(|i| row[i] * av[k * in_f + i]).sum())
            .collect();
        for o in 0..out_f {
            let base: f64 = (0..in_f).map(|i| row[i] * wv[o * in_f + i]).sum();
            let up: f64 = (0..rank).map(|k| down[k] * bv[o * rank + k]).sum();
            want.push((base + scale * up + bias.to_f64_vec()[o]) as f32);
        }
    }
    let want = Tensor::f32(vec![4, out_f], want);
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "{d}");

    let Some(py) = common::python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("lora_bias.onnx");
    lcc::onnx::save(&g, &model, &lcc::onnx::ExportOptions::default()).unwrap();
    let (inp, exp) = (
        tmp.path().join("in.safetensors"),
        tmp.path().join("out.safetensors"),
    );
    lcc::hf::write_tensors(&inp, &[("x".into(), xs)]).unwrap();
    lcc::hf::write_tensors(&exp, &[("y".into(), got)]).unwrap();
    common::check_with_onnxruntime(&py, &model, &inp, &exp, 1e-5);
}
