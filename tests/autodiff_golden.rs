//! One training step of the tiny LLaMA with a LoRA adapter and trainable
//! embedding + norms, against PyTorch + PEFT (tests/fixtures/gen/
//! make_grad_fixtures.py): the loss and every gradient, in f32.

mod common;

use common::{fixtures, read, tiny};
use lcc::hf::peft::load_adapter;
use lcc::ir::Tensor;
use lcc::passes::autodiff::{autodiff, AutodiffOptions};
use lcc::passes::{lora, Pipeline, RunOptions};
use std::collections::HashMap;

/// max|g − g_ref| ≤ 1e-4·max|g_ref| + 1e-7, per tensor; returns the ratio
/// max|g − g_ref| / max|g_ref|.
fn check(name: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape, want.shape, "{name}: shape");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let diff = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        diff <= 1e-4 * scale + 1e-7,
        "{name}: max abs diff {diff:.3e}, reference max |g| {scale:.3e}"
    );
    diff / scale.max(1e-30)
}

#[test]
fn loss_and_gradients_match_pytorch_peft() {
    let dir = fixtures().join("grad");
    let mut golden = read(&dir.join("golden.safetensors"));
    let mut g = lcc::hf::load(&tiny().join("hf")).unwrap();
    let adapter = load_adapter(&dir.join("adapter")).unwrap();
    lora::apply_adapter(&mut g, &adapter.lora()).unwrap();
    Pipeline::from_names("trainable")
        .unwrap()
        .run(
            &mut g,
            &RunOptions {
                verify: true,
                ..Default::default()
            },
            |_, _| {},
        )
        .unwrap();
    let info = autodiff(&mut g, &AutodiffOptions::default()).unwrap();
    lcc::ir::verify(&g).unwrap();
    assert_eq!(info.grads.len(), 22);

    let inputs = HashMap::from([
        ("input_ids".to_string(), golden.remove("input_ids").unwrap()),
        ("labels".to_string(), golden.remove("labels").unwrap()),
    ]);
    let out = lcc::runtime::cpu::run(&g, &inputs).unwrap();
    let loss = out[&info.loss].to_f64_vec()[0];
    let want = golden.remove("loss").unwrap().to_f64_vec()[0];
    eprintln!("loss {loss:.7} vs PyTorch {want:.7}");
    assert!((loss - want).abs() <= 1e-5 * want.abs(), "{loss} vs {want}");

    let mut worst = (0f64, String::new());
    for (weight, output) in &info.grads {
        let want = golden
            .remove(weight)
            .unwrap_or_else(|| panic!("no PyTorch gradient for {weight}"));
        let r = check(weight, &out[output], &want);
        if r > worst.0 {
            worst = (r, weight.clone());
        }
    }
    eprintln!(
        "max relative gradient error vs PyTorch: {:.2e} ({})",
        worst.0, worst.1
    );
    let left: Vec<&String> = golden.keys().collect();
    assert!(
        left.is_empty(),
        "PyTorch gradients lcc did not produce: {left:?}"
    );
}
