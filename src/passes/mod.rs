//! Passes: graph rewrites with names, options and reports, run in order by a
//! pipeline that verifies the graph after each one.
//!
//! A pipeline comes from a list of names (`pi,s2attn,lora`), or from a YAML
//! recipe in `passes/`:
//!
//! ```yaml
//! passes:
//!   - pi: { factor: 8 }
//!   - s2attn: {}
//! ```
//!
//! and any option can be overridden with `--set pass.option=value` (the value
//! is read as YAML: `8`, `0.25`, `true`, `[q, v]`).

pub mod autodiff;
mod cse;
mod dce;
mod fold;
mod fuse;
pub mod lora;
pub mod merge_lora;
mod pi;
mod raise;
mod s2attn;
pub mod trainable;

use crate::ir::{self, Graph};
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Instant;

/// A graph rewrite.
pub trait Pass {
    fn name(&self) -> &'static str;
    /// Rewrites the graph; the report says what changed.
    fn run(&self, graph: &mut Graph) -> Result<Report>;
    /// Whether the pass works on LLaMA-level ops (Rope, Attention, Linear,
    /// …). Before such a pass the pipeline raises a primitive ONNX graph (a
    /// torch export) first, unless told not to.
    fn needs_llama_level(&self) -> bool {
        false
    }
}

/// Whether the graph holds LLaMA-level ops (a Hugging Face model, or an
/// ONNX export that was raised or written by lcc).
pub fn is_llama_level(graph: &Graph) -> bool {
    graph.g.node_weights().any(|n| n.op.is_llama_level())
}

/// Raises a primitive ONNX graph (a torch export) to LLaMA-level ops, strictly:
/// a block that does not match is an error naming the layer and the part.
/// `None` when the graph is LLaMA-level already. `why` names what needs it
/// (a pass, `merge`, `eval`), for the report's note.
pub fn ensure_llama_level(graph: &mut Graph, why: &str) -> Result<Option<Report>> {
    if is_llama_level(graph) {
        return Ok(None);
    }
    let start = Instant::now();
    let nodes_before = graph.g.node_count();
    let mut report = raise::Raise::new(raise::Options { strict: true })
        .run(graph)
        .map_err(|e| Error::invalid(format!("{e} ({why} needs LLaMA-level ops)")))?;
    report.pass = "raise".into();
    report.automatic = true;
    report.elapsed_s = start.elapsed().as_secs_f64();
    if report.nodes_added == 0 && report.nodes_removed == 0 {
        let after = graph.g.node_count();
        report.nodes_added = after.saturating_sub(nodes_before);
        report.nodes_removed = nodes_before.saturating_sub(after);
    }
    report.notes.insert(
        0,
        format!("{why} needs LLaMA-level ops and the graph held primitive ONNX ops (a torch export); --no-raise turns this off"),
    );
    Ok(Some(report))
}

/// Runs `fuse` with its default options on a training graph that
/// `autodiff` made (what `run-train` and `bench` compile).
pub fn fuse_training_graph(graph: &mut Graph) -> Result<Report> {
    fuse::Fuse::new(fuse::Options::default()).run(graph)
}

/// What a pass did, for `--explain`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Report {
    pub pass: String,
    /// Places the pass's pattern matched.
    pub matched: usize,
    pub nodes_added: usize,
    pub nodes_removed: usize,
    /// Parameters added (negative: removed).
    pub params_added: i64,
    /// Anything else worth saying (what was skipped and why, …).
    pub notes: Vec<String>,
    pub elapsed_s: f64,
    /// Run on demand (a `raise` before a pass that needs LLaMA-level ops),
    /// not named by the user.
    pub automatic: bool,
}

impl Report {
    /// The one line a command prints for a pass it ran on its own.
    pub fn summary_line(&self) -> String {
        format!(
            "note: ran '{}' first ({:.2} s): {}",
            self.pass,
            self.elapsed_s,
            self.notes.first().map_or("", String::as_str)
        )
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: matched {}, nodes +{} -{}, parameters {}{}, {:.3} s",
            self.pass,
            self.matched,
            self.nodes_added,
            self.nodes_removed,
            if self.params_added >= 0 { "+" } else { "-" },
            crate::util::group_digits(self.params_added.unsigned_abs()),
            self.elapsed_s
        )?;
        for n in &self.notes {
            write!(f, "\n  {n}")?;
        }
        Ok(())
    }
}

/// A pass lcc knows: its name, a one-line description, and how to make it
/// from its options.
pub struct PassEntry {
    pub name: &'static str,
    pub about: &'static str,
    make: fn(&PassSpec) -> Result<Box<dyn Pass>>,
}

