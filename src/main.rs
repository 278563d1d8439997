//! The `lcc` command line. Each subcommand parses its arguments and calls
//! one library function; errors print with their causes and exit with 2.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lcc::ir::{self, Tensor};
use lcc::{hf, model, onnx, passes, runtime};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lcc",
    version,
    about = "A compiler for long-context (LongLoRA) fine-tuning of LLaMA models",
    long_about = "lcc imports a LLaMA model (an ONNX file as torch's exporters write it, or a Hugging Face \
directory: config.json + safetensors) into a graph IR, and inspects, runs, compares and converts it.\n\n\
Exit codes: 0 success (diff-graph: graphs equal), 1 diff-graph: graphs differ, 2 error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarise a model: format, opsets, inputs/outputs, op histogram, parameters.
    Inspect {
        /// An .onnx file or a Hugging Face directory.
        model: PathBuf,
        /// Print the canonical IR text instead of the summary.
        #[arg(long)]
        print: bool,
        /// Print the summary as JSON.
        #[arg(long, conflicts_with = "print")]
        json: bool,
        /// Print the cost model instead: parameters (total; trainable split into
        /// LoRA, embedding, norm, other) and forward FLOPs (projections, MLP,
        /// attention, lm_head), counted as the LongLoRA paper does.
        #[arg(long, conflicts_with = "print", requires = "seq_len")]
        cost: bool,
        /// Sequence length for --cost.
        #[arg(long)]
        seq_len: Option<usize>,
        /// Batch size for --cost.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Passes to apply before --cost (e.g. pi,s2attn,lora,trainable).
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Run the model's forward pass on the CPU.
    Exec {
        /// An .onnx file or a Hugging Face directory.
        model: PathBuf,
        /// A safetensors file with one tensor per graph input, by input name
        /// (for a Hugging Face model: `input_ids`, int64 [batch, seq]).
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the outputs (safetensors, by graph output name).
        #[arg(short, long)]
        output: PathBuf,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Compare two models (ONNX or Hugging Face, mixed): a semantic summary,
    /// then a unified diff of their canonical prints.
    #[command(name = "diff-graph")]
    DiffGraph {
        a: PathBuf,
        b: PathBuf,
        /// Print only the summary.
        #[arg(long)]
        stat: bool,
        /// Never colour the diff (it is coloured only when stdout is a terminal).
        #[arg(long)]
        no_color: bool,
    },
    /// Convert between ONNX and Hugging Face (the output's form follows its
    /// name: `*.onnx` or a directory).
    Convert {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// When ONNX weights go to an external data file beside the model.
        #[arg(long, value_enum, default_value_t = ExternalDataArg::Auto)]
        external_data: ExternalDataArg,
    },
    /// Fold a PEFT adapter (and LongLoRA's trained embedding/norm weights) into
    /// a base model and write the merged model.
    Merge {
        /// The base model (.onnx or Hugging Face directory).
        model: PathBuf,
        /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// LongLoRA's trainable_params.safetensors (embedding and norms).
        #[arg(long)]
        trainable: Option<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
        /// When ONNX weights go to an external data file beside the model.
        #[arg(long, value_enum, default_value_t = ExternalDataArg::Auto)]
        external_data: ExternalDataArg,
    },
    /// Rewrite a model with compiler passes (LongLoRA: pi, s2attn, lora, …)
    /// and write the result (`*.onnx` or a Hugging Face directory).
    Rewrite {
        model: PathBuf,
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(short, long)]
        output: PathBuf,
        /// Print the canonical IR after this pass (repeatable; `all` for every pass).
        #[arg(long, value_name = "PASS")]
        print_after: Vec<String>,
        /// Print each pass's report: what it matched, added, removed; parameters; time.
        #[arg(long)]
        explain: bool,
        /// Verify the graph after every pass.
        #[arg(long)]
        verify: bool,
        /// When ONNX weights go to an external data file beside the model.
        #[arg(long, value_enum, default_value_t = ExternalDataArg::Auto)]
        external_data: ExternalDataArg,
    },
}

#[derive(clap::Args)]
struct PipelineArgs {
    /// Passes to run, in order, each with its default options (e.g. pi,s2attn,lora).
    #[arg(long, value_delimiter = ',', conflicts_with = "pipeline")]
    passes: Vec<String>,
    /// A YAML recipe (a path, or the name of one in passes/, e.g. longlora-train).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Override a pass option: PASS.OPTION=VALUE (VALUE is YAML), repeatable.
    #[arg(long = "set", value_name = "PASS.OPTION=VALUE")]
    set: Vec<String>,
}

