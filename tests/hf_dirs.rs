//! Hugging Face dirs end to end: load, save (single and sharded), reload,
//! tied embeddings, shape-only configs, and the fixture made by transformers.

use lcc::hf::{self, SaveOptions};
use lcc::ir::{
    print, verify, ConfigForm, DType, Graph, LlamaConfig, Op, RopeScaling, Tensor, Weight,
    WeightData,
};
use std::path::{Path, PathBuf};

fn config_json(tie: bool) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 40,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "transformers_version": "4.46.3"
    })
}

/// Deterministic pseudo-random values (no rand dependency).
fn values(seed: usize, n: usize) -> Vec<f32> {
    let mut x = (seed as u64).wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// A tiny LLaMA dir: config.json + model.safetensors (bf16 weights, plus an
/// unused `rotary_emb.inv_freq` as old checkpoints carry).
fn make_dir(root: &Path, name: &str, tie: bool) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_value = config_json(tie);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg_value).unwrap(),
    )
    .unwrap();
    let cfg = LlamaConfig::from_value(cfg_value, &dir.join("config.json")).unwrap();
    let mut weights: Vec<Weight> = hf::expected_weights(&cfg)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let mut t = Tensor::f32(shape, values(i, n));
            t.dtype = DType::BF16;
            Weight::from_tensor(name, &t, false)
        })
        .collect();
    weights.push(Weight::from_tensor(
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        &Tensor::f32(vec![2], vec![1.0, 0.01]),
        false,
    ));
    if tie {
        // Some tied checkpoints also store the head; it is ignored.
        let embed = weights[0].clone();
        weights.push(Weight {
            name: "lm_head.weight".into(),
            ..embed
        });
    }
    let refs: Vec<&Weight> = weights.iter().rev().collect();
    hf::write_safetensors(&dir.join("model.safetensors"), &refs, &[("format", "pt")]).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    dir
}

fn weight_bytes(g: &Graph) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = g
        .weights
        .iter()
        .map(|w| (w.name.clone(), w.bytes().unwrap().to_vec()))
        .collect();
    v.sort();
    v
}

fn assert_same(a: &Graph, b: &Graph) {
    assert_eq!(print(a).unwrap(), print(b).unwrap());
    assert_eq!(weight_bytes(a), weight_bytes(b));
}

#[test]
fn load_save_load_is_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_dir(tmp.path(), "src", false);
    let g = hf::load(&dir).unwrap();
    verify(&g).unwrap();
    assert!(hf::is_hf_dir(&dir));
    assert_eq!(
        g.meta.prop(hf::IGNORED_PROP),
        Some("model.layers.0.self_attn.rotary_emb.inv_freq")
    );
    // Weights are views of the file, never copies.
    for w in g.weights.iter() {
        assert!(matches!(w.data, WeightData::Mapped { .. }), "{}", w.name);
        assert_eq!(w.dtype, DType::BF16);
    }

    let out = tmp.path().join("nested/out");
    hf::save(&g, &out).unwrap();
    let names: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names, ["config.json", "model.safetensors"]);
    let g2 = hf::load(&out).unwrap();
    assert_same(&g, &g2);
    // The config keeps keys lcc does not interpret.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg, config_json(false));

    // Saving again gives the same bytes.
    let out2 = tmp.path().join("out2");
    hf::save(&g2, &out2).unwrap();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(out2.join("model.safetensors")).unwrap()
    );
}

#[test]
fn sharded_save_and_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_dir(tmp.path(), "src", false);
    let g = hf::load(&dir).unwrap();
    let out = tmp.path().join("sharded");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), "keep me").unwrap();
    // embed is 40×16 bf16 = 1280 bytes; 2000 forces several shards.
    hf::save_with(
        &g,
        &out,
        &SaveOptions {
            max_shard_size: 2000,
        },
    )
    .unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(hf::INDEX_FILE)).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), g.weights.len());
    let total: u64 = g.weights.iter().map(|w| w.nbytes() as u64).sum();
    assert_eq!(index["metadata"]["total_size"], serde_json::json!(total));
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    let n = shards.len();
    assert!(n > 2, "{n} shards");
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(*s, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        assert!(out.join(s).is_file());
    }
    assert!(!out.join(hf::SINGLE_FILE).exists());
    let g2 = hf::load(&out).unwrap();
    assert_same(&g, &g2);

    // Saving unsharded into the same dir replaces the shards and the index,
    // keeps other files, and reads back the same (the graph's weights are
    // mapped from the very files being replaced).
    hf::save(&g2, &out).unwrap();
    assert!(!out.join(hf::INDEX_FILE).exists());
    assert!(out.join(hf::SINGLE_FILE).is_file());
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        "keep me"
    );
    for s in &shards {
        assert!(!out.join(s).exists(), "stale shard {s}");
    }
    let g3 = hf::load(&out).unwrap();
    assert_same(&g, &g3);
    // No temporary leftovers beside the dir.
    for e in std::fs::read_dir(tmp.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains("lcc-tmp"), "{name}");
    }
}