/// Makes a pass whose constructor cannot fail.
fn boxed<P: Pass + 'static, O: DeserializeOwned>(
    spec: &PassSpec,
    new: impl FnOnce(O) -> P,
) -> Result<Box<dyn Pass>> {
    Ok(Box::new(new(parse_options(&spec.name, &spec.options)?)))
}

/// Makes a pass whose constructor validates its options.
fn checked<P: Pass + 'static, O: DeserializeOwned>(
    spec: &PassSpec,
    new: impl FnOnce(O) -> Result<P>,
) -> Result<Box<dyn Pass>> {
    Ok(Box::new(new(parse_options(&spec.name, &spec.options)?)?))
}

/// A pipeline as a command line names it: a recipe or a list of passes,
/// and option overrides (`--pipeline`, `--passes`, `--set`).
#[derive(Clone, Debug, Default)]
pub struct PipelineSpec {
    /// A recipe: a path, or the name of one in passes/.
    pub recipe: Option<String>,
    pub passes: Vec<String>,
    /// `pass.option=value` overrides.
    pub set: Vec<String>,
}

impl PipelineSpec {
    /// The pipeline, or `None` when neither a recipe nor passes are named.
    pub fn build(&self) -> Result<Option<Pipeline>> {
        let mut pipeline = match &self.recipe {
            Some(r) => Pipeline::recipe(r)?,
            None if !self.passes.is_empty() => Pipeline::from_names(&self.passes.join(","))?,
            None => return Ok(None),
        };
        for s in &self.set {
            pipeline.set(s)?;
        }
        Ok(Some(pipeline))
    }
}

/// The passes lcc knows: the one list that `create`, `lcc passes` and the
/// recipe checks read.
pub const REGISTRY: &[PassEntry] = &[
    PassEntry {
        name: "raise",
        about: "finds LLaMA structure in primitive ONNX graphs and raises it to LLaMA-level ops",
        make: |s| boxed(s, raise::Raise::new),
    },
    PassEntry {
        name: "pi",
        about: "RoPE position interpolation (linear) and the dynamic, yarn and llama3 scalings",
        make: |s| checked(s, pi::PositionInterpolation::new),
    },
    PassEntry {
        name: "s2attn",
        about: "shifted sparse attention (LongLoRA S²-Attn) for training; inference: true restores full attention",
        make: |s| checked(s, s2attn::ShiftedSparseAttention::new),
    },
    PassEntry {
        name: "lora",
        about: "adds LoRA branches (PEFT names and init) to the target projections",
        make: |s| boxed(s, lora::Lora::new),
    },
    PassEntry {
        name: "trainable",
        about: "marks weights trainable by pattern (default: embed, norm); freezes the rest",
        make: |s| boxed(s, trainable::Trainable::new),
    },
    PassEntry {
        name: "merge-lora",
        about: "folds LoRA branches into the base weights",
        make: |s| boxed(s, merge_lora::MergeLora::new),
    },
    PassEntry {
        name: "fold",
        about: "constant folding: evaluates nodes whose inputs are all constants",
        make: |s| boxed(s, fold::ConstantFolding::new),
    },
    PassEntry {
        name: "cse",
        about: "common subexpression elimination: merges identical nodes",
        make: |s| boxed(s, cse::CommonSubexpressionElimination::new),
    },
    PassEntry {
        name: "dce",
        about: "dead code elimination: drops nodes no output needs",
        make: |s| boxed(s, dce::DeadCodeElimination::new),
    },
    PassEntry {
        name: "autodiff",
        about: "training step: cross-entropy loss on new input labels, and the gradient of every trainable weight as outputs",
        make: |s| boxed(s, autodiff::Autodiff::new),
    },
    PassEntry {
        name: "fuse",
        about: "kernel fusion after autodiff: merges q/k/v and gate/up into one GEMM each, and elementwise chains into one expression",
        make: |s| boxed(s, fuse::Fuse::new),
    },
];

/// The registry entry of `name`, or an error listing the known passes.
pub fn lookup(name: &str) -> Result<&'static PassEntry> {
    REGISTRY.iter().find(|e| e.name == name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        Error::invalid(format!(
            "unknown pass '{name}'; lcc knows: {}",
            known.join(", ")
        ))
    })
}

/// One pass of a pipeline with its options.
#[derive(Clone, Debug, PartialEq)]
pub struct PassSpec {
    pub name: String,
    pub options: Map<String, Value>,
}

/// Reads a pass's options into its options struct; an unknown option or a
/// value of the wrong type is an error naming the pass.
pub fn parse_options<T: DeserializeOwned>(pass: &str, options: &Map<String, Value>) -> Result<T> {
    serde_json::from_value(Value::Object(options.clone()))
        .map_err(|e| Error::invalid(format!("pass '{pass}': bad options: {e}")))
}

