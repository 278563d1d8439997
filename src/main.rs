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
    /// Refuse, with exit 2, any allocation that would take lcc's heap past
    /// this size (e.g. 8G, 512M). Without it, allocations are checked against
    /// the memory the machine has available.
    #[arg(long, global = true, value_parser = lcc::memory::parse_size, value_name = "SIZE")]
    max_memory: Option<u64>,
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
        /// Print the memory plan of one step instead: a training step (weights,
        /// trainable copies, gradients, optimizer state, activations) when the
        /// graph has trainable weights (autodiff is applied if the passes did
        /// not), else a forward; planned from the inferred types at --seq-len.
        #[arg(long, conflicts_with_all = ["print", "cost"], requires = "seq_len")]
        memory: bool,
        /// Sequence length for --cost and --memory.
        #[arg(long)]
        seq_len: Option<usize>,
        /// Batch size for --cost and --memory.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Passes to apply first (e.g. pi,s2attn,lora,trainable), for the
        /// summary, --print and --cost alike.
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
        /// dtype of activations and outputs: f32 whatever the weights are
        /// stored in, or bf16/f16 to reproduce a half-precision forward
        /// (transformers in bf16).
        #[arg(long, value_enum, default_value_t = ComputeDTypeArg::F32)]
        compute_dtype: ComputeDTypeArg,
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
    /// a base model and write the merged model. With --run, LongLoRA's release
    /// step: the run's position interpolation, adapter and trainable weights,
    /// with rope_scaling and max_position_embeddings in config.json.
    Merge {
        /// The base model (.onnx or Hugging Face directory).
        model: PathBuf,
        /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long, required_unless_present = "run")]
        adapter: Option<PathBuf>,
        /// LongLoRA's trainable_params.safetensors (embedding and norms).
        #[arg(long)]
        trainable: Option<PathBuf>,
        /// A `run-train --out` directory trained from MODEL: merges its
        /// adapter/ and trainable_params.safetensors and applies its position
        /// interpolation (from run.yaml).
        #[arg(long, conflicts_with_all = ["adapter", "trainable"])]
        run: Option<PathBuf>,
        /// Do not raise a torch ONNX export to LLaMA-level ops (merging then
        /// fails on one).
        #[arg(long)]
        no_raise: bool,
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
    /// Fine-tune a model on the CPU (LongLoRA: --pipeline longlora-train).
    /// Writes OUT/adapter (PEFT), OUT/trainable_params.safetensors (or
    /// OUT/model for full fine-tuning), metrics.jsonl, loss.svg,
    /// checkpoints/step-N and run.yaml. With no arguments at all, runs the
    /// bundled demo: extends models/tiny from 256 to 1024 tokens and prints
    /// perplexities before and after.
    #[command(name = "run-train")]
    RunTrain(Box<RunTrainArgs>),
    /// Benchmark one training step (forward, backward, AdamW) of a randomly
    /// initialised model: batch 1, LoRA r=8 on q,k,v,o; prints a table
    /// (median step time, tokens/s, peak RSS).
    Bench {
        /// A LLaMA config.json (the model is initialised randomly).
        #[arg(long)]
        config: PathBuf,
        /// Sequence lengths, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        seq_len: Vec<usize>,
        /// Rows per step.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Attention: full, s2 (group = seq/4), or both.
        #[arg(long, default_value = "full")]
        attention: String,
        /// Also train the embedding and norms (LongLoRA's LoRA+).
        #[arg(long)]
        train_embed_norm: bool,
        /// Timed steps (median reported).
        #[arg(long, default_value_t = 25)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Worker threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// After each row, print the time per step spent in each op kind
        /// (and the optimizer).
        #[arg(long)]
        profile: bool,
        /// Run the `fuse` pass on the training graph after autodiff (merged
        /// q/k/v and gate/up GEMMs, fused elementwise chains).
        #[arg(long)]
        fuse: bool,
    },
    /// Write a randomly initialised model (a Hugging Face dir) from a
    /// config.json, for pretraining and benchmarks.
    Init {
        /// A LLaMA config.json.
        #[arg(long)]
        config: PathBuf,
        /// Seed of the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight dtype: f32, bf16 or f16 [default: the config's].
        #[arg(long)]
        dtype: Option<String>,
        /// The directory to write.
        #[arg(short, long)]
        output: PathBuf,
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
    /// A `run-train --out` directory: applies the run's position
    /// interpolation to MODEL (the base it trained from) and loads the run's
    /// adapter/ and trainable_params.safetensors.
    #[arg(long, conflicts_with_all = ["adapter", "trainable"])]
    run: Option<PathBuf>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Do not raise a torch ONNX export to LLaMA-level ops (evaluation then
    /// fails on one).
    #[arg(long)]
    no_raise: bool,
    /// dtype of activations: f32 whatever the weights are stored in, or
    /// bf16/f16 to reproduce a half-precision forward (transformers in bf16).
    #[arg(long, value_enum, default_value_t = ComputeDTypeArg::F32)]
    compute_dtype: ComputeDTypeArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ComputeDTypeArg {
    F32,
    Bf16,
    F16,
}

impl ComputeDTypeArg {
    fn compute(self) -> runtime::ComputeDType {
        let d = match self {
            ComputeDTypeArg::F32 => ir::DType::F32,
            ComputeDTypeArg::Bf16 => ir::DType::BF16,
            ComputeDTypeArg::F16 => ir::DType::F16,
        };
        runtime::ComputeDType::new(d).expect("a floating dtype")
    }
}

/// `lcc run-train` options. Every option can also come from `--config
/// train.yaml` (same names with underscores); the command line wins.
#[derive(clap::Args, Default)]
struct RunTrainArgs {
    /// A YAML file with any of these options (keys as in OUT/run.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The base model: a Hugging Face dir or an .onnx file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A pipeline recipe: a YAML path or a built-in name (longlora-train,
    /// lora-train, …).
    #[arg(long, conflicts_with = "passes")]
    pipeline: Option<String>,
    /// Passes by name instead of a recipe (e.g. pi,s2attn,lora,trainable).
    #[arg(long)]
    passes: Option<String>,
    /// Override a pass option: PASS.OPTION=VALUE (VALUE is YAML), repeatable.
    #[arg(long = "set", value_name = "PASS.OPTION=VALUE")]
    set: Vec<String>,
    /// Training data, repeatable: text files or directories of .txt, .bin
    /// token files, or a .safetensors file with `input_ids` [rows, seq]
    /// used exactly as given.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Validation data (same kinds) [default: hold out --valid-fraction of
    /// the training rows].
    #[arg(long)]
    valid_data: Vec<PathBuf>,
    /// Fraction of training rows held out when no --valid-data [default: 0.01].
    #[arg(long)]
    valid_fraction: Option<f64>,
    /// Bits per token in .bin files: 16 or 32 [default: 16].
    #[arg(long)]
    token_bits: Option<u32>,
    /// Training sequence length (tokens per row).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Rows per micro-batch [default: 1].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate [default: 2e-5, LongLoRA's].
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warmup steps [default: 20, LongLoRA's].
    #[arg(long)]
    warmup: Option<u64>,
    /// Learning-rate schedule after warmup: constant (LongLoRA's), cosine,
    /// linear [default: constant].
    #[arg(long)]
    schedule: Option<String>,
    /// adamw or sgd [default: adamw].
    #[arg(long)]
    optimizer: Option<String>,
    /// AdamW β1 [default: 0.9].
    #[arg(long)]
    beta1: Option<f64>,
    /// AdamW β2 [default: 0.95, the LongLoRA paper's value; its released
    /// code used 0.999].
    #[arg(long)]
    beta2: Option<f64>,
    /// AdamW ε [default: 1e-8].
    #[arg(long)]
    eps: Option<f64>,
    /// Decoupled weight decay [default: 0].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// SGD momentum [default: 0].
    #[arg(long)]
    momentum: Option<f64>,
    /// Clip the global gradient norm to this; 0 = off [default: 1.0].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Start from this PEFT adapter (its rank, alpha and targets replace
    /// the lora pass's).
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Start from these trainable weights (LongLoRA's trainable_params.safetensors).
    #[arg(long)]
    init_trainable: Option<PathBuf>,
    /// Seed of LoRA init, shuffling and held-out rows [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Write a checkpoint every N steps; 0 = only at the end [default: 0].
    #[arg(long)]
    save_every: Option<u64>,
    /// Checkpoints to keep; 0 = all [default: 2].
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// Validation loss every N steps; 0 = only at the end [default: 0].
    #[arg(long)]
    eval_every: Option<u64>,
    /// Validation batches per evaluation; 0 = all rows [default: 8].
    #[arg(long)]
    eval_batches: Option<usize>,
    /// cpu or cuda [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// dtype of activations: f32 whatever the weights are stored in, or
    /// bf16/f16 (frozen weights rounded to it) [default: f32].
    #[arg(long)]
    compute_dtype: Option<String>,
    /// Output directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its newest intact checkpoint. The
    /// options that shape the run (model, pipeline, data, sequence length,
    /// batch, optimizer, seed, …) must be the run's own.
    #[arg(long)]
    resume: bool,
    /// With --resume: continue from this checkpoint (step-N) instead; newer
    /// ones are moved aside (kept, hidden).
    #[arg(long, value_name = "step-N", requires = "resume")]
    resume_from: Option<String>,
    /// Replace the run already in --out (its checkpoints, metrics and
    /// outputs; other files stay).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// dtype of a fully fine-tuned model in OUT/model: f32, bf16, f16
    /// [default: the base model's].
    #[arg(long)]
    save_dtype: Option<String>,
    /// Log line every N steps when stdout is not a terminal [default: 10].
    #[arg(long)]
    log_every: Option<u64>,
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
    /// Do not raise a torch ONNX export to LLaMA-level ops before a pass
    /// that needs them (pi, s2attn, lora, trainable, merge-lora, autodiff):
    /// such a pass then fails.
    #[arg(long)]
    no_raise: bool,
}

impl PipelineArgs {
    fn spec(&self) -> passes::PipelineSpec {
        passes::PipelineSpec {
            recipe: self
                .pipeline
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            passes: self.passes.clone(),
            set: self.set.clone(),
        }
    }

    /// The pipeline, which must be named.
    fn build(&self) -> Result<passes::Pipeline> {
        match self.spec().build()? {
            Some(p) => Ok(p),
            None => bail!("name the passes to run: --passes pi,s2attn,lora or --pipeline RECIPE"),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ExternalDataArg {
    /// Only when the weights exceed protobuf's 2 GB limit.
    Auto,
    Always,
    Never,
}

#[global_allocator]
static ALLOC: lcc::memory::CountingAlloc = lcc::memory::CountingAlloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    lcc::memory::set_limit(cli.max_memory);
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
            memory,
            seq_len,
            batch,
            pipeline,
        } => {
            if memory {
                inspect_memory(&model, seq_len.unwrap_or(0), batch, &pipeline, json)
            } else if cost {
                inspect_cost(&model, seq_len.unwrap_or(0), batch, &pipeline, json)
            } else {
                inspect(&model, print, json, &pipeline)
            }
        }
        Command::Exec {
            model,
            inputs,
            output,
            threads,
            compute_dtype,
        } => exec(&model, &inputs, &output, threads, compute_dtype.compute()),
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
            run,
            no_raise,
            output,
            external_data,
        } => {
            use lcc::merge::MergeSource;
            let source = match (&run, &adapter) {
                (Some(run), _) => Some(MergeSource::Run(run)),
                (None, Some(adapter)) => Some(MergeSource::Adapter {
                    adapter,
                    trainable: trainable.as_deref(),
                }),
                (None, None) => None,
            };
            let graph = lcc::merge::merge_into(&model, source, no_raise, &mut print_note)?;
            let merged = run
                .as_ref()
                .or(adapter.as_ref())
                .map_or(String::new(), |p| p.display().to_string());
            let format = model::save(&graph, &output, &export_options(external_data))
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "merged {merged} into {}; wrote {} ({})",
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
        Command::RunTrain(args) => run_train(*args),
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
        Command::Bench {
            config,
            seq_len,
            batch,
            attention,
            train_embed_norm,
            steps,
            warmup,
            threads,
            json,
            profile,
            fuse,
        } => bench(
            &config,
            &seq_len,
            batch,
            &attention,
            train_embed_norm,
            steps,
            warmup,
            threads,
            json,
            profile,
            fuse,
        ),
        Command::Init {
            config,
            seed,
            dtype,
            output,
        } => {
            let dtype = match dtype.as_deref() {
                None => None,
                Some("f32" | "float32") => Some(ir::DType::F32),
                Some("bf16" | "bfloat16") => Some(ir::DType::BF16),
                Some("f16" | "float16") => Some(ir::DType::F16),
                Some(other) => bail!("--dtype {other}: expected f32, bf16 or f16"),
            };
            let graph = lcc::train::init::init_model(&config, seed, dtype)?;
            hf::save(&graph, &output).with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "wrote {} ({} parameters, seed {seed})",
                output.display(),
                lcc::util::group_digits(graph.weights.num_params())
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn inspect(path: &Path, print: bool, json: bool, pipeline: &PipelineArgs) -> Result<ExitCode> {
    let format = model::detect(path)?;
    let graph = load_rewritten(path, pipeline)?;
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

/// Loads a model and applies `--passes`/`--pipeline` when given.
fn load_rewritten(path: &Path, pipeline: &PipelineArgs) -> Result<ir::Graph> {
    Ok(model::load_rewritten(
        path,
        &pipeline.spec(),
        pipeline.no_raise,
        &mut print_note,
    )?)
}

fn inspect_memory(
    path: &Path,
    seq_len: usize,
    batch: usize,
    pipeline: &PipelineArgs,
    json: bool,
) -> Result<ExitCode> {
    if seq_len == 0 || batch == 0 {
        bail!("--seq-len and --batch must be at least 1");
    }
    let process = lcc::memory::resident_bytes();
    let graph = load_rewritten(path, pipeline)?;
    let (training, m) = model::step_memory(graph, batch, seq_len, process)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!(
            "{} step on the CPU backend (AdamW){}",
            if training { "training" } else { "forward" },
            if training {
                ""
            } else {
                ": no trainable weights"
            }
        );
        print!("{m}");
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
    let graph = load_rewritten(path, pipeline)?;
    let cost = lcc::cost::cost(&graph, seq_len, batch)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&cost)?);
    } else {
        print!("{}", lcc::cost::render(&cost));
    }
    Ok(ExitCode::SUCCESS)
}

fn exec(
    path: &Path,
    inputs: &Path,
    output: &Path,
    threads: Option<usize>,
    compute: runtime::ComputeDType,
) -> Result<ExitCode> {
    let graph = load_model(path)?;
    let tensors: HashMap<String, Tensor> = hf::read_tensors(inputs)
        .with_context(|| format!("reading inputs from {}", inputs.display()))?
        .into_iter()
        .collect();
    let start = std::time::Instant::now();
    let named = runtime::run_once(runtime::Device::Cpu, threads, &graph, &tensors, compute)?;
    let elapsed = start.elapsed();
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
    let ga = load_model(a)?;
    let gb = load_model(b)?;
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
    pipeline_args: &PipelineArgs,
    output: &Path,
    print_after: &[String],
    explain: bool,
    verify: bool,
    external: ExternalDataArg,
) -> Result<ExitCode> {
    let pipeline = pipeline_args.build()?;
    for p in print_after {
        if p != "all" && !pipeline.passes.iter().any(|s| &s.name == p) {
            bail!("--print-after {p}: pass '{p}' is not in the pipeline");
        }
    }
    let mut graph = load_model(input)?;
    let start = std::time::Instant::now();
    let mut printed = Ok(());
    let options = passes::RunOptions {
        verify,
        no_raise: pipeline_args.no_raise,
    };
    let reports = pipeline.run(&mut graph, &options, |report, g| {
        if explain {
            eprintln!("{report}");
        } else if report.automatic {
            eprintln!("{}", report.summary_line());
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
    let graph = load_model(input)?;
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

impl RunTrainArgs {
    /// True when no option at all was given (`lcc run-train` alone).
    fn is_empty(&self) -> bool {
        self.config.is_none()
            && self.model.is_none()
            && self.data.is_empty()
            && self.out.is_none()
            && self.seq_len.is_none()
            && self.steps.is_none()
            && !self.resume
            && !self.overwrite
    }

    /// Defaults, then `--config`, then the command line.
    fn resolve(self) -> Result<lcc::train::config::TrainConfig> {
        use lcc::train::config::{DeviceKind, OptimizerKind, ScheduleName, TrainConfig};
        let mut c = match &self.config {
            Some(p) => TrainConfig::from_yaml(p)?,
            None => TrainConfig::default(),
        };
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        macro_rules! take_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f; } )* };
        }
        take!(
            valid_fraction,
            token_bits,
            seq_len,
            steps,
            batch_size,
            grad_accum,
            lr,
            warmup
        );
        take!(
            beta1,
            beta2,
            eps,
            weight_decay,
            momentum,
            max_grad_norm,
            seed,
            save_every
        );
        take!(keep_checkpoints, eval_every, eval_batches, log_every);
        // A recipe on the command line replaces passes from the config file
        // and vice versa.
        if self.passes.is_some() {
            c.pipeline = None;
        }
        if self.pipeline.is_some() {
            c.passes = None;
        }
        take_opt!(
            model,
            pipeline,
            passes,
            init_adapter,
            init_trainable,
            threads,
            out,
            save_dtype
        );
        if !self.set.is_empty() {
            c.set.extend(self.set);
        }
        if !self.data.is_empty() {
            c.data = self.data;
        }
        if !self.valid_data.is_empty() {
            c.valid_data = self.valid_data;
        }
        if self.resume {
            c.resume = true;
        }
        if self.resume_from.is_some() {
            c.resume_from = self.resume_from;
        }
        if self.overwrite {
            c.overwrite = true;
        }
        if let Some(s) = self.schedule {
            c.schedule = match s.as_str() {
                "constant" => ScheduleName::Constant,
                "cosine" => ScheduleName::Cosine,
                "linear" => ScheduleName::Linear,
                other => bail!("--schedule {other}: expected constant, cosine or linear"),
            };
        }
        if let Some(s) = self.optimizer {
            c.optimizer = match s.as_str() {
                "adamw" => OptimizerKind::AdamW,
                "sgd" => OptimizerKind::Sgd,
                other => bail!("--optimizer {other}: expected adamw or sgd"),
            };
        }
        if let Some(s) = self.compute_dtype {
            c.compute_dtype = lcc::train::config::ComputeDTypeName::parse(&s)?;
        }
        if let Some(s) = self.device {
            c.device = match s.as_str() {
                "cpu" => DeviceKind::Cpu,
                "cuda" => DeviceKind::Cuda,
                other => bail!("--device {other}: expected cpu or cuda"),
            };
        }
        Ok(c)
    }
}

fn run_train(args: RunTrainArgs) -> Result<ExitCode> {
    use lcc::train::trainer::{Finish, Trainer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    if args.is_empty() {
        return lcc::train::demo::run_demo(&mut std::io::stdout())
            .map(|_| ExitCode::SUCCESS)
            .map_err(Into::into);
    }
    let cfg = args.resolve()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is written kills the process
        // the usual way (the checkpoint is renamed into place atomically).
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted: writing a checkpoint after this step (Ctrl-C again to abort)"
            );
        });
    }
    let mut trainer = Trainer::new(cfg)?;
    let summary = lcc::train::progress::train_with_progress(&mut trainer, &stop)?;
    match summary.finish {
        Finish::Completed => Ok(ExitCode::SUCCESS),
        Finish::Interrupted { .. } => Ok(ExitCode::from(130)),
    }
}

#[allow(clippy::too_many_arguments)]
fn bench(
    config: &Path,
    seq_lens: &[usize],
    batch: usize,
    attention: &str,
    train_embed_norm: bool,
    steps: usize,
    warmup: usize,
    threads: Option<usize>,
    json: bool,
    profile: bool,
    fuse: bool,
) -> Result<ExitCode> {
    use lcc::train::bench::{bench_train_step, BenchOptions};
    let patterns: &[bool] = match attention {
        "full" => &[false],
        "s2" => &[true],
        "both" => &[false, true],
        other => bail!("--attention {other}: expected full, s2 or both"),
    };
    if !json {
        println!(
            "{:>7} {:>5} {:<16} {:>6} {:>11} {:>9} {:>11} {:>10}",
            "seq", "batch", "attention", "steps", "median ms", "min ms", "tokens/s", "peak RSS"
        );
    }
    let base = BenchOptions {
        seq_len: 0,
        batch,
        s2_group: None,
        train_embed_norm,
        warmup_steps: warmup,
        steps,
        threads,
        seed: 0,
        fuse,
    };
    for opts in BenchOptions::grid(&base, seq_lens, patterns) {
        let r = bench_train_step(config, &opts)?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:>7} {:>5} {:<16} {:>6} {:>11.1} {:>9.1} {:>11.0} {:>10}",
                r.seq_len,
                r.batch,
                r.attention,
                r.steps,
                r.median_ms,
                r.min_ms,
                r.tokens_per_s,
                r.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0} MB"))
            );
        }
        if profile && !json {
            println!(
                "        output buffers per step: {} reused, {} allocated",
                r.buffers_reused, r.buffers_allocated
            );
            let total: f64 = r.profile.iter().map(|p| p.2).sum();
            println!(
                "        {:<20} {:>7} {:>9} {:>6}",
                "op", "nodes", "ms/step", "%"
            );
            for (op, n, ms) in &r.profile {
                println!(
                    "        {op:<20} {n:>7} {ms:>9.2} {:>5.1}%",
                    100.0 * ms / total.max(1e-12)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets up `--threads` and loads the model for evaluation
/// ([`lcc::train::eval::load_for_eval`]), printing its notes on stderr.
fn load_for_eval(args: &ModelArgs) -> Result<(ir::Graph, Tokenizer)> {
    if let Some(n) = args.threads {
        lcc::util::init_global_threads(n)?;
    }
    let m = lcc::train::eval::EvalModel {
        model: &args.model,
        run: args.run.as_deref(),
        adapter: args.adapter.as_deref(),
        trainable: args.trainable.as_deref(),
        no_raise: args.no_raise,
    };
    Ok(lcc::train::eval::load_for_eval(&m, &mut print_note)?)
}

/// Notes and warnings of the library go to stderr, a line each.
fn print_note(line: &str) {
    eprintln!("{line}");
}

/// Loads a model, warning on stderr about tensors its config does not use.
fn load_model(path: &Path) -> lcc::Result<ir::Graph> {
    model::load_noting(path, &mut print_note)
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
        eval::use_shifted_sparse_attention(&mut graph)?;
    }
    let tokens = eval::load_eval_tokens(data, &tokenizer)
        .with_context(|| format!("reading the evaluation data {}", data.display()))?;
    eprintln!("{} tokens from {}", tokens.len(), data.display());
    let results = eval::perplexity_at_contexts(
        &graph,
        &tokens,
        ctxs,
        stride,
        max_windows,
        args.compute_dtype.compute(),
        &mut |r, took| {
            eprintln!(
                "ctx {}: {} windows in {:.2} s",
                r.ctx,
                r.windows,
                took.as_secs_f64()
            )
        },
    )?;
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
    let results = lcc::train::passkey::passkey_retrieval(
        &graph,
        &tokenizer,
        lengths,
        trials,
        seed,
        args.compute_dtype.compute(),
        |r| eprintln!("length {}: {}/{} correct", r.length, r.correct, r.trials),
    )?;
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
    let out = lcc::train::generate::generate(
        &graph,
        &ids,
        max_new,
        sampling,
        tokenizer.eos_id(),
        args.compute_dtype.compute(),
    )?;
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