#[test]
fn broken_sharded_checkpoints_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_dir(tmp.path(), "src", false);
    let g = hf::load(&dir).unwrap();
    let out = tmp.path().join("sharded");
    hf::save_with(
        &g,
        &out,
        &SaveOptions {
            max_shard_size: 2000,
        },
    )
    .unwrap();
    let index_path = out.join(hf::INDEX_FILE);
    let text = std::fs::read_to_string(&index_path).unwrap();

    // A tensor placed in the wrong shard.
    let mut index: serde_json::Value = serde_json::from_str(&text).unwrap();
    let home = index["weight_map"]["model.norm.weight"]
        .as_str()
        .unwrap()
        .to_string();
    let other = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .find(|f| *f != home)
        .unwrap();
    index["weight_map"]["model.norm.weight"] = other.into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = hf::load(&out).unwrap_err().to_string();
    assert!(e.contains("has no tensor 'model.norm.weight'"), "{e}");

    // A shard that does not exist.
    let mut index: serde_json::Value = serde_json::from_str(&text).unwrap();
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = hf::load(&out).unwrap_err().to_string();
    assert!(
        e.contains("model-00009-of-00009.safetensors") && e.contains("does not exist"),
        "{e}"
    );

    // A path that escapes the dir.
    let mut index: serde_json::Value = serde_json::from_str(&text).unwrap();
    index["weight_map"]["model.norm.weight"] = "../src/model.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = hf::load(&out).unwrap_err().to_string();
    assert!(e.contains("is not a file name in this directory"), "{e}");

    // A tensor missing from the index altogether: the builder names it.
    let mut index: serde_json::Value = serde_json::from_str(&text).unwrap();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.1.mlp.gate_proj.weight");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let e = hf::load(&out).unwrap_err().to_string();
    assert!(
        e.contains("tensor 'model.layers.1.mlp.gate_proj.weight'") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn lying_weights_file_in_a_dir_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_dir(tmp.path(), "src", false);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&path, bytes).unwrap();
    let e = hf::load(&dir).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains("past the data region"), "{e}");
}

#[test]
fn tied_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_dir(tmp.path(), "tied", true);
    let g = hf::load(&dir).unwrap();
    verify(&g).unwrap();
    assert!(!g.weights.contains("lm_head.weight"));
    let ignored = g.meta.prop(hf::IGNORED_PROP).unwrap();
    assert!(
        ignored.split(',').any(|n| n == "lm_head.weight"),
        "{ignored}"
    );
    let (_, logits) = &g.outputs[0];
    let node = g.node(logits.node);
    assert_eq!(node.name, "lm_head");
    let w = g.inputs_of(logits.node)[1].unwrap();
    assert!(
        matches!(&g.node(w.node).op, Op::Weight { name } if name == "model.embed_tokens.weight")
    );
    let out = tmp.path().join("out");
    hf::save(&g, &out).unwrap();
    let back = hf::read_safetensors(&out.join("model.safetensors")).unwrap();
    assert!(back.iter().all(|w| w.name != "lm_head.weight"));
    assert_same(&g, &hf::load(&out).unwrap());
}