/// Instantiates a pass from its spec.
pub fn create(spec: &PassSpec) -> Result<Box<dyn Pass>> {
    (lookup(&spec.name)?.make)(spec)
}

/// The recipes in `passes/`, built in.
pub const BUILTIN_RECIPES: &[(&str, &str)] = &[
    (
        "longlora-train",
        include_str!("../../passes/longlora-train.yaml"),
    ),
    (
        "longlora-infer",
        include_str!("../../passes/longlora-infer.yaml"),
    ),
    ("lora-train", include_str!("../../passes/lora-train.yaml")),
    ("cleanup", include_str!("../../passes/cleanup.yaml")),
];

/// An ordered list of passes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pipeline {
    pub passes: Vec<PassSpec>,
}

/// How a pipeline runs.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Run `ir::verify` after every pass.
    pub verify: bool,
    /// Do not raise a primitive ONNX graph before a pass that needs
    /// LLaMA-level ops (`--no-raise`): such a pass then fails.
    pub no_raise: bool,
}

impl Pipeline {
    /// `pi,s2attn,lora`: each pass with its default options.
    pub fn from_names(list: &str) -> Result<Pipeline> {
        let passes = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| PassSpec {
                name: name.to_string(),
                options: Map::new(),
            })
            .collect::<Vec<_>>();
        if passes.is_empty() {
            return Err(Error::invalid(
                "no passes named (expected e.g. --passes pi,s2attn,lora)",
            ));
        }
        let p = Pipeline { passes };
        p.check_names()?;
        Ok(p)
    }

    /// A YAML recipe: `passes:` followed by a list of `name: {options}`.
    pub fn from_yaml_str(text: &str, source: &Path) -> Result<Pipeline> {
        let doc: Value = serde_saphyr::from_str(text)
            .map_err(|e| Error::format(source, format!("not a valid YAML pipeline: {e}")))?;
        let list = doc
            .get("passes")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::format(source, "expected a top-level `passes:` list"))?;
        let mut passes = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let spec = match item {
                Value::String(name) => PassSpec {
                    name: name.clone(),
                    options: Map::new(),
                },
                Value::Object(m) if m.len() == 1 => {
                    let (name, opts) = m.iter().next().unwrap();
                    let options = match opts {
                        Value::Object(o) => o.clone(),
                        Value::Null => Map::new(),
                        other => {
                            return Err(Error::format(
                                source,
                                format!(
                                    "pass {} ('{name}'): options must be a mapping, got {other}",
                                    i + 1
                                ),
                            ))
                        }
                    };
                    PassSpec {
                        name: name.clone(),
                        options,
                    }
                }
                other => {
                    return Err(Error::format(
                        source,
                        format!(
                            "pass {}: expected `name` or `name: {{options}}`, got {other}",
                            i + 1
                        ),
                    ))
                }
            };
            passes.push(spec);
        }
        let p = Pipeline { passes };
        p.check_names()
            .map_err(|e| Error::format(source, e.to_string()))?;
        Ok(p)
    }

    /// A recipe by path, or by the name of one of the recipes shipped in
    /// `passes/` (built into the binary, so they work from any directory).
    pub fn recipe(name_or_path: &str) -> Result<Pipeline> {
        let path = Path::new(name_or_path);
        if path.exists() {
            return Self::from_yaml(path);
        }
        let stem = name_or_path.trim_end_matches(".yaml");
        let stem = stem.strip_prefix("passes/").unwrap_or(stem);
        match BUILTIN_RECIPES.iter().find(|(n, _)| *n == stem) {
            Some((n, text)) => {
                Self::from_yaml_str(text, &Path::new("passes").join(format!("{n}.yaml")))
            }
            None => Err(Error::invalid(format!(
                "no recipe '{name_or_path}': not a file, and not one of the built-in recipes ({})",
                BUILTIN_RECIPES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    pub fn from_yaml(path: &Path) -> Result<Pipeline> {
        let text = crate::util::read_text_capped(path, crate::util::MAX_TEXT_BYTES)?;
        Self::from_yaml_str(&text, path)
    }

    fn check_names(&self) -> Result<()> {
        for p in &self.passes {
            lookup(&p.name)?;
        }
        Ok(())
    }

    /// Applies `pass.option=value` to every occurrence of `pass`.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment.split_once('=').ok_or_else(|| {
            Error::invalid(format!("--set '{assignment}': expected pass.option=value"))
        })?;
        let (pass, option) = key.trim().split_once('.').ok_or_else(|| {
            Error::invalid(format!("--set '{assignment}': expected pass.option=value"))
        })?;
        let parsed: Value = if value.trim().is_empty() {
            Value::String(String::new())
        } else {
            serde_saphyr::from_str(value.trim()).map_err(|e| {
                Error::invalid(format!(
                    "--set '{assignment}': the value is not valid YAML: {e}"
                ))
            })?
        };
        let mut found = false;
        for p in self.passes.iter_mut().filter(|p| p.name == pass) {
            p.options.insert(option.to_string(), parsed.clone());
            found = true;
        }
        if !found {
            let names: Vec<&str> = self.passes.iter().map(|p| p.name.as_str()).collect();
            return Err(Error::invalid(format!(
                "--set '{assignment}': pass '{pass}' is not in the pipeline ({})",
                names.join(", ")
            )));
        }
        Ok(())
    }

    /// Instantiates every pass (so option errors surface before any work).
    pub fn build(&self) -> Result<Vec<Box<dyn Pass>>> {
        self.passes.iter().map(create).collect()
    }

    /// Runs the passes in order. `after` sees each report and the graph as
    /// the pass left it (for `--explain` and `--print-after`).
    pub fn run(
        &self,
        graph: &mut Graph,
        options: &RunOptions,
        mut after: impl FnMut(&Report, &Graph),
    ) -> Result<Vec<Report>> {
        let passes = self.build()?;
        let mut reports = Vec::with_capacity(passes.len());
        for pass in passes {
            if pass.needs_llama_level() && !is_llama_level(graph) {
                if options.no_raise {
                    return Err(Error::invalid(format!(
                        "pass '{}' works on LLaMA-level ops and the graph holds primitive ONNX ops (a torch export); put 'raise' before it, or drop --no-raise",
                        pass.name()
                    )));
                }
                if let Some(report) = ensure_llama_level(graph, &format!("pass '{}'", pass.name()))?
                {
                    if options.verify {
                        ir::verify(graph)
                            .map_err(|e| Error::invalid(format!("after pass 'raise': {e}")))?;
                    }
                    after(&report, graph);
                    reports.push(report);
                }
            }
            let nodes_before = graph.g.node_count();
            let params_before = graph.weights.num_params() as i64;
            let start = Instant::now();
            let mut report = pass.run(graph)?;
            report.pass = pass.name().to_string();
            report.elapsed_s = start.elapsed().as_secs_f64();
            if report.nodes_added == 0 && report.nodes_removed == 0 {
                let after_n = graph.g.node_count();
                report.nodes_added = after_n.saturating_sub(nodes_before);
                report.nodes_removed = nodes_before.saturating_sub(after_n);
            }
            if report.params_added == 0 {
                report.params_added = graph.weights.num_params() as i64 - params_before;
            }
            // Every value typed again after each pass (a pass may rewire or
            // retype weights); a shape the rewrite broke is an error here.
            graph
                .infer_types()
                .map_err(|e| Error::invalid(format!("after pass '{}': {e}", pass.name())))?;
            if options.verify {
                ir::verify(graph)
                    .map_err(|e| Error::invalid(format!("after pass '{}': {e}", pass.name())))?;
            }
            after(&report, graph);
            reports.push(report);
        }
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_yaml_and_set_build_the_same_pipeline() {
        let mut a = Pipeline::from_names("dce").unwrap();
        let b = Pipeline::from_yaml_str("# recipe\npasses:\n  - dce: {}\n", Path::new("r.yaml"))
            .unwrap();
        assert_eq!(a, b);
        let c = Pipeline::from_yaml_str("passes:\n  - dce\n", Path::new("r.yaml")).unwrap();
        assert_eq!(a, c);
        a.set("dce.verbose=[1, 2]").unwrap();
        assert_eq!(a.passes[0].options["verbose"], serde_json::json!([1, 2]));
        let err = a.build().err().unwrap().to_string();
        assert!(
            err.contains("pass 'dce': bad options") && err.contains("verbose"),
            "{err}"
        );
    }

    #[test]
    fn unknown_passes_and_bad_recipes_are_named() {
        let err = Pipeline::from_names("dce,frobnicate")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown pass 'frobnicate'") && err.contains("dce"),
            "{err}"
        );
        let err = Pipeline::from_yaml_str("steps: []", Path::new("r.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("r.yaml") && err.contains("passes"), "{err}");
        let err = Pipeline::from_yaml_str("passes: [dce: 3]", Path::new("r.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("options must be a mapping"), "{err}");
        let mut p = Pipeline::from_names("dce").unwrap();
        let err = p.set("pi.factor=8").unwrap_err().to_string();
        assert!(err.contains("pass 'pi' is not in the pipeline"), "{err}");
        let err = p.set("dce").unwrap_err().to_string();
        assert!(err.contains("expected pass.option=value"), "{err}");
    }
}
