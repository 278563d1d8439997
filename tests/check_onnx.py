"""Cross-checks an ONNX file that lcc wrote: onnx.checker (full check), then
onnxruntime on the given inputs, compared with lcc's outputs.

usage: check_onnx.py MODEL INPUTS.safetensors EXPECTED.safetensors TOL
Reads safetensors by hand (json header + raw bytes) so that only onnx,
onnxruntime and numpy are needed.
"""
import json
import struct
import sys

import numpy as np
import onnx
import onnxruntime as ort

DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
          "F16": np.float16, "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8}


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def main():
    model, inputs, expected, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = read_safetensors(inputs)
    want = read_safetensors(expected)
    names = [o.name for o in sess.get_outputs()]
    got = sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})
    worst = 0.0
    for name, value in zip(names, got):
        diff = float(np.max(np.abs(value.astype(np.float64) - want[name].astype(np.float64))))
        worst = max(worst, diff)
        print(f"{model}: {name} max abs diff onnxruntime vs lcc = {diff:.3e}")
    if worst > tol:
        sys.exit(f"difference {worst:.3e} exceeds {tol:.1e}")


if __name__ == "__main__":
    main()
