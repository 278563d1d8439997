//! The `lcc` command line. Each subcommand parses its arguments and calls
//! one library function; errors print with their causes and exit with 2.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lcc::ir::{self, Tensor};
use lcc::train::{eval, tokenizer::Tokenizer};
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
    /// Evaluate a model: perplexity over context lengths, passkey retrieval.
    Eval {
        #[command(subcommand)]
        what: EvalCommand,
    },
    /// Continue a prompt with a KV cache (greedy, or temperature + top-p
    /// sampling) and print the continuation.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        /// Most tokens to generate (fewer when the model emits end-of-sequence).
        #[arg(long)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: draw from the most likely tokens holding this much
        /// probability (1 keeps all).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Seed of the sampler; the same seed repeats a generation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity at each context length, with LongLoRA's protocol: windows of
    /// CTX tokens every STRIDE tokens, each one forward at [1, CTX] scored on
    /// its CTX-1 predicted tokens; ppl = exp(mean of per-window mean losses).
    Ppl {
        #[command(flatten)]
        model: ModelArgs,
        /// Evaluation data: a text file, a directory of *.txt files (sorted,
        /// documents separated by EOS), or a .bin of little-endian u16 tokens.
        #[arg(long)]
        data: PathBuf,
        /// Context lengths, comma-separated (e.g. 256,512,1024).
        #[arg(long, value_delimiter = ',', required = true)]
        ctx: Vec<usize>,
        /// Tokens between window starts [default: the context length, i.e.
        /// non-overlapping windows].
        #[arg(long)]
        stride: Option<usize>,
        /// Evaluate at most this many windows per context, evenly spaced
        /// [default: all].
        #[arg(long)]
        max_windows: Option<usize>,
        /// Attention to evaluate with: full causal, or S²-Attn (the `s2attn`
        /// pass, groups of 1/4 of the context), as LongLoRA reports both.
        #[arg(long, value_enum, default_value_t = AttentionArg::Full)]
        attention: AttentionArg,
        /// Print a JSON array, one object per context length.
        #[arg(long)]
        json: bool,
        /// Also write an SVG plot of perplexity against context length.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Passkey retrieval: a random 5-digit key hidden at a random depth in
    /// filler text of each length; a trial is correct when greedy decoding
    /// repeats the key.
    Passkey {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt lengths in tokens, comma-separated (e.g. 256,512,1024).
        #[arg(long, value_delimiter = ',', required = true)]
        lengths: Vec<usize>,
        /// Prompts per length.
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// Seed for the keys and their depths.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print a JSON array, one object per length.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AttentionArg {
    /// Full causal attention.
    Full,
    /// Shifted sparse attention (S²-Attn), group size 1/4 of the context.
    S2,
}

/// The model to evaluate, with what was trained on top of it.
#[derive(clap::Args)]
struct ModelArgs {
    /// An .onnx file (raised to LLaMA ops) or a Hugging Face directory.
    model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// LongLoRA's trainable_params.safetensors (trained embedding and norms).
    #[arg(long)]
    trainable: Option<PathBuf>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
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
        Command::Eval {
            what:
                EvalCommand::Ppl {
                    model,
                    data,
                    ctx,
                    stride,
                    max_windows,
                    attention,
                    json,
                    plot,
                },
        } => eval_ppl(
            &model,
            &data,
            &ctx,
            stride,
            max_windows,
            attention,
            json,
            plot.as_deref(),
        ),
        Command::Eval {
            what:
                EvalCommand::Passkey {
                    model,
                    lengths,
                    trials,
                    seed,
                    json,
                },
        } => eval_passkey(&model, &lengths, trials, seed, json),
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
        } => generate(
            &model,
            &prompt,
            max_new_tokens,
            &lcc::train::generate::Sampling {
                temperature,
                top_p,
                seed,
            },
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

/// Loads the model for evaluation: raised to LLaMA ops when it is an ONNX
/// export, with the adapter and trainable params applied; and its tokenizer.
fn load_for_eval(args: &ModelArgs) -> Result<(ir::Graph, Tokenizer)> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("starting the worker threads")?;
    }
    let mut graph = model::load(&args.model)?;
    if !graph.op_histogram().contains_key("Attention") {
        passes::Pipeline::from_names("raise")?
            .run(&mut graph, &passes::RunOptions::default(), |_, _| {})
            .with_context(|| {
                format!(
                    "raising {} to LLaMA ops (evaluation needs them)",
                    args.model.display()
                )
            })?;
    }
    if let Some(dir) = &args.adapter {
        let adapter = hf::peft::load_adapter(dir)?;
        hf::peft::apply_adapter(&mut graph, &adapter)
            .with_context(|| format!("applying the adapter {}", dir.display()))?;
    }
    if let Some(file) = &args.trainable {
        hf::peft::load_trainable(&mut graph, file)?;
    }
    let vocab = vocab_size(&graph).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot tell the vocabulary size of {} (no logits output of known shape)",
            args.model.display()
        )
    })?;
    let dir = args.model.is_dir().then_some(args.model.as_path());
    let tokenizer = Tokenizer::for_model(dir, vocab, dir.and_then(config_eos))?;
    Ok((graph, tokenizer))
}

