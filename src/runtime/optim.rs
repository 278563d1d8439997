//! Optimizers (AdamW, SGD), global gradient-norm clipping and learning-rate
//! schedules. Backends apply the optimizer where the weights live
//! ([`super::Executable::train_step`]); the rules are
//! the exact update rules of `torch.optim` and the schedule
//! formulas of `transformers`, so a run can be compared step by step with a
//! PyTorch one.
//!
//! Parameters, gradients and optimizer state are f32. Each parameter's
//! update is elementwise, so spreading parameters over threads changes no
//! bit of the result.

use crate::ir::Tensor;
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;

/// Which optimizer and its hyper-parameters (the learning rate comes per
/// step, from an [`LrSchedule`]). Hyper-parameters are f64 like PyTorch's
/// Python floats: `1 - 0.999` must be computed in f64 and then rounded to
/// f32, or the second moment drifts by 1e-5 relative from torch's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// `torch.optim.AdamW`: decoupled weight decay (`p *= 1 - lr·wd` before
    /// the Adam update) and bias-corrected moments.
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// `torch.optim.SGD` (no dampening, no Nesterov): weight decay is added
    /// to the gradient (L2), momentum buffer starts as the first gradient.
    Sgd { momentum: f64, weight_decay: f64 },
}

impl OptimizerConfig {
    /// AdamW as the LongLoRA paper trains: β1 0.9, **β2 0.95** (the paper's
    /// value; LongLoRA's code left transformers' default 0.999), eps 1e-8,
    /// weight decay 0 (its scripts pass `--weight_decay 0.0`).
    pub fn adamw() -> Self {
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// Names of the per-parameter state tensors (suffixes after `name.`),
    /// as PyTorch calls them.
    fn state_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
            OptimizerConfig::Sgd { momentum, .. } if *momentum != 0.0 => &["momentum_buffer"],
            OptimizerConfig::Sgd { .. } => &[],
        }
    }
}

/// One optimizer over a fixed list of named parameters.
#[derive(Clone, Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    params: Vec<(String, usize)>,
    /// Per parameter, one buffer per name in `config.state_names()`.
    state: Vec<Vec<Vec<f32>>>,
    steps: u64,
}

impl Optimizer {
    /// An optimizer for parameters `(name, number of elements)`, in the
    /// order `step` will receive them. State starts at zero (step 0).
    pub fn new(config: OptimizerConfig, param_sizes: &[(String, usize)]) -> Optimizer {
        let n_state = config.state_names().len();
        Optimizer {
            config,
            params: param_sizes.to_vec(),
            state: param_sizes
                .iter()
                .map(|(_, n)| vec![vec![0.0; *n]; n_state])
                .collect(),
            steps: 0,
        }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Optimizer steps taken (PyTorch's `state['step']`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of every parameter with its gradient at learning rate `lr`.
    /// `params` and `grads` follow the order given to [`Optimizer::new`].
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f32) -> Result<()> {
        if params.len() != self.params.len() || grads.len() != self.params.len() {
            return Err(Error::invalid(format!(
                "the optimizer holds {} parameters but got {} parameters and {} gradients",
                self.params.len(),
                params.len(),
                grads.len()
            )));
        }
        for (i, (name, n)) in self.params.iter().enumerate() {
            if params[i].len() != *n || grads[i].len() != *n {
                return Err(Error::invalid(format!(
                    "parameter '{name}' has {n} elements in the optimizer but got {} values and {} gradients",
                    params[i].len(),
                    grads[i].len()
                )));
            }
        }
        self.steps += 1;
        let step = self.steps;
        let config = self.config;
        params
            .par_iter_mut()
            .zip(grads.par_iter())
            .zip(self.state.par_iter_mut())
            .for_each(|((p, g), st)| update(&config, step, lr, p, g, st));
        Ok(())
    }

    /// The state as named f32 tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`
    /// or `{param}.momentum_buffer`), for a checkpoint. Save
    /// [`Optimizer::steps`] with them.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let names = self.config.state_names();
        let mut out = Vec::with_capacity(self.params.len() * names.len());
        for ((pname, n), bufs) in self.params.iter().zip(&self.state) {
            for (sname, buf) in names.iter().zip(bufs) {
                out.push((
                    format!("{pname}.{sname}"),
                    Tensor::f32(vec![*n], buf.clone()),
                ));
            }
        }
        out
    }