impl PipelineArgs {
    fn build(&self) -> Result<passes::Pipeline> {
        let mut pipeline = match &self.pipeline {
            Some(p) => passes::Pipeline::from_yaml(&recipe_path(p))?,
            None if !self.passes.is_empty() => {
                passes::Pipeline::from_names(&self.passes.join(","))?
            }
            None => bail!("name the passes to run: --passes pi,s2attn,lora or --pipeline RECIPE"),
        };
        for s in &self.set {
            pipeline.set(s)?;
        }
        Ok(pipeline)
    }
}

/// A recipe argument: a path as given, else `passes/NAME.yaml`.
fn recipe_path(p: &Path) -> PathBuf {
    if p.exists() {
        return p.to_path_buf();
    }
    let candidate = Path::new("passes").join(p).with_extension("yaml");
    if candidate.exists() {
        candidate
    } else {
        p.to_path_buf()
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ExternalDataArg {
    /// Only when the weights exceed protobuf's 2 GB limit.
    Auto,
    Always,
    Never,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect {
            model,
            print,
            json,
            cost,
            seq_len,
            batch,
            pipeline,
        } => {
            if cost {
                inspect_cost(&model, seq_len.unwrap_or(0), batch, &pipeline, json)
            } else {
                if !pipeline.passes.is_empty() || pipeline.pipeline.is_some() {
                    bail!("--passes/--pipeline go with --cost (use `lcc rewrite` to apply passes)");
                }
                inspect(&model, print, json)
            }
        }
        Command::Exec {
            model,
            inputs,
            output,
            threads,
        } => exec(&model, &inputs, &output, threads),
        Command::DiffGraph {
            a,
            b,
            stat,
            no_color,
        } => diff_graph(&a, &b, stat, no_color),
        Command::Convert {
            input,
            output,
            external_data,
        } => convert(&input, &output, external_data),
        Command::Merge {
            model,
            adapter,
            trainable,
            output,
            external_data,
        } => {
            let graph = hf::peft::merge(&model, &adapter, trainable.as_deref())?;
            let format = model::save(&graph, &output, &export_options(external_data))
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "merged {} into {}; wrote {} ({})",
                adapter.display(),
                model.display(),
                output.display(),
                format.describe()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Rewrite {
            model,
            pipeline,
            output,
            print_after,
            explain,
            verify,
            external_data,
        } => rewrite(
            &model,
            &pipeline,
            &output,
            &print_after,
            explain,
            verify,
            external_data,
        ),
    }
}

fn inspect(path: &Path, print: bool, json: bool) -> Result<ExitCode> {
    let format = model::detect(path)?;
    let graph = model::load(path)?;
    let mut out = std::io::stdout().lock();
    if print {
        out.write_all(ir::print(&graph)?.as_bytes())?;
    } else {
        let summary = model::summarize(&graph, path, format);
        if json {
            writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
        } else {
            write!(out, "{summary}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect_cost(
    path: &Path,
    seq_len: usize,
    batch: usize,
    pipeline: &PipelineArgs,
    json: bool,
) -> Result<ExitCode> {
    if seq_len == 0 {
        bail!("--seq-len must be at least 1");
    }
    let mut graph = model::load(path)?;
    if !pipeline.passes.is_empty() || pipeline.pipeline.is_some() {
        pipeline
            .build()?
            .run(&mut graph, &passes::RunOptions::default(), |_, _| {})?;
    }
    let cost = lcc::cost::cost(&graph, seq_len, batch)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&cost)?);
    } else {
        print!("{}", lcc::cost::render(&cost));
    }
    Ok(ExitCode::SUCCESS)
}

fn exec(path: &Path, inputs: &Path, output: &Path, threads: Option<usize>) -> Result<ExitCode> {
    let graph = model::load(path)?;
    let tensors: HashMap<String, Tensor> = hf::read_tensors(inputs)
        .with_context(|| format!("reading inputs from {}", inputs.display()))?
        .into_iter()
        .collect();
    let backend = match threads {
        Some(n) => runtime::cpu::CpuBackend::with_threads(n),
        None => runtime::cpu::CpuBackend::new(),
    };
    let start = std::time::Instant::now();
    let outputs = runtime::Backend::run(&backend, &graph, &tensors)?;
    let elapsed = start.elapsed();
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(outputs.len());
    for (name, _) in &graph.outputs {
        match outputs.get(name) {
            Some(t) => named.push((name.clone(), t.clone())),
            None => bail!("the run produced no value for output '{name}'"),
        }
    }
    hf::write_tensors(output, &named)?;
    for (name, t) in &named {
        eprintln!("wrote {name}: {}{:?}", t.dtype, t.shape);
    }
    eprintln!(
        "ran {} in {:.3} s; outputs in {}",
        path.display(),
        elapsed.as_secs_f64(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn diff_graph(a: &Path, b: &Path, stat: bool, no_color: bool) -> Result<ExitCode> {
    let ga = model::load(a)?;
    let gb = model::load(b)?;
    let pa = ir::print(&ga)?;
    let pb = ir::print(&gb)?;
    let summary = ir::diff::diff(&ga, &gb)?;
    let equal = pa == pb;
    let mut out = std::io::stdout().lock();
    if equal {
        writeln!(out, "graphs are equal")?;
        return Ok(ExitCode::SUCCESS);
    }
    write!(out, "{summary}")?;
    if !stat {
        let color = !no_color && std::io::stdout().is_terminal();
        let text = similar::TextDiff::from_lines(&pa, &pb);
        let udiff = text
            .unified_diff()
            .context_radius(3)
            .header(&a.display().to_string(), &b.display().to_string())
            .to_string();
        writeln!(out)?;
        for line in udiff.lines() {
            if color {
                let code = if line.starts_with("+++") || line.starts_with("---") {
                    "1"
                } else if line.starts_with('+') {
                    "32"
                } else if line.starts_with('-') {
                    "31"
                } else if line.starts_with("@@") {
                    "36"
                } else {
                    ""
                };
                if code.is_empty() {
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "\x1b[{code}m{line}\x1b[0m")?;
                }
            } else {
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(ExitCode::from(1))
}

fn export_options(external: ExternalDataArg) -> onnx::ExportOptions {
    onnx::ExportOptions {
        external_data: match external {
            ExternalDataArg::Auto => onnx::ExternalData::Auto,
            ExternalDataArg::Always => onnx::ExternalData::Always,
            ExternalDataArg::Never => onnx::ExternalData::Never,
        },
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn rewrite(
    input: &Path,
    pipeline: &PipelineArgs,
    output: &Path,
    print_after: &[String],
    explain: bool,
    verify: bool,
    external: ExternalDataArg,
) -> Result<ExitCode> {
    let pipeline = pipeline.build()?;
    for p in print_after {
        if p != "all" && !pipeline.passes.iter().any(|s| &s.name == p) {
            bail!("--print-after {p}: pass '{p}' is not in the pipeline");
        }
    }
    let mut graph = model::load(input)?;
    let start = std::time::Instant::now();
    let mut printed = Ok(());
    let reports = pipeline.run(&mut graph, &passes::RunOptions { verify }, |report, g| {
        if explain {
            eprintln!("{report}");
        }
        if print_after.iter().any(|p| p == "all" || *p == report.pass) {
            match ir::print(g) {
                Ok(text) => println!("// after {}\n{text}", report.pass),
                Err(e) => printed = Err(e),
            }
        }
    })?;
    printed?;
    let format = model::save(&graph, output, &export_options(external))
        .with_context(|| format!("writing {}", output.display()))?;
    let names: Vec<&str> = reports.iter().map(|r| r.pass.as_str()).collect();
    eprintln!(
        "rewrote {} with {} in {:.2} s; wrote {} ({})",
        input.display(),
        names.join(", "),
        start.elapsed().as_secs_f64(),
        output.display(),
        format.describe()
    );
    Ok(ExitCode::SUCCESS)
}

fn convert(input: &Path, output: &Path, external: ExternalDataArg) -> Result<ExitCode> {
    let from = model::detect(input)?;
    let graph = model::load(input)?;
    let opts = export_options(external);
    let start = std::time::Instant::now();
    let to = model::save(&graph, output, &opts)
        .with_context(|| format!("converting {} to {}", input.display(), output.display()))?;
    eprintln!(
        "converted {} ({}) to {} ({}) in {:.2} s",
        input.display(),
        from.describe(),
        output.display(),
        to.describe(),
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