#[test]
fn shape_only_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama-2-7b");
    std::fs::create_dir_all(&dir).unwrap();
    // LLaMA-2 7B's config, as published.
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
        "tie_word_embeddings": false, "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0", "use_cache": true, "vocab_size": 32000
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let g = hf::load(&dir).unwrap();
    verify(&g).unwrap();
    assert_eq!(g.weights.num_params(), 6_738_415_616);
    assert!(g
        .weights
        .iter()
        .all(|w| matches!(w.data, WeightData::Absent)));
    assert!(g.weights.iter().all(|w| w.dtype == DType::F16));
    // The config file alone loads the same.
    let g2 = hf::load(&dir.join("config.json")).unwrap();
    assert_eq!(print(&g).unwrap(), print(&g2).unwrap());
    // Saving a model without values is refused, and nothing is left behind.
    let out = tmp.path().join("out");
    let e = hf::save(&g, &out).unwrap_err().to_string();
    assert!(e.contains("shape-only"), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn a_dir_with_other_weights_is_not_taken_for_shape_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json(false).to_string()).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), "x").unwrap();
    let e = hf::load(&dir).unwrap_err().to_string();
    assert!(e.contains("pytorch_model.bin"), "{e}");
}

#[test]
fn save_records_a_rewritten_rope() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = make_dir(tmp.path(), "src", false);
    let mut g = hf::load(&dir).unwrap();
    let ropes: Vec<_> =
        g.g.node_indices()
            .filter(|&n| matches!(g.node(n).op, Op::Rope(_)))
            .collect();
    for n in &ropes {
        if let Op::Rope(r) = &mut g.node_mut(*n).op {
            r.scaling = RopeScaling::Linear { factor: 4.0 };
        }
    }
    let out = tmp.path().join("pi");
    hf::save(&g, &out).unwrap();
    let cfg = hf::read_config(&out.join("config.json")).unwrap();
    assert_eq!(cfg.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(raw["rope_scaling"]["type"], "linear");
    assert_eq!(raw["rope_scaling"]["rope_type"], "linear");
    assert_same(&g, &hf::load(&out).unwrap());

    // Layers that disagree cannot be recorded in one config.json.
    if let Op::Rope(r) = &mut g.node_mut(ropes[0]).op {
        r.scaling = RopeScaling::None;
    }
    let e = hf::save(&g, &tmp.path().join("bad"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("differs from the other layers"), "{e}");
}

#[test]
fn save_without_hf_config_says_what_is_missing() {
    let g = Graph::new();
    let tmp = tempfile::tempdir().unwrap();
    let e = hf::save(&g, &tmp.path().join("x")).unwrap_err().to_string();
    assert!(
        e.contains("not a LLaMA that lcc recognises") && e.contains("hf.config"),
        "{e}"
    );
}

/// The tiny model transformers wrote (tests/fixtures/tiny); present after
/// the fixtures are merged.
fn fixture(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: fixture {} is absent", p.display());
        None
    }
}

#[test]
fn transformers_fixture_loads_and_round_trips() {
    let Some(dir) = fixture("hf") else { return };
    let g = hf::load(&dir).unwrap();
    verify(&g).unwrap();
    let cfg = hf::read_config(&dir.join("config.json")).unwrap();
    assert_eq!(cfg.form, ConfigForm::V5);
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (256, 64, 2, 2, 16)
    );
    assert_eq!(g.weights.len(), 1 + 2 * 9 + 2);
    let tmp = tempfile::tempdir().unwrap();
    hf::save(&g, &tmp.path().join("out")).unwrap();
    let g2 = hf::load(&tmp.path().join("out")).unwrap();
    assert_same(&g, &g2);
    // config.json comes back as transformers wrote it.
    let a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/config.json")).unwrap())
            .unwrap();
    assert_eq!(a, b);
}

#[test]
fn transformers_v4_config_fixture_matches_v5() {
    let (Some(v4), Some(dir)) = (fixture("config_v4.json"), fixture("hf")) else {
        return;
    };
    let c4 = hf::read_config(&v4).unwrap();
    let c5 = hf::read_config(&dir.join("config.json")).unwrap();
    assert_eq!(c4.form, ConfigForm::V4);
    assert_eq!(c4.rope_theta, c5.rope_theta);
    assert_eq!(c4.rope_scaling, c5.rope_scaling);
    assert_eq!(c4.rope_attrs(4), c5.rope_attrs(4));
    assert_eq!(hf::expected_weights(&c4), hf::expected_weights(&c5));
}

#[test]
fn exec_tensors_round_trip_through_safetensors() {
    let Some(inputs) = fixture("inputs_s7.safetensors") else {
        return;
    };
    let ts = hf::read_tensors(&inputs).unwrap();
    assert!(!ts.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("copy.safetensors");
    hf::write_tensors(&p, &ts).unwrap();
    assert_eq!(hf::read_tensors(&p).unwrap(), ts);
}