    /// Restores state saved by [`Optimizer::state_tensors`] and the step
    /// count. Every tensor this optimizer needs must be present with the
    /// right size.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let names = self.config.state_names();
        let mut restored = Vec::with_capacity(self.state.len());
        for (pname, n) in &self.params {
            let mut bufs = Vec::with_capacity(names.len());
            for sname in names {
                let key = format!("{pname}.{sname}");
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::invalid(format!(
                        "the optimizer state has no '{key}'; was the checkpoint written with another optimizer or other trainable parameters?"
                    ))
                })?;
                let data = t.as_f32().filter(|d| d.len() == *n).ok_or_else(|| {
                    Error::invalid(format!(
                        "optimizer state '{key}' is {}{:?} but the parameter has {n} f32 values",
                        t.dtype, t.shape
                    ))
                })?;
                bufs.push(data.to_vec());
            }
            restored.push(bufs);
        }
        self.state = restored;
        self.steps = steps;
        Ok(())
    }
}

/// The update of one parameter, in PyTorch's operation order and precision
/// (scalars computed in f64 as Python floats, then applied in f32).
fn update(
    config: &OptimizerConfig,
    step: u64,
    lr: f32,
    p: &mut [f32],
    g: &[f32],
    st: &mut [Vec<f32>],
) {
    match *config {
        OptimizerConfig::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            let (m, v) = st.split_at_mut(1);
            let (m, v) = (&mut m[0], &mut v[0]);
            let decay = (1.0 - lr as f64 * weight_decay) as f32;
            let exponent = step.min(i32::MAX as u64) as i32;
            let bc1 = 1.0 - beta1.powi(exponent);
            let bc2 = 1.0 - beta2.powi(exponent);
            let step_size = (lr as f64 / bc1) as f32;
            let bc2_sqrt = bc2.sqrt() as f32;
            let (one_m_b1, one_m_b2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
            let (beta2, eps) = (beta2 as f32, eps as f32);
            for ((pi, &gi), (mi, vi)) in p.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
                if weight_decay != 0.0 {
                    *pi *= decay;
                }
                // torch's lerp: m + w·(g − m).
                *mi += one_m_b1 * (gi - *mi);
                *vi = *vi * beta2 + one_m_b2 * gi * gi;
                let denom = vi.sqrt() / bc2_sqrt + eps;
                *pi -= step_size * (*mi / denom);
            }
        }
        OptimizerConfig::Sgd {
            momentum,
            weight_decay,
        } => {
            let (momentum, weight_decay) = (momentum as f32, weight_decay as f32);
            for (i, (pi, &gi)) in p.iter_mut().zip(g).enumerate() {
                let mut d = gi;
                if weight_decay != 0.0 {
                    d += weight_decay * *pi;
                }
                if momentum != 0.0 {
                    let buf = &mut st[0][i];
                    *buf = if step == 1 { d } else { *buf * momentum + d };
                    d = *buf;
                }
                *pi -= lr * d;
            }
        }
    }
}

/// Clips gradients to a global L2 norm of `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: when `max_norm / (norm + 1e-6) < 1`,
/// every gradient is multiplied by that factor. Returns the norm before
/// clipping (accumulated in f64, in parameter order, so it is the same on
/// every run). `max_norm <= 0` turns clipping off (the norm is still
/// returned). A non-finite norm leaves the gradients untouched (PyTorch
/// would spread the NaN); the caller should skip that step.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let sum: f64 = grads
        .iter()
        .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum();
    let norm = sum.sqrt() as f32;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                for x in g.iter_mut() {
                    *x *= coef;
                }
            }
        }
    }
    norm
}

