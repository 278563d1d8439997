#!/usr/bin/env python3
"""Write a full-size but SPARSE LLaMA-2 Hugging Face checkpoint for scale tests.

Usage:  python3 tests/scale/make_sparse_checkpoint.py {7b,70b} OUTDIR

OUTDIR gets the real LLaMA-2 config.json and a single model.safetensors holding every
weight under its Hugging Face name, dtype F16, with a valid safetensors header
(u64 little-endian header length, JSON header with dtype/shape/data_offsets and
__metadata__ {"format": "pt"}, padded with spaces to a multiple of 8 bytes).
The data region is never written: the file is extended with truncate(), so it is a
hole that reads as zeros and takes ~no disk space (7B: ~13.5 GB apparent, 70B: ~138 GB).
Standard library only (json, struct, os, sys).
"""
import json
import os
import struct
import sys

CONFIGS = {
    # meta-llama/Llama-2-7b-hf
    "7b": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
    # meta-llama/Llama-2-70b-hf
    "70b": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "intermediate_size": 28672,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
}


def tensor_specs(cfg):
    """(name, shape) for every LLaMA weight, in Hugging Face order."""
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    v = cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", h // nh)
    specs = [("model.embed_tokens.weight", [v, h])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", [h]),
            (p + "self_attn.q_proj.weight", [nh * hd, h]),
            (p + "self_attn.k_proj.weight", [nkv * hd, h]),
            (p + "self_attn.v_proj.weight", [nkv * hd, h]),
            (p + "self_attn.o_proj.weight", [h, nh * hd]),
            (p + "post_attention_layernorm.weight", [h]),
            (p + "mlp.gate_proj.weight", [inter, h]),
            (p + "mlp.up_proj.weight", [inter, h]),
            (p + "mlp.down_proj.weight", [h, inter]),
        ]
    specs += [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
    return specs


def write_sparse_safetensors(path, specs, elem_size=2, dtype="F16"):
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * elem_size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)  # pad so the data region starts 8-byte aligned
    total = 8 + len(hjson) + offset
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        f.truncate(total)  # data region is a hole: reads as zeros, no blocks allocated
    return total, len(hjson), offset


def main(argv):
    if len(argv) != 3 or argv[1] not in CONFIGS:
        sys.stderr.write(f"usage: {argv[0]} {{{','.join(CONFIGS)}}} OUTDIR\n")
        return 2
    cfg = CONFIGS[argv[1]]
    out = argv[2]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    specs = tensor_specs(cfg)
    total, hlen, data = write_sparse_safetensors(os.path.join(out, "model.safetensors"), specs)
    params = data // 2
    print(f"{out}/model.safetensors: {len(specs)} tensors, {params} params "
          f"({params / 1e9:.2f} B), header {hlen} bytes, file {total} bytes ({total / 2**30:.2f} GiB, sparse)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