/// The last dimension of the logits output.
fn vocab_size(graph: &ir::Graph) -> Option<usize> {
    let v = graph
        .outputs
        .iter()
        .find(|(n, _)| n == "logits")
        .or(graph.outputs.first())?
        .1;
    match graph.value_type(v)?.shape.as_ref()?.last()? {
        ir::Dim::Fixed(n) => Some(*n as usize),
        ir::Dim::Sym(_) => None,
    }
}

/// `eos_token_id` from a Hugging Face config.json (the first of a list).
fn config_eos(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    let eos = cfg.get("eos_token_id")?;
    let id = eos.as_u64().or_else(|| eos.as_array()?.first()?.as_u64())?;
    u32::try_from(id).ok()
}

#[allow(clippy::too_many_arguments)]
fn eval_ppl(
    args: &ModelArgs,
    data: &Path,
    ctxs: &[usize],
    stride: Option<usize>,
    max_windows: Option<usize>,
    attention: AttentionArg,
    json: bool,
    plot: Option<&Path>,
) -> Result<ExitCode> {
    if let Some(bad) = ctxs.iter().find(|&&c| c < 2) {
        bail!("--ctx {bad}: a context must hold at least 2 tokens");
    }
    if stride == Some(0) {
        bail!("--stride must be at least 1 token");
    }
    if max_windows == Some(0) {
        bail!("--max-windows must be at least 1");
    }
    let (mut graph, tokenizer) = load_for_eval(args)?;
    if attention == AttentionArg::S2 {
        let mut s2 = passes::Pipeline::from_names("s2attn")?;
        s2.set("s2attn.group_fraction=0.25")?;
        s2.run(&mut graph, &passes::RunOptions::default(), |_, _| {})?;
    }
    let tokens = eval::load_eval_tokens(data, &tokenizer)
        .with_context(|| format!("reading the evaluation data {}", data.display()))?;
    eprintln!("{} tokens from {}", tokens.len(), data.display());
    let mut results = Vec::with_capacity(ctxs.len());
    for &ctx in ctxs {
        let start = std::time::Instant::now();
        let r = eval::perplexity(&graph, &tokens, ctx, stride.unwrap_or(ctx), max_windows)
            .with_context(|| format!("perplexity at context {ctx}"))?;
        eprintln!(
            "ctx {ctx}: {} windows in {:.2} s",
            r.windows,
            start.elapsed().as_secs_f64()
        );
        results.push(r);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!(
            "{:>8}  {:>8}  {:>10}  {:>12}  {:>12}",
            "ctx", "windows", "tokens", "ppl", "ppl (tokens)"
        );
        for r in &results {
            println!(
                "{:>8}  {:>8}  {:>10}  {:>12.4}  {:>12.4}",
                r.ctx, r.windows, r.tokens, r.ppl, r.ppl_token_weighted
            );
        }
    }
    if let Some(file) = plot {
        let title = format!(
            "{} ({} attention)",
            args.model.display(),
            match attention {
                AttentionArg::Full => "full",
                AttentionArg::S2 => "S²",
            }
        );
        eval::plot_ppl_svg(&results, file, &title)?;
        eprintln!("wrote {}", file.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_passkey(
    args: &ModelArgs,
    lengths: &[usize],
    trials: usize,
    seed: u64,
    json: bool,
) -> Result<ExitCode> {
    if trials == 0 {
        bail!("--trials must be at least 1");
    }
    let (graph, tokenizer) = load_for_eval(args)?;
    let results =
        lcc::train::passkey::passkey_retrieval(&graph, &tokenizer, lengths, trials, seed, |r| {
            eprintln!("length {}: {}/{} correct", r.length, r.correct, r.trials)
        })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!(
            "{:>8}  {:>7}  {:>7}  {:>9}  {:>13}",
            "length", "trials", "correct", "accuracy", "prompt tokens"
        );
        for r in &results {
            println!(
                "{:>8}  {:>7}  {:>7}  {:>9.3}  {:>13.1}",
                r.length, r.trials, r.correct, r.accuracy, r.mean_prompt_tokens
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn generate(
    args: &ModelArgs,
    prompt: &str,
    max_new: usize,
    sampling: &lcc::train::generate::Sampling,
) -> Result<ExitCode> {
    let (graph, tokenizer) = load_for_eval(args)?;
    let ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        bail!("--prompt is empty; give some text to continue");
    }
    let start = std::time::Instant::now();
    let out = lcc::train::generate::generate(&graph, &ids, max_new, sampling, tokenizer.eos_id())?;
    let secs = start.elapsed().as_secs_f64();
    println!("{}", tokenizer.decode(&out));
    eprintln!(
        "generated {} tokens after a {}-token prompt in {:.2} s ({:.1} tokens/s)",
        out.len(),
        ids.len(),
        secs,
        out.len() as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}