/// The shape of a learning-rate schedule (all with linear warmup from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// `get_constant_schedule_with_warmup` (LongLoRA's `constant_with_warmup`).
    Constant,
    /// `get_cosine_schedule_with_warmup` (half a cosine to 0 at `total_steps`).
    Cosine,
    /// `get_linear_schedule_with_warmup` (linear to 0 at `total_steps`).
    Linear,
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            "cosine" => Ok(ScheduleKind::Cosine),
            "linear" => Ok(ScheduleKind::Linear),
            _ => Err(Error::invalid(format!(
                "unknown learning-rate schedule '{s}'; use constant, cosine or linear"
            ))),
        }
    }
}

/// A learning-rate schedule: `lr_at(k)` is the rate of the k-th optimizer
/// step (0-based), i.e. what `transformers`' `LambdaLR` gives when
/// `scheduler.step()` follows each `optimizer.step()`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f32,
    pub warmup_steps: u64,
    /// Steps of the whole run (cosine and linear reach 0 there; unused by
    /// constant).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The multiplier of `base_lr` at `step` (transformers' lambda).
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f32 {
        (self.base_lr as f64 * self.factor(step)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixtures() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim/optim.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn f32s(v: &Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    fn nested(v: &Value) -> Vec<Vec<f32>> {
        v.as_array().unwrap().iter().map(f32s).collect()
    }

    fn close(a: f32, b: f32, what: &str) {
        let tol = 1e-6 * b.abs().max(1e-3);
        assert!((a - b).abs() <= tol, "{what}: {a} vs torch {b}");
    }

    fn config_of(case: &Value) -> OptimizerConfig {
        let c = &case["config"];
        let f = |k: &str| c[k].as_f64().unwrap();
        match case["kind"].as_str().unwrap() {
            "adamw" => OptimizerConfig::AdamW {
                beta1: f("beta1"),
                beta2: f("beta2"),
                eps: f("eps"),
                weight_decay: f("weight_decay"),
            },
            _ => OptimizerConfig::Sgd {
                momentum: f("momentum"),
                weight_decay: f("weight_decay"),
            },
        }
    }

    #[test]
    fn updates_match_torch_optim() {
        let fx = fixtures();
        let sizes: Vec<(String, usize)> = fx["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s[0].as_str().unwrap().to_string(),
                    s[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        for case in fx["optimizers"].as_array().unwrap() {
            let config = config_of(case);
            let mut opt = Optimizer::new(config, &sizes);
            let mut params = nested(&case["init"]);
            let lrs = f32s(&case["lrs"]);
            for (k, grads) in case["grads"].as_array().unwrap().iter().enumerate() {
                let grads = nested(grads);
                let mut p: Vec<&mut [f32]> = params.iter_mut().map(|v| v.as_mut_slice()).collect();
                let g: Vec<&[f32]> = grads.iter().map(|v| v.as_slice()).collect();
                opt.step(&mut p, &g, lrs[k]).unwrap();
                let want = nested(&case["after"][k]);
                for (pi, (got, want)) in params.iter().zip(&want).enumerate() {
                    for (a, b) in got.iter().zip(want) {
                        close(*a, *b, &format!("{config:?} step {k} param {pi}"));
                    }
                }
            }
            assert_eq!(opt.steps(), 4);
            let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
            let want = case["state"].as_object().unwrap();
            assert_eq!(state.len(), want.len(), "{config:?}");
            for (k, v) in want {
                for (a, b) in state[k].as_f32().unwrap().iter().zip(f32s(v)) {
                    close(*a, b, &format!("{config:?} state {k}"));
                }
            }
        }
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let sizes = vec![("w".to_string(), 6), ("b".to_string(), 2)];
        for config in [
            OptimizerConfig::adamw(),
            OptimizerConfig::Sgd {
                momentum: 0.9,
                weight_decay: 0.0,
            },
        ] {
            let grads = |k: usize| -> Vec<Vec<f32>> {
                vec![
                    (0..6).map(|i| ((i + k) as f32 * 0.37).sin()).collect(),
                    vec![k as f32 * 0.1, -0.5],
                ]
            };
            let run = |opt: &mut Optimizer, params: &mut Vec<Vec<f32>>, k: usize| {
                let g = grads(k);
                let mut p: Vec<&mut [f32]> = params.iter_mut().map(|v| v.as_mut_slice()).collect();
                let g: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
                opt.step(&mut p, &g, 0.01).unwrap();
            };
            let mut a = Optimizer::new(config, &sizes);
            let mut pa = vec![vec![1.0; 6], vec![0.5; 2]];
            for k in 0..3 {
                run(&mut a, &mut pa, k);
            }
            let saved: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
            let mut b = Optimizer::new(config, &sizes);
            b.load_state(&saved, a.steps()).unwrap();
            let mut pb = pa.clone();
            for k in 3..6 {
                run(&mut a, &mut pa, k);
                run(&mut b, &mut pb, k);
            }
            assert_eq!(pa, pb, "{config:?}");
        }
        let mut opt = Optimizer::new(OptimizerConfig::adamw(), &sizes);
        let err = opt.load_state(&HashMap::new(), 1).unwrap_err();
        assert!(err.to_string().contains("'w.exp_avg'"), "{err}");
        let mut p = vec![0.0f32; 5];
        let err = opt
            .step(
                &mut [p.as_mut_slice(), &mut [0.0; 2]],
                &[&[0.0; 5], &[0.0; 2]],
                0.1,
            )
            .unwrap_err();
        assert!(err.to_string().contains("'w' has 6 elements"), "{err}");
    }

    #[test]
    fn clipping_matches_torch() {
        let fx = fixtures();
        for case in fx["clip"].as_array().unwrap() {
            let max_norm = case["max_norm"].as_f64().unwrap() as f32;
            let mut grads = nested(&case["grads"]);
            let mut g: Vec<&mut [f32]> = grads.iter_mut().map(|v| v.as_mut_slice()).collect();
            let norm = clip_grad_norm(&mut g, max_norm);
            close(norm, case["norm"].as_f64().unwrap() as f32, "norm");
            for (got, want) in grads.iter().zip(nested(&case["clipped"])) {
                for (a, b) in got.iter().zip(&want) {
                    close(*a, *b, &format!("clipped at {max_norm}"));
                }
            }
        }
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut [g.as_mut_slice()], 0.0), 5.0);
        assert_eq!(g, vec![3.0, 4.0]);
        let mut g = vec![f32::NAN, 4.0];
        assert!(clip_grad_norm(&mut [g.as_mut_slice()], 1.0).is_nan());
        assert_eq!(g[1], 4.0);
    }

    #[test]
    fn schedules_match_transformers() {
        let fx = fixtures();
        for case in fx["schedules"].as_array().unwrap() {
            let sched = LrSchedule {
                kind: case["kind"].as_str().unwrap().parse().unwrap(),
                base_lr: case["base_lr"].as_f64().unwrap() as f32,
                warmup_steps: case["warmup_steps"].as_u64().unwrap(),
                total_steps: case["total_steps"].as_u64().unwrap(),
            };
            for (k, want) in f32s(&case["lrs"]).into_iter().enumerate() {
                let got = sched.lr_at(k as u64);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs() + 1e-12,
                    "{:?} step {k}: {got} vs {want}",
                    sched.kind
                );
            }
        }
        assert!("warmup".parse::<ScheduleKind>().is_err());
    }
}
