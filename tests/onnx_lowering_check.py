"""Checks ONNX files written by lcc with onnx's checker and onnxruntime.

    python onnx_lowering_check.py lowered MODEL
        MODEL was lowered from LLaMA-level ops; its Hugging Face style config
        is in metadata_props["hf.config"]. Runs it at several batch sizes and
        sequence lengths and compares the logits with a NumPy reference
        written here from the initializers (Hugging Face names and layout).

    python onnx_lowering_check.py golden MODEL INPUTS LOGITS
        Compares MODEL's logits on INPUTS with golden LOGITS (safetensors).

Exits non-zero on any failure. Used by tests/onnx_lowering.rs.
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

TOL = 1e-4


def check_model(path):
    onnx.checker.check_model(path, full_check=True)
    print(f"checker: {path} passes full_check")


def session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


# --- NumPy reference (transformers' LlamaForCausalLM, eager attention) --------


def inv_freq(cfg, seq_len):
    dim = cfg["head_dim"]
    theta = cfg["rope_theta"]
    sc = cfg.get("rope_scaling") or {"rope_type": "default"}
    kind = sc["rope_type"]
    base = np.float32(theta)
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if kind == "default":
        return 1.0 / base**exps
    if kind == "linear":
        return (1.0 / base**exps) / np.float32(sc["factor"])
    if kind == "dynamic":
        factor = sc["factor"]
        orig = cfg["max_position_embeddings"]
        s = max(seq_len, orig)
        new_base = theta * ((factor * s / orig) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / np.float32(new_base) ** exps
    raise ValueError(kind)


def rms_norm(x, w, eps):
    var = np.mean(x * x, axis=-1, keepdims=True)
    return w * (x / np.sqrt(var + np.float32(eps)))


def rope(x, pos, heads, cfg):
    # x [b, s, heads*d]; pos [b, s]
    b, s, _ = x.shape
    d = cfg["head_dim"]
    seq_len = int(pos.max()) + 1
    inv = inv_freq(cfg, seq_len).astype(np.float32)
    freqs = pos.astype(np.float32)[..., None] * inv[None, None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, :, None, :], np.sin(emb)[:, :, None, :]
    x4 = x.reshape(b, s, heads, d)
    x1, x2 = x4[..., : d // 2], x4[..., d // 2 :]
    rot = np.concatenate([-x2, x1], axis=-1)
    return (x4 * cos + rot * sin).reshape(b, s, heads * d)


def softmax(x):
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def attention(q, k, v, cfg):
    b, s, _ = q.shape
    h, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q = q.reshape(b, s, h, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, s, kv, d).transpose(0, 2, 1, 3)
    v = v.reshape(b, s, kv, d).transpose(0, 2, 1, 3)
    k = np.repeat(k, h // kv, axis=1)
    v = np.repeat(v, h // kv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(d))
    mask = np.triu(np.full((s, s), -np.inf, dtype=np.float32), k=1)
    p = softmax(scores + mask)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, s, h * d)


def reference(W, cfg, ids, pos):
    eps = cfg["rms_norm_eps"]
    x = W["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = h @ W[p + "self_attn.q_proj.weight"].T
        k = h @ W[p + "self_attn.k_proj.weight"].T
        v = h @ W[p + "self_attn.v_proj.weight"].T
        q = rope(q, pos, cfg["num_attention_heads"], cfg)
        k = rope(k, pos, cfg["num_key_value_heads"], cfg)
        x = x + attention(q, k, v, cfg) @ W[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        silu = g / (1.0 + np.exp(-g))
        x = x + (silu * u) @ W[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, W["model.norm.weight"], eps)
    return x @ W["lm_head.weight"].T


def lowered(path):
    check_model(path)
    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    cfg = json.loads(props["hf.config"])
    W = {t.name: numpy_helper.to_array(t, base_dir=str(__import__("pathlib").Path(path).parent)) for t in model.graph.initializer}
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    rng = np.random.default_rng(0)
    worst = 0.0
    for b, s in [(2, 5), (1, 9), (3, 1), (1, 16)]:
        ids = rng.integers(0, cfg["vocab_size"], size=(b, s), dtype=np.int64)
        feeds = {"input_ids": ids}
        if "position_ids" in names:
            pos = np.tile(np.arange(3, 3 + s, dtype=np.int64), (b, 1))
            feeds["position_ids"] = pos
        else:
            pos = np.tile(np.arange(s, dtype=np.int64), (b, 1))
        (got,) = sess.run(["logits"], feeds)
        want = reference(W, cfg, ids, pos)
        assert got.shape == want.shape, (got.shape, want.shape)
        diff = float(np.abs(got - want).max())
        worst = max(worst, diff)
        print(f"batch {b} seq {s}: max abs diff {diff:.3e}")
        if not diff < TOL:
            print(f"FAIL: {path}: difference {diff} exceeds {TOL}")
            sys.exit(1)
    print(f"ok: {path}: worst max abs diff {worst:.3e}")


def golden(path, inputs, logits):
    from safetensors.numpy import load_file

    check_model(path)
    ids = load_file(inputs)["input_ids"]
    want = load_file(logits)["logits"]
    sess = session(path)
    try:
        (got,) = sess.run(["logits"], {"input_ids": ids})
    except Exception:
        # Some exports (torch's opset-23 RotaryEmbedding) run one row at a time.
        got = np.concatenate(
            [sess.run(["logits"], {"input_ids": ids[i : i + 1]})[0] for i in range(len(ids))]
        )
    diff = float(np.abs(got - want).max())
    print(f"{path}: max abs diff to golden logits {diff:.3e}")
    if not diff < TOL:
        print(f"FAIL: difference {diff} exceeds {TOL}")
        sys.exit(1)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "lowered":
        lowered(sys.argv[2])
    elif mode == "golden":
        golden(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown mode {mode}")
