"""The PyTorch + PEFT reference for `lcc bench`: one training step (forward,
backward, AdamW) of a randomly initialised LLaMA with LoRA r=8 (alpha 16) on
q, k, v, o, batch 1, median over timed steps.

    python tests/bench/torch_train_step.py --config /path/config.json --seq-len 128,512

Needs torch, transformers and peft (not installed by CI; run by hand).
"""
import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--seq-len", default="128,512")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config) as f:
        cfg = LlamaConfig(**json.load(f))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'seq':>7} {'median ms':>10} {'min ms':>8}")
    for seq in [int(s) for s in args.seq_len.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (1, seq))
        times = []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times.append((time.perf_counter() - t) * 1e3)
        print(f"{seq:>7} {statistics.median(times):>10.1f} {min(times):>8.1f}")


if __name__ == "__main__":
    main()
