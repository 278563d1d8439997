"""Writes small ONNX seed models for the onnx_import fuzz target.

    /work/pyenv/bin/python fuzz/make_seeds.py fuzz/corpus/onnx_small
    RUSTC_BOOTSTRAP=1 cargo fuzz run onnx_import fuzz/corpus/onnx_small -- -max_len=4096

Covers the forms the importer distinguishes: initializers, attribute- and
input-form axes (opsets 17/18), Split num_outputs, Constant attribute kinds,
absent optional inputs, opset-23 ops, model-local functions, external data.
"""

import os
import sys

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

out = sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus/onnx_small"
os.makedirs(out, exist_ok=True)


def save(name, nodes, inits=(), opset=17, funcs=(), extra_opsets=()):
    g = h.make_graph(
        nodes,
        name,
        [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", None])],
        initializer=list(inits),
        value_info=[h.make_tensor_value_info("t", T.FLOAT, [2, "s"])],
    )
    m = h.make_model(
        g,
        opset_imports=[h.make_opsetid("", opset)] + list(extra_opsets),
        functions=list(funcs),
    )
    m.metadata_props.add(key="hf.config", value="{}")
    with open(os.path.join(out, name + ".onnx"), "wb") as f:
        f.write(m.SerializeToString())


w = nh.from_array(np.arange(4, dtype=np.float32), "w")
ax = nh.from_array(np.array([1], dtype=np.int64), "ax")
save("add", [h.make_node("Add", ["x", "w"], ["t"]), h.make_node("Softmax", ["t"], ["y"], axis=-1)], [w])
save("rm17", [h.make_node("ReduceMean", ["x"], ["t"], axes=[1], keepdims=1), h.make_node("Neg", ["t"], ["y"])])
save("rm18", [h.make_node("ReduceMean", ["x", "ax"], ["t"], keepdims=0), h.make_node("Unsqueeze", ["t", "ax"], ["y"])], [ax], opset=18)
save("split18", [h.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2), h.make_node("Concat", ["b", "a"], ["y"], axis=1)], opset=18)
save(
    "const",
    [
        h.make_node("Constant", [], ["c"], value=nh.from_array(np.ones((2,), np.float16))),
        h.make_node("Constant", [], ["d"], value_ints=[1, 2]),
        h.make_node("Cast", ["c"], ["cf"], to=T.FLOAT),
        h.make_node("Mul", ["x", "cf"], ["y"]),
    ],
)
save("slice", [h.make_node("Slice", ["x", "ax", "ax", "", "ax"], ["y"])], [ax], opset=13)
save(
    "attn23",
    [
        h.make_node("RMSNormalization", ["x", "w"], ["t"], epsilon=1e-5),
        h.make_node("Attention", ["t", "t", "t"], ["y"], is_causal=1, q_num_heads=1, kv_num_heads=1),
    ],
    [w],
    opset=23,
)
f = h.make_function(
    "custom",
    "Silu",
    ["X"],
    ["Y"],
    [h.make_node("Sigmoid", ["X"], ["s"]), h.make_node("Mul", ["X", "s"], ["Y"])],
    [h.make_opsetid("", 17)],
    attributes=["alpha"],
)
save("func", [h.make_node("Silu", ["x"], ["y"], domain="custom")], funcs=[f], extra_opsets=[h.make_opsetid("custom", 1)])
e = T()
e.name, e.data_type, e.data_location = "w", T.FLOAT, T.EXTERNAL
e.dims.extend([4])
for k, v in [("location", "w.bin"), ("offset", "0"), ("length", "16")]:
    ee = e.external_data.add()
    ee.key, ee.value = k, v
save("ext", [h.make_node("Add", ["x", "w"], ["y"])], [e])
save("gemm", [h.make_node("Gemm", ["x", "w2", "w"], ["y"], alpha=0.5, transB=1)], [w, nh.from_array(np.ones((4, 4), np.float32), "w2")])
print(f"wrote seeds to {out}")
