//! Training checkpoints: `OUT/checkpoints/step-N/` holding
//! - `trainable.safetensors`: the trainable weights by name (f32),
//! - `optimizer.safetensors`: the optimizer state tensors,
//! - `state.json`: [`TrainState`] (step, loader position, RNG state, …).
//!
//! A checkpoint is written under the hidden sibling `.step-N.tmp`, every
//! file fsynced, then renamed into place, so a crash leaves either the whole
//! checkpoint or none (hidden directories are ignored by [`latest`]).

use super::data::LoaderState;
use crate::hf::{read_tensors, write_tensors};
use crate::ir::Tensor;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done when the checkpoint was taken.
    pub step: u64,
    /// Where the training data loader stands.
    pub loader: LoaderState,
    /// The training RNG's whole state ([`crate::util::SplitMix64::state`]).
    pub rng_state: u64,
    /// The optimizer's own step count ([`super::optim::Optimizer::steps`]).
    pub optimizer_steps: u64,
    /// Anything else the training loop wants back (config, best loss, …).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A checkpoint read back by [`load`].
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub trainable: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
}

/// `OUT/checkpoints`.
pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// `OUT/checkpoints/step-N`.
pub fn step_dir(out_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(out_dir).join(format!("step-{step}"))
}

/// Writes the checkpoint of `state.step` and returns its directory. An
/// existing checkpoint of the same step is replaced only once the new one
/// is complete.
pub fn save(
    out_dir: &Path,
    state: &TrainState,
    trainable: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
) -> Result<PathBuf> {
    let parent = checkpoints_dir(out_dir);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = format!("step-{}", state.step);
    let final_dir = parent.join(&name);
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        // Left by a crash during an earlier save of this step.
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| -> Result<()> {
        write_tensors(&tmp.join(TRAINABLE_FILE), trainable)?;
        write_tensors(&tmp.join(OPTIMIZER_FILE), optimizer)?;
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::invalid(format!("cannot encode the training state: {e}")))?;
        write_synced(&tmp.join(STATE_FILE), &json)?;
        sync_dir(&tmp)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        // Move the old one aside first: rename cannot replace a non-empty
        // directory, and deleting it before the new one is in place would
        // leave a window with no checkpoint of this step.
        let old = parent.join(format!(".{name}.old"));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    sync_dir(&parent)?;
    Ok(final_dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Makes a directory's entries (new files, renames) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Reads a checkpoint directory (`…/step-N`).
pub fn load(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "{}: no such checkpoint directory",
            dir.display()
        )));
    }
    let state_path = dir.join(STATE_FILE);
    let text = crate::util::read_capped(&state_path, crate::util::MAX_TEXT_BYTES)?;
    let state: TrainState = serde_json::from_slice(&text).map_err(|e| {
        Error::format(
            &state_path,
            format!(
                "not a training state (the checkpoint is damaged; resume from an earlier one): {e}"
            ),
        )
    })?;
    let trainable = read_tensors(&dir.join(TRAINABLE_FILE))?;
    let optimizer = read_tensors(&dir.join(OPTIMIZER_FILE))?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        trainable,
        optimizer,
    })
}

/// Complete checkpoints under `OUT/checkpoints`, by step, ascending
/// (hidden temporary directories are not checkpoints).
pub fn list(out_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(out_dir)) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let step = name.to_str()?.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The checkpoint with the highest step, if any.
pub fn latest(out_dir: &Path) -> Option<PathBuf> {
    list(out_dir).pop().map(|(_, p)| p)
}

/// Deletes all but the `n` newest checkpoints (`n = 0` keeps all); returns
/// the directories removed.
pub fn keep_last(out_dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let all = list(out_dir);
    let excess = all.len().saturating_sub(n);
    let mut removed = Vec::with_capacity(excess);
    for (_, p) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        removed.push(p);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            loader: LoaderState {
                epoch: 2,
                position: 17,
            },
            rng_state: 0xDEAD_BEEF_1234_5678,
            optimizer_steps: step,
            extra: serde_json::json!({"lr": 2e-5, "note": "x"}),
        }
    }

    fn tensors(seed: f32) -> Vec<(String, Tensor)> {
        vec![
            (
                "model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                Tensor::f32(
                    vec![2, 3],
                    vec![seed, -0.0, 1e-38, f32::MIN_POSITIVE, 3.5, -7.25],
                ),
            ),
            ("norm".into(), Tensor::f32(vec![4], vec![seed; 4])),
        ]
    }

    #[test]
    fn round_trip_is_bitwise() {
        let dir = tempfile::tempdir().unwrap();
        let opt = vec![(
            "norm.exp_avg".to_string(),
            Tensor::f32(vec![4], vec![0.1, 0.2, 0.3, 0.4]),
        )];
        let p = save(dir.path(), &state(10), &tensors(1.5), &opt).unwrap();
        assert_eq!(p, step_dir(dir.path(), 10));
        let ck = load(&p).unwrap();
        assert_eq!(ck.state, state(10));
        let bits = |t: &[(String, Tensor)]| -> Vec<(String, Vec<u32>)> {
            t.iter()
                .map(|(n, t)| {
                    (
                        n.clone(),
                        t.as_f32().unwrap().iter().map(|x| x.to_bits()).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(bits(&ck.trainable), bits(&tensors(1.5)));
        assert_eq!(bits(&ck.optimizer), bits(&opt));
        // Same step again: replaced.
        save(dir.path(), &state(10), &tensors(2.5), &opt).unwrap();
        assert_eq!(bits(&load(&p).unwrap().trainable), bits(&tensors(2.5)));
    }

    #[test]
    fn latest_ignores_temporaries_and_pruning_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest(dir.path()), None);
        for s in [5, 20, 100] {
            save(dir.path(), &state(s), &tensors(0.0), &[]).unwrap();
        }
        std::fs::create_dir(checkpoints_dir(dir.path()).join(".step-200.tmp")).unwrap();
        std::fs::create_dir(checkpoints_dir(dir.path()).join("step-x")).unwrap();
        assert_eq!(latest(dir.path()), Some(step_dir(dir.path(), 100)));
        let removed = keep_last(dir.path(), 2).unwrap();
        assert_eq!(removed, vec![step_dir(dir.path(), 5)]);
        let left: Vec<u64> = list(dir.path()).iter().map(|(s, _)| *s).collect();
        assert_eq!(left, [20, 100]);
    }

    #[test]
    fn damaged_checkpoints_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = save(dir.path(), &state(3), &tensors(1.0), &[]).unwrap();
        let f = p.join(TRAINABLE_FILE);
        let len = std::fs::metadata(&f).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(len / 2).unwrap();
        drop(file);
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains(TRAINABLE_FILE), "{err}");
        std::fs::write(p.join(STATE_FILE), "{\"step\": 3").unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        std::fs::remove_file(p.join(STATE_FILE)).unwrap();
        let err = load(&p).unwrap_err().to_string();
        assert!(err.contains(STATE_FILE), "{err}");
        assert!(load(&dir.path().join("nope")).is_err());
    }
}
