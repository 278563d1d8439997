//! Every value has an inferred type: after import of every model fixture
//! (the Hugging Face tiny model and every torch ONNX export form) and after
//! every recipe in passes/, training graphs (recipe + autodiff) included, the
//! canonical print shows a type with every dimension known on every line.
//! (That the types are *right* is checked where graphs run: the CPU executor
//! compares every computed value with its inferred type.)

mod common;

use common::{fixtures, tiny};
use lcc::ir::{self, Dim, DimExpr, Graph, TensorType};
use lcc::passes::{Pipeline, RunOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn models() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut m = vec![root.join("models/tiny"), tiny().join("hf")];
    for f in std::fs::read_dir(tiny()).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "onnx") {
            m.push(p);
        }
    }
    m.sort();
    assert!(
        m.len() >= 5,
        "expected the HF models and three torch exports"
    );
    m
}

fn recipes() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("passes");
    let mut r: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    r.sort();
    r
}

/// Lines of the print whose type is missing or has an unknown dim.
fn untyped_lines(g: &Graph) -> Vec<String> {
    ir::print(g)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" = ") || l.trim_start().starts_with("input "))
        .filter(|l| {
            let ty = l
                .rsplit_once(" : ")
                .or_else(|| l.rsplit_once(": "))
                .map(|(_, t)| t);
            ty.is_none_or(|t| t.contains('?') || t.contains("[*]"))
        })
        .map(str::to_string)
        .collect()
}

fn run(g: &mut Graph, recipe: &Path, onnx: bool) {
    let text = std::fs::read_to_string(recipe).unwrap();
    let mut p = Pipeline::from_yaml(recipe).unwrap();
    if onnx && text.contains("- pi:") {
        // torch's exports keep no pretraining length; the user gives it.
        p.set("pi.original_max_position_embeddings=256").unwrap();
    }
    p.run(g, &RunOptions::default(), |_, _| {})
        .unwrap_or_else(|e| panic!("{}: {e}", recipe.display()));
}

#[test]
fn every_value_is_typed_after_import_and_after_every_recipe() {
    let mut checked = 0;
    for model in models() {
        let onnx = model.extension().is_some_and(|e| e == "onnx");
        let g = lcc::model::load(&model).unwrap();
        let bad = untyped_lines(&g);
        assert!(
            bad.is_empty(),
            "{} after import:\n{}",
            model.display(),
            bad.join("\n")
        );
        checked += 1;
        for recipe in recipes() {
            let mut g = g.clone();
            run(&mut g, &recipe, onnx);
            let bad = untyped_lines(&g);
            let what = format!("{} + {}", model.display(), recipe.display());
            assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
            checked += 1;
            if g.weights.iter().any(|w| w.trainable) {
                Pipeline::from_names("autodiff")
                    .unwrap()
                    .run(&mut g, &RunOptions::default(), |_, _| {})
                    .unwrap_or_else(|e| panic!("{what} + autodiff: {e}"));
                let bad = untyped_lines(&g);
                assert!(bad.is_empty(), "{what} + autodiff:\n{}", bad.join("\n"));
                assert!(g.outputs.iter().any(|(n, _)| n == "loss"));
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "checked {checked} graphs");
}

#[test]
fn types_are_symbolic_in_batch_and_seq() {
    let g = lcc::model::load(&tiny().join("tiny_opset17_torchscript.onnx")).unwrap();
    let (_, logits) = g.outputs.iter().find(|(n, _)| n == "logits").unwrap();
    let t = g.value_type(*logits).unwrap();
    assert_eq!(t.to_string(), "f32[batch,seq,256]");
    // A reshape to [batch*seq, hidden] and back keeps the symbols.
    let text = ir::print(&g).unwrap();
    assert!(text.contains("[batch,2,seq,16]"), "{text}");
}

#[test]
fn dimension_expressions_normalise_and_evaluate() {
    let e = |s: &str| Dim::parse(s);
    assert_eq!(e("seq*batch"), e("batch*seq"));
    assert_eq!(e("batch*seq").to_string(), "batch*seq");
    assert_eq!(e("2*seq+seq").to_string(), "3*seq");
    assert_eq!(e("(seq+3)/4").to_string(), "(seq+3)/4");
    assert_eq!(e("(4*seq)/4"), e("seq"));
    assert_eq!(e("seq-seq"), Dim::Fixed(0));
    assert_eq!(e("64"), Dim::Fixed(64));
    assert_eq!(e("past+seq").to_string(), "past+seq");
    // Products divide back exactly; floor division by a constant.
    let bs = e("batch*seq*64").div_floor(&e("batch*seq"));
    assert_eq!(bs, Dim::Fixed(64));
    let b: BTreeMap<String, usize> = [("seq".to_string(), 10), ("batch".to_string(), 3)].into();
    assert_eq!(e("(seq+3)/4").eval(&b), Some(3));
    assert_eq!(e("batch*seq-1").eval(&b), Some(29));
    assert_eq!(e("seq/4").eval(&b), Some(2));
    // What cannot be kept exact is unknown, never wrong.
    assert!(e("seq/4").plus(&e("seq/3")).is_unknown());
    assert!(Dim::unknown().times(&e("seq")).is_unknown());
    // Text that is no expression stays one opaque symbol.
    assert_eq!(e("sequence length"), Dim::Sym("sequence length".into()));
    assert!(DimExpr::parse("seq+").is_none());
    // A type binds plain symbols first, then checks expressions.
    let t = TensorType::new(ir::DType::F32, vec![e("batch*seq"), e("batch"), e("seq")]);
    let mut bind = BTreeMap::new();
    t.check_concrete(&[30, 3, 10], &mut bind).unwrap();
    let mut bind = BTreeMap::new();
    let err = t.check_concrete(&[31, 3, 10], &mut bind).unwrap_err();
    assert!(err.contains("batch*seq = 30"), "{err}");
}

#[test]
fn shape_errors_name_the_node_and_both_shapes() {
    let mut g = lcc::model::load(&fixtures().join("tiny/hf")).unwrap();
    let x = g.add_input(
        "x",
        TensorType::new(ir::DType::F32, vec![Dim::sym("batch"), Dim::Fixed(7)]),
    );
    let w = g
        .weight_value("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let err = g
        .add("bad_proj", ir::Op::Linear, &[x, w], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad_proj") && err.contains("Linear"), "{err}");
    assert!(
        err.contains("[batch,7]") && err.contains("[64,64]"),
        "{err}"
    );
    // The failed node is not left behind.
    ir::verify(&g).unwrap();
}
