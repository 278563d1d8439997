//! ONNX opset-23 `Attention`, on the tiled kernel of [`super::super::attention`].

use super::super::attention::flash::{flash_attention, AttnProblem, Bias, HeadLayout};
use super::super::same_data_kind;
use crate::ir::{OnnxAttentionAttrs, Tensor, TensorData};
use crate::runtime::cpu::linalg::{finish, output_numel, Real};

/// ONNX opset-23 `Attention`, following `onnx/reference/ops/op_attention.py`.
///
/// Q/K/V are `[batch, heads, seq, head]`, or `[batch, seq, heads*head]` with
/// the `q_num_heads`/`kv_num_heads` attributes. past_key/past_value
/// (`[batch, kv_heads, past, head]`) are prepended to K/V. `attn_mask` is
/// bool (true = attend) or float (added to the scores), broadcastable to
/// `[batch, q_heads, q_seq, total_seq]`; a last dim shorter than total_seq is
/// padded with masked keys (as the reference does). `is_causal` aligns the
/// causal frontier bottom-right when a past is given (query i sees keys
/// `j <= i + past_len`) and top-left otherwise. Softcap is applied to the
/// scaled scores before the mask. Fully masked rows give 0.
///
/// Returns `[Y, present_key, present_value]` (presents are 4-D); the caller
/// keeps as many as the node has outputs. `qk_matmul_output_mode` ≠ 0 is
/// rejected; `softmax_precision` is accepted (the softmax always runs in f32
/// or f64).
pub fn onnx_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    past_key: Option<&Tensor>,
    past_value: Option<&Tensor>,
    attrs: &OnnxAttentionAttrs,
) -> Result<Vec<Tensor>, String> {
    const OP: &str = "Attention";
    if attrs.qk_matmul_output_mode != 0 {
        return Err(format!(
            "{OP} qk_matmul_output_mode {} is not supported by lcc (only 0, no extra output)",
            attrs.qk_matmul_output_mode
        ));
    }
    if past_key.is_some() != past_value.is_some() {
        return Err(format!("{OP} needs past_key and past_value together"));
    }
    for (t, name) in [(k, "K"), (v, "V")] {
        if !same_data_kind(q, t) {
            return Err(format!(
                "{OP} Q ({}) and {name} ({}) have different types",
                q.dtype, t.dtype
            ));
        }
    }
    for (t, name) in [(past_key, "past_key"), (past_value, "past_value")] {
        if let Some(t) = t {
            if !same_data_kind(q, t) {
                return Err(format!(
                    "{OP} Q ({}) and {name} ({}) have different types",
                    q.dtype, t.dtype
                ));
            }
        }
    }
    if q.rank() != k.rank() || q.rank() != v.rank() {
        return Err(format!(
            "{OP} Q, K and V must have the same rank, got {:?}, {:?}, {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    // (batch, heads, seq, dim) of each, and whether the inputs are 3-D.
    let (qd, kd, vd, three_d) = match q.rank() {
        4 => {
            let d4 = |t: &Tensor| (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
            (d4(q), d4(k), d4(v), false)
        }
        3 => {
            let (qh, kvh) = match (attrs.q_num_heads, attrs.kv_num_heads) {
                (Some(a), Some(b)) if a > 0 && b > 0 => (a as usize, b as usize),
                _ => {
                    return Err(format!(
                        "{OP} with 3-D inputs needs the q_num_heads and kv_num_heads attributes"
                    ))
                }
            };
            let d3 = |t: &Tensor, h: usize, name: &str| {
                if t.shape[2] % h != 0 {
                    Err(format!(
                        "{OP} {name} hidden size {} is not a multiple of {h} heads",
                        t.shape[2]
                    ))
                } else {
                    Ok((t.shape[0], h, t.shape[1], t.shape[2] / h))
                }
            };
            (d3(q, qh, "Q")?, d3(k, kvh, "K")?, d3(v, kvh, "V")?, true)
        }
        _ => {
            return Err(format!(
                "{OP} Q must be 3-D or 4-D, got shape {:?}",
                q.shape
            ))
        }
    };
    let (batch, q_heads, q_len, head_dim) = qd;
    let (kv_heads, new_kv, v_head_dim) = (kd.1, kd.2, vd.3);
    if kd.0 != batch || vd.0 != batch || vd.1 != kv_heads || vd.2 != new_kv || kd.3 != head_dim {
        return Err(format!(
            "{OP} shapes do not agree: Q {:?}, K {:?}, V {:?}",
            q.shape, k.shape, v.shape
        ));
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(format!(
            "{OP} q heads ({q_heads}) must be a multiple of kv heads ({kv_heads})"
        ));
    }
    let past_len = match (past_key, past_value) {
        (Some(pk), Some(pv)) => {
            let ok = pk.rank() == 4
                && pv.rank() == 4
                && pk.shape[0] == batch
                && pk.shape[1] == kv_heads
                && pk.shape[3] == head_dim
                && pv.shape[0] == batch
                && pv.shape[1] == kv_heads
                && pv.shape[2] == pk.shape[2]
                && pv.shape[3] == v_head_dim;
            if !ok {
                return Err(format!(
                    "{OP} past_key {:?} / past_value {:?} do not match [batch={batch}, kv_heads={kv_heads}, past, {head_dim}/{v_head_dim}]",
                    pk.shape, pv.shape
                ));
            }
            pk.shape[2]
        }
        _ => 0,
    };
    let kv_len = past_len + new_kv;
    let scale = attrs.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    let mask_shape = match mask {
        None => None,
        Some(m) => {
            if m.rank() == 0 || m.rank() > 4 {
                return Err(format!(
                    "{OP} attn_mask must have rank 1 to 4, got shape {:?}",
                    m.shape
                ));
            }
            let mut s4 = [1usize; 4];
            s4[4 - m.rank()..].copy_from_slice(&m.shape);
            let ok = (s4[0] == 1 || s4[0] == batch)
                && (s4[1] == 1 || s4[1] == q_heads)
                && (s4[2] == 1 || s4[2] == q_len)
                && s4[3] <= kv_len;
            if !ok {
                return Err(format!(
                    "{OP} attn_mask of shape {:?} does not broadcast to [batch={batch}, heads={q_heads}, q_seq={q_len}, total_seq={kv_len}]",
                    m.shape
                ));
            }
            Some(s4)
        }
    };
    let geom = OnnxAttnGeom {
        batch,
        q_heads,
        kv_heads,
        q_len,
        new_kv,
        past_len,
        head_dim,
        v_head_dim,
        three_d,
    };
    let dtype = q.dtype;
    let causal = attrs.is_causal.then_some(past_len);
    match &q.data {
        TensorData::F32(_) => onnx_attention_typed::<f32>(
            q,
            k,
            v,
            mask,
            mask_shape,
            past_key,
            past_value,
            &geom,
            scale,
            attrs.softcap,
            causal,
        ),
        TensorData::F64(_) => onnx_attention_typed::<f64>(
            q,
            k,
            v,
            mask,
            mask_shape,
            past_key,
            past_value,
            &geom,
            scale,
            attrs.softcap,
            causal,
        ),
        _ => Err(format!("{OP} needs float inputs, got {dtype}")),
    }
}

struct OnnxAttnGeom {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    q_len: usize,
    new_kv: usize,
    past_len: usize,
    head_dim: usize,
    v_head_dim: usize,
    three_d: bool,
}

/// `past ++ new` along the sequence axis, as `[batch, heads, past+new, dim]`;
/// `new` is in `new_layout`.
#[allow(clippy::too_many_arguments)]
fn present<T: Real>(
    past: Option<&[T]>,
    new: &[T],
    new_layout: HeadLayout,
    batch: usize,
    heads: usize,
    past_len: usize,
    new_len: usize,
    dim: usize,
) -> Vec<T> {
    let total = past_len + new_len;
    let mut out = Vec::with_capacity(batch * heads * total * dim);
    for b in 0..batch {
        for h in 0..heads {
            if let Some(p) = past {
                let o = (b * heads + h) * past_len * dim;
                out.extend_from_slice(&p[o..o + past_len * dim]);
            }
            for s in 0..new_len {
                let o = new_layout.at(b, h) + s * new_layout.row;
                out.extend_from_slice(&new[o..o + dim]);
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn onnx_attention_typed<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    mask_shape: Option<[usize; 4]>,
    past_key: Option<&Tensor>,
    past_value: Option<&Tensor>,
    g: &OnnxAttnGeom,
    scale: f32,
    softcap: f32,
    causal: Option<usize>,
) -> Result<Vec<Tensor>, String> {
    fn data<T: Real>(t: &Tensor) -> &[T] {
        T::slice(&t.data).unwrap_or(&[])
    }
    let layout = |seq, heads, dim| {
        if g.three_d {
            HeadLayout::bshd(seq, heads, dim)
        } else {
            HeadLayout::bhsd(seq, heads, dim)
        }
    };
    let kv_len = g.past_len + g.new_kv;
    let pk = present(
        past_key.map(data::<T>),
        data(k),
        layout(g.new_kv, g.kv_heads, g.head_dim),
        g.batch,
        g.kv_heads,
        g.past_len,
        g.new_kv,
        g.head_dim,
    );
    let pv = present(
        past_value.map(data::<T>),
        data(v),
        layout(g.new_kv, g.kv_heads, g.v_head_dim),
        g.batch,
        g.kv_heads,
        g.past_len,
        g.new_kv,
        g.v_head_dim,
    );
    // The mask as an additive bias in the compute type.
    let bias_data: Option<Vec<T>> = match mask {
        None => None,
        Some(m) => Some(match &m.data {
            TensorData::Bool(b) => b
                .iter()
                .map(|&a| if a { T::ZERO } else { T::NEG_INFINITY })
                .collect(),
            d => match T::slice(d) {
                Some(s) => s.to_vec(),
                None => {
                    return Err(format!(
                        "Attention attn_mask must be bool or have Q's type, got {}",
                        m.dtype
                    ))
                }
            },
        }),
    };
    let bias = match (&bias_data, mask_shape) {
        (Some(d), Some(s4)) => {
            let mut strides = [0usize; 4];
            let mut st = 1;
            for ax in (0..4).rev() {
                strides[ax] = if s4[ax] == 1 && ax < 3 { 0 } else { st };
                st *= s4[ax];
            }
            Some(Bias {
                data: d.as_slice(),
                strides,
                keys: s4[3],
            })
        }
        _ => None,
    };
    let problem = AttnProblem {
        q: data(q),
        q_layout: layout(g.q_len, g.q_heads, g.head_dim),
        k: &pk,
        k_layout: HeadLayout::bhsd(kv_len, g.kv_heads, g.head_dim),
        v: &pv,
        v_layout: HeadLayout::bhsd(kv_len, g.kv_heads, g.v_head_dim),
        batch: g.batch,
        q_heads: g.q_heads,
        kv_heads: g.kv_heads,
        q_len: g.q_len,
        kv_len,
        head_dim: g.head_dim,
        v_head_dim: g.v_head_dim,
        scale: T::from_f64(scale as f64),
        softcap: T::from_f64(softcap.max(0.0) as f64),
        causal_offset: causal,
        bias,
    };
    let out_len = output_numel(
        &[g.batch, g.q_heads, g.q_len, g.v_head_dim],
        std::mem::size_of::<T>(),
        "Attention output",
    )?;
    let mut y = vec![T::ZERO; out_len];
    let out_layout = layout(g.q_len, g.q_heads, g.v_head_dim);
    flash_attention(&problem, &mut y, out_layout, None);
    let y_shape = if g.three_d {
        vec![g.batch, g.q_len, g.q_heads * g.v_head_dim]
    } else {
        vec![g.batch, g.q_heads, g.q_len, g.v_head_dim]
    };
    Ok(vec![
        finish(q.dtype, y_shape, y),
        finish(k.dtype, vec![g.batch, g.kv_heads, kv_len, g.head_dim], pk),
        finish(v.dtype, vec![g.batch, g.kv_heads, kv_len, g.v_head_dim], pv),
    ])
}

// ---------------------------------------------------------------------------
// Reference

/// ONNX Attention as onnx's reference evaluator defines it, in plain loops
/// over f64: what every backend's kernels are compared against. Inputs
/// must be valid (the kernel checks them; these do not).
// Only the tests call these today; the CUDA backend's tests will too.
#[allow(dead_code)]
#[allow(clippy::needless_range_loop)]
pub(crate) mod reference {
    use crate::ir::{DType, OnnxAttentionAttrs, Tensor, TensorData};

    fn t64(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        Tensor {
            dtype: DType::F64,
            shape,
            data: TensorData::F64(data),
        }
    }

    /// Plain attention on `[b, h, s, d]` arrays: scaled scores, softcap
    /// (when positive), the additive `bias(b, h, i, j)`, softmax, and rows
    /// whose every key is masked give 0. Query head h reads kv head
    /// `h / (hq / hkv)`. Output `[b, hq, sq, dv]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bhsd(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        (b, hq, hkv, sq, skv, d, dv): (usize, usize, usize, usize, usize, usize, usize),
        scale: f64,
        softcap: f64,
        bias: &dyn Fn(usize, usize, usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut out = vec![0.0; b * hq * sq * dv];
        let group = hq / hkv;
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / group;
                for i in 0..sq {
                    let mut s = vec![0.0; skv];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let mut dot = 0.0;
                        for c in 0..d {
                            dot += q[((bi * hq + h) * sq + i) * d + c]
                                * k[((bi * hkv + kh) * skv + j) * d + c];
                        }
                        let mut x = dot * scale;
                        if softcap > 0.0 {
                            x = softcap * (x / softcap).tanh();
                        }
                        *sj = x + bias(bi, h, i, j);
                    }
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let w: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = w.iter().sum();
                    for c in 0..dv {
                        let mut acc = 0.0;
                        for j in 0..skv {
                            acc += w[j] * v[((bi * hkv + kh) * skv + j) * dv + c];
                        }
                        out[((bi * hq + h) * sq + i) * dv + c] = acc / sum;
                    }
                }
            }
        }
        out
    }

    /// `[b, s, h*d]` → `[b, h, s, d]`.
    pub fn to_bhsd(x: &[f64], b: usize, s: usize, h: usize, d: usize) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for bi in 0..b {
            for si in 0..s {
                for hi in 0..h {
                    for c in 0..d {
                        out[((bi * h + hi) * s + si) * d + c] = x[((bi * s + si) * h + hi) * d + c];
                    }
                }
            }
        }
        out
    }

    /// `[b, h, s, d]` → `[b, s, h*d]`.
    pub fn to_bshd(x: &[f64], b: usize, h: usize, s: usize, d: usize) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    for c in 0..d {
                        out[((bi * s + si) * h + hi) * d + c] = x[((bi * h + hi) * s + si) * d + c];
                    }
                }
            }
        }
        out
    }

    /// ONNX Attention (op_attention.py) with the kernel's arguments:
    /// `[Y, present_key, present_value]` as f64 tensors. K/V are the past
    /// followed by the new keys; a bool mask attends where true, a float
    /// mask is added, both broadcast to `[b, hq, sq, total]` with keys past
    /// the mask's last dim masked; `is_causal` masks keys `j > i + past`.
    /// The scale defaults to 1/√d computed in f32, the attribute's type.
    pub fn onnx_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        past_key: Option<&Tensor>,
        past_value: Option<&Tensor>,
        attrs: &OnnxAttentionAttrs,
    ) -> [Tensor; 3] {
        let bhsd = |t: &Tensor, heads: Option<i64>| -> (Vec<f64>, [usize; 4]) {
            match *t.shape.as_slice() {
                [b, h, s, d] => (t.to_f64_vec(), [b, h, s, d]),
                [b, s, w] => {
                    let h = heads.expect("num_heads attributes for 3-D inputs") as usize;
                    (to_bhsd(&t.to_f64_vec(), b, s, h, w / h), [b, h, s, w / h])
                }
                _ => panic!("Attention input {:?} must be 3-D or 4-D", t.shape),
            }
        };
        let (qv, [b, hq, sq, d]) = bhsd(q, attrs.q_num_heads);
        let (kv, [_, hkv, skv, _]) = bhsd(k, attrs.kv_num_heads);
        let (vv, [.., dv]) = bhsd(v, attrs.kv_num_heads);
        let past = past_key.map_or(0, |p| p.shape[2]);
        let total = past + skv;
        let cat = |p: Option<&Tensor>, new: &[f64], dim: usize| {
            let pv = p.map(|p| p.to_f64_vec());
            let mut out = Vec::with_capacity(b * hkv * total * dim);
            for bi in 0..b {
                for h in 0..hkv {
                    if let Some(pv) = &pv {
                        let o = (bi * hkv + h) * past * dim;
                        out.extend_from_slice(&pv[o..o + past * dim]);
                    }
                    let o = (bi * hkv + h) * skv * dim;
                    out.extend_from_slice(&new[o..o + skv * dim]);
                }
            }
            out
        };
        let (pk, pv) = (cat(past_key, &kv, d), cat(past_value, &vv, dv));
        let mask = mask.map(|m| {
            let mut s4 = [1usize; 4];
            s4[4 - m.rank()..].copy_from_slice(&m.shape);
            (m.to_f64_vec(), s4, matches!(m.data, TensorData::Bool(_)))
        });
        let bias = |bi: usize, h: usize, i: usize, j: usize| -> f64 {
            let causal = if attrs.is_causal && j > i + past {
                f64::NEG_INFINITY
            } else {
                0.0
            };
            let Some((m, s4, is_bool)) = &mask else {
                return causal;
            };
            if j >= s4[3] {
                return f64::NEG_INFINITY;
            }
            let pick = |i: usize, n: usize| if n == 1 { 0 } else { i };
            let at =
                ((pick(bi, s4[0]) * s4[1] + pick(h, s4[1])) * s4[2] + pick(i, s4[2])) * s4[3] + j;
            causal
                + match (*is_bool, m[at]) {
                    (true, a) if a != 0.0 => 0.0,
                    (true, _) => f64::NEG_INFINITY,
                    (false, a) => a,
                }
        };
        let scale = attrs.scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
        let y = attention_bhsd(
            &qv,
            &pk,
            &pv,
            (b, hq, hkv, sq, total, d, dv),
            scale,
            attrs.softcap.max(0.0) as f64,
            &bias,
        );
        let y = if q.rank() == 3 {
            t64(vec![b, sq, hq * dv], to_bshd(&y, b, hq, sq, dv))
        } else {
            t64(vec![b, hq, sq, dv], y)
        };
        [
            y,
            t64(vec![b, hkv, total, d], pk),
            t64(vec![b, hkv, total, dv], pv),
        ]
    }
}
