//! The cost model on LLaMA-2 7B (shape only, from models/llama-2-7b), checked
//! against the LongLoRA paper's formulas written out independently here, and
//! on hand-built LoRA / trainable / shifted-sparse variants of it.

use lcc::cost::{cost, Cost};
use lcc::ir::{
    AttentionPattern, Graph, GroupSize, LoraAttrs, Op, Output, Patch, PatchValue, TensorType,
    Value, Weight, WeightData,
};
use std::path::Path;

const LAYERS: u64 = 32;
const HIDDEN: u64 = 4096;
const INTER: u64 = 11008;
const HEADS: u64 = 32;
const HEAD_DIM: u64 = 128;
const VOCAB: u64 = 32000;
const SEQ: u64 = 4096;

fn llama_7b() -> Graph {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llama-2-7b");
    lcc::hf::load(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The paper's count for one sequence of `SEQ` tokens: 2·m·n·k per matmul.
fn projections() -> u128 {
    u128::from(LAYERS * 4 * (2 * SEQ * HIDDEN * HIDDEN))
}
fn mlp() -> u128 {
    u128::from(LAYERS * 3 * (2 * SEQ * HIDDEN * INTER))
}
fn full_attention() -> u128 {
    u128::from(
        // QKᵀ and PV over the whole L×L, no causal halving.
        LAYERS * 2 * (2 * HEADS * SEQ * SEQ * HEAD_DIM),
    )
}
fn lm_head() -> u128 {
    u128::from(2 * SEQ * HIDDEN * VOCAB)
}

#[test]
fn llama_2_7b_at_4096_matches_the_paper() {
    let g = llama_7b();
    let c = cost(&g, SEQ as usize, 1).unwrap();
    eprintln!("{c}");
    assert_eq!(c.params.total, 6_738_415_616);
    assert_eq!(c.params.trainable.total(), 0);
    let f = &c.flops_forward;
    assert_eq!(f.projections, projections());
    assert_eq!(f.mlp, mlp());
    assert_eq!(f.attention, full_attention());
    assert_eq!(f.lm_head, lm_head());
    assert_eq!(
        f.total,
        projections() + mlp() + full_attention() + lm_head()
    );
    // The figures themselves, as a reader of the paper would check them.
    assert_eq!(f.projections, 17_592_186_044_416); // 2^44
    assert_eq!(f.attention, 8_796_093_022_208); // 2^43
                                                // Batch scales every count.
    let c2 = cost(&g, SEQ as usize, 2).unwrap();
    assert_eq!(c2.flops_forward.total, 2 * f.total);
    assert_eq!(c2.params, c.params);

    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(
        json,
        format!(
            "{{\"params\":{{\"total\":6738415616,\"trainable\":{{\"lora\":0,\"embedding\":0,\"norm\":0,\"other\":0}}}},\
             \"flops_forward\":{{\"projections\":{},\"mlp\":{},\"attention\":{},\"lm_head\":{},\"total\":{}}}}}",
            f.projections, f.mlp, f.attention, f.lm_head, f.total
        )
    );
    let table = lcc::cost::render(&c);
    assert!(table.contains("6,738,415,616"), "{table}");
    assert!(table.contains("attention"), "{table}");
}

/// Replaces every q/k/v/o Linear by a LoraLinear of rank `rank` with new
/// trainable lora_A/lora_B weights, through the patch API.
fn add_lora(g: &mut Graph, rank: usize, alpha: f64) {
    let mut patch = Patch::new();
    let linears: Vec<_> =
        g.g.node_indices()
            .filter(|&n| {
                let node = g.node(n);
                matches!(node.op, Op::Linear)
                    && ["q_proj", "k_proj", "v_proj", "o_proj"]
                        .iter()
                        .any(|p| node.name.ends_with(p))
            })
            .collect();
    for n in linears {
        let node = g.node(n).clone();
        let ins = g.inputs_of(n);
        let w = ins[1].unwrap();
        let Op::Weight { name: wname } = &g.node(w.node).op else {
            panic!("{}: weight is not a Weight node", node.name)
        };
        let base = g.weights.get(wname).unwrap().clone();
        let (out, inp) = (base.shape[0], base.shape[1]);
        let mut weight_node = |g: &mut Graph, name: String, shape: Vec<usize>| {
            g.weights.insert(Weight {
                name: name.clone(),
                dtype: base.dtype,
                shape: shape.clone(),
                data: WeightData::Absent,
                trainable: true,
            });
            patch.add(
                name.clone(),
                Op::Weight { name: name.clone() },
                &[],
                vec![Output {
                    name,
                    ty: Some(TensorType::fixed(base.dtype, &shape)),
                }],
            )
        };
        let a = weight_node(g, format!("{}.lora_A.weight", node.name), vec![rank, inp]);
        let b = weight_node(g, format!("{}.lora_B.weight", node.name), vec![out, rank]);
        let lora = patch.add(
            node.name.clone(),
            Op::LoraLinear(LoraAttrs {
                rank,
                alpha,
                rslora: false,
                dropout: 0.0,
            }),
            &[
                Some(PatchValue::Existing(ins[0].unwrap())),
                Some(PatchValue::Existing(w)),
                Some(a),
                Some(b),
            ],
            node.outputs.clone(),
        );
        patch.replace(Value::new(n, 0), lora);
    }
    g.apply(patch).unwrap();
}

#[test]
fn lora_r8_on_qkvo_adds_8_4m_trainable_parameters() {
    let mut g = llama_7b();
    add_lora(&mut g, 8, 16.0);
    let c: Cost = cost(&g, SEQ as usize, 1).unwrap();
    eprintln!("{c}");
    let lora = LAYERS * 4 * 8 * (HIDDEN + HIDDEN);
    assert_eq!(lora, 8_388_608);
    assert_eq!(c.params.trainable.lora, lora);
    assert_eq!(c.params.total, 6_738_415_616 + lora);
    assert_eq!(c.params.trainable.embedding, 0);
    assert_eq!(c.params.trainable.norm, 0);
    assert_eq!(c.params.trainable.other, 0);
    // The LoRA branch: 2·T·in·r + 2·T·r·out per projection.
    let branch = LAYERS * 4 * (2 * SEQ * HIDDEN * 8 + 2 * SEQ * 8 * HIDDEN);
    assert_eq!(
        c.flops_forward.projections,
        projections() + u128::from(branch)
    );
    assert_eq!(c.flops_forward.mlp, mlp());

    // LongLoRA's "+": embeddings and norms trainable too.
    for w in g.weights.iter().map(|w| w.name.clone()).collect::<Vec<_>>() {
        if w.contains("embed_tokens") || w.contains("norm") {
            g.weights.get_mut(&w).unwrap().trainable = true;
        }
    }
    let c = cost(&g, SEQ as usize, 1).unwrap();
    assert_eq!(c.params.trainable.embedding, VOCAB * HIDDEN);
    assert_eq!(c.params.trainable.embedding, 131_072_000);
    assert_eq!(c.params.trainable.norm, (2 * LAYERS + 1) * HIDDEN);
    assert_eq!(c.params.trainable.norm, 266_240);
    assert_eq!(c.params.trainable.lora, lora);
    assert_eq!(c.params.trainable.other, 0);
}

fn set_pattern(g: &mut Graph, pattern: AttentionPattern) {
    let nodes: Vec<_> = g.g.node_indices().collect();
    let mut changed = 0;
    for n in nodes {
        if let Op::Attention(at) = &mut g.node_mut(n).op {
            at.pattern = pattern.clone();
            changed += 1;
        }
    }
    assert_eq!(changed, LAYERS as usize);
}

#[test]
fn shifted_sparse_attention_at_a_quarter_costs_a_quarter() {
    let mut g = llama_7b();
    let full = cost(&g, SEQ as usize, 1).unwrap().flops_forward;

    // The paper's Algorithm 1 (shifted heads rolled): every head sees L/G
    // blocks of G×G, G = L/4.
    set_pattern(
        &mut g,
        AttentionPattern::ShiftedSparse {
            group: GroupSize::Fraction(0.25),
            wrap: true,
        },
    );
    let s2 = cost(&g, SEQ as usize, 1).unwrap().flops_forward;
    assert_eq!(4 * s2.attention, full.attention);
    let group = SEQ / 4;
    assert_eq!(
        s2.attention,
        u128::from(LAYERS * 2 * (2 * HEADS * SEQ * group * HEAD_DIM))
    );
    assert_eq!(s2.projections, full.projections);
    assert_eq!(s2.total, full.total - full.attention + s2.attention);

    // Without wrap the shifted half's groups are [0,G/2), [G/2,3G/2), …,
    // [L−G/2,L): two half blocks replace one whole one, so those heads cost
    // L·G − G²/2 and the layer 15/64 of full attention.
    set_pattern(
        &mut g,
        AttentionPattern::ShiftedSparse {
            group: GroupSize::Fraction(0.25),
            wrap: false,
        },
    );
    let s2 = cost(&g, SEQ as usize, 1).unwrap().flops_forward;
    let per_head = |pairs: u64| 2 * 2 * pairs * HEAD_DIM;
    let plain = per_head(SEQ * group);
    let shifted = per_head(SEQ * group - group * group / 2);
    assert_eq!(
        s2.attention,
        u128::from(LAYERS * (HEADS / 2) * (plain + shifted))
    );
    assert_eq!(64 * s2.attention, 15 * full.attention);

    // A group that does not divide L: the last, shorter group counts exactly.
    set_pattern(
        &mut g,
        AttentionPattern::ShiftedSparse {
            group: GroupSize::Tokens(1000),
            wrap: true,
        },
    );
    let s2 = cost(&g, SEQ as usize, 1).unwrap().flops_forward;
    let area = 4 * 1000 * 1000 + 96 * 96;
    assert_eq!(s2.attention, u128::from(LAYERS * HEADS * per_head(area)));
}

#[test]
fn counts_past_u64_do_not_wrap() {
    // At 10M tokens the attention FLOPs of a 7B model pass 2^64 (1.8e19).
    let g = llama_7b();
    let seq: u128 = 10_000_000;
    let c = cost(&g, seq as usize, 1).unwrap();
    let want = u128::from(LAYERS) * 2 * (2 * u128::from(HEADS) * seq * seq * u128::from(HEAD_DIM));
    assert_eq!(c.flops_forward.attention, want);
    assert!(c.flops_forward.attention > u128::from(u64::MAX));
    assert!(c.flops_forward.lm_head < c.flops_forward.total);
}
