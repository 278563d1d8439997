//! RoPE frequencies with transformers' formulas for every scaling it
//! supports (`rope_init_fn`s in `modeling_rope_utils`), computed in f32 as
//! transformers does so that logits match to float precision.

use super::{RopeAttrs, RopeScaling};

/// transformers' `get_mscale` for YaRN.
fn yarn_mscale(scale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * scale.ln() + 1.0
    }
}

fn base_inv_freq(base: f32, dim: usize) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect()
}

/// The inverse frequencies (`rotary_dim / 2` of them) and the factor cos and
/// sin are multiplied by, for a run whose longest position is `seq_len - 1`
/// (only `dynamic` scaling depends on it).
pub fn inv_freq(attrs: &RopeAttrs, seq_len: usize) -> (Vec<f32>, f32) {
    let dim = attrs.rotary_dim;
    let base = attrs.theta as f32;
    match &attrs.scaling {
        RopeScaling::None => (base_inv_freq(base, dim), 1.0),
        RopeScaling::Linear { factor } => {
            let f = *factor as f32;
            (
                base_inv_freq(base, dim)
                    .into_iter()
                    .map(|x| x / f)
                    .collect(),
                1.0,
            )
        }
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings,
        } => {
            let orig = *original_max_position_embeddings as f64;
            if (seq_len as f64) <= orig {
                return (base_inv_freq(base, dim), 1.0);
            }
            let s = seq_len as f64;
            let d = dim as f64;
            let new_base = attrs.theta * ((factor * s / orig) - (factor - 1.0)).powf(d / (d - 2.0));
            (base_inv_freq(new_base as f32, dim), 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
        } => {
            let d = dim as f64;
            let orig = *original_max_position_embeddings as f64;
            let correction_dim = |rot: f64| {
                (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * attrs.theta.ln())
            };
            let low = correction_dim(*beta_fast).floor().max(0.0);
            let high = correction_dim(*beta_slow).ceil().min(d - 1.0);
            let (lo, mut hi) = (low as f32, high as f32);
            if lo == hi {
                hi += 0.001;
            }
            let half = dim / 2;
            let f = *factor as f32;
            let inv: Vec<f32> = (0..half)
                .map(|i| {
                    let pos_freq = base.powf((2 * i) as f32 / dim as f32);
                    let extrapolation = 1.0 / pos_freq;
                    let interpolation = 1.0 / (f * pos_freq);
                    let ramp = ((i as f32 - lo) / (hi - lo)).clamp(0.0, 1.0);
                    let extrapolation_factor = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_factor)
                        + extrapolation * extrapolation_factor
                })
                .collect();
            let af = attention_factor.unwrap_or_else(|| yarn_mscale(*factor));
            (inv, af as f32)
        }
        RopeScaling::Llama3 {
            factor,
            original_max_position_embeddings,
            low_freq_factor,
            high_freq_factor,
        } => {
            let (factor, lff, hff) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let old = *original_max_position_embeddings as f32;
            let low_wavelen = old / lff;
            let high_wavelen = old / hff;
            let inv = base_inv_freq(base, dim)
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // transformers: ~(wavelen < high) * ~(wavelen > low)
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - lff) / (hff - lff);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect();
            (inv, 1.0)
        }
    }
}

/// cos and sin tables, `[positions.len(), rotary_dim]` row-major, in the
/// rotate-half layout (`cat(freqs, freqs)`), scaled by the attention factor.
pub fn cos_sin(attrs: &RopeAttrs, positions: &[i64], seq_len: usize) -> (Vec<f32>, Vec<f32>) {
    let (inv, scale) = inv_freq(attrs, seq_len);
    let half = inv.len();
    let dim = 2 * half;
    let mut cos = vec![0f32; positions.len() * dim];
    let mut sin = vec![0f32; positions.len() * dim];
    for (p, &pos) in positions.iter().enumerate() {
        for (i, &f) in inv.iter().enumerate() {
            let a = pos as f32 * f;
            let (s, c) = (a.sin() * scale, a.cos() * scale);
            cos[p * dim + i] = c;
            cos[p * dim + half + i] = c;
            sin[p * dim + i] = s;
            sin[p * dim + half + i] = s;
        }
    }
    (cos, sin)
}
