"""Test double of Ascend's ATC compiler (``atc``), for ONNX input (``--framework=5``) only.

Checks a command line the way ATC's documentation states it (parameters as ``--name=value``):
``--model`` an existing ONNX file; ``--input_format`` NCHW; ``--input_shape="name:n,c,h,w"`` naming
the model's input with its dimensions, where ``-1`` may stand only for the batch and only if the
ONNX model's batch is dynamic (ATC cannot make a static model dynamic), and then
``--dynamic_batch_size`` must give 2 to 100 gears, each 1 to 2048; ``--soc_version`` a chip such as
Ascend310P3; ``--output`` a path prefix in an existing folder, to which ATC appends ``.om``. Then it
writes a test-double ``.om`` (``om_format``) carrying the ONNX model and what ATC was told, for the
ais_bench double to run. Every call is appended to ``$ATC_DOUBLE_LOG`` as a JSON line when set.
"""
from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import om_format  # noqa: E402

KNOWN = {"framework", "model", "input_format", "input_shape", "output", "log", "soc_version",
         "dynamic_batch_size", "precision_mode", "out_nodes", "op_select_implmode"}


def fail(msg: str) -> int:
    print(f"ATC run failed, Please check the detail log, Try 'atc --help' for more information\n{msg}")
    return 1


def main(argv: list[str]) -> int:
    log = os.environ.get("ATC_DOUBLE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"argv": argv}) + "\n")
    opts: dict[str, str] = {}
    for a in argv:
        m = re.fullmatch(r"--([a-z_]+)=(.*)", a, re.S)
        if not m:
            return fail(f"E10001: argument {a!r} is not --name=value")
        if m.group(1) not in KNOWN:
            return fail(f"E10001: unknown parameter --{m.group(1)}")
        if m.group(1) in opts:
            return fail(f"E10001: --{m.group(1)} given twice")
        opts[m.group(1)] = m.group(2)
    for need in ("framework", "model", "output", "soc_version"):
        if need not in opts:
            return fail(f"E10004: --{need} is required")
    if opts["framework"] != "5":
        return fail(f"E10001: --framework={opts['framework']}: this double takes ONNX (5) only")
    if opts.get("input_format", "NCHW") != "NCHW":
        return fail(f"E10001: --input_format={opts['input_format']} is not NCHW")
    if opts.get("log", "null") not in ("debug", "info", "warning", "error", "null"):
        return fail(f"E10001: --log={opts['log']}")
    if not re.fullmatch(r"Ascend\d{3}[A-Za-z0-9]*", opts["soc_version"]):
        return fail(f"E10001: --soc_version={opts['soc_version']} is not a chip name such as Ascend310P3")
    model = opts["model"]
    if not model.endswith(".onnx") or not os.path.isfile(model):
        return fail(f"E10001: --model={model} is not an existing .onnx file")
    import onnx

    proto = onnx.load(model, load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return fail(f"the double handles one input, the model has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    onnx_dims = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    shape = [-1 if d is None else d for d in onnx_dims]
    if "input_shape" in opts:
        m = re.fullmatch(r"([^:;]+):(-?\d+(?:,-?\d+)*)", opts["input_shape"])
        if not m:
            return fail(f"E10001: --input_shape={opts['input_shape']} is not name:d0,d1,...")
        if m.group(1) != inputs[0].name:
            return fail(f"E10016: --input_shape names {m.group(1)!r}; the model's input is {inputs[0].name!r}")
        shape = [int(x) for x in m.group(2).split(",")]
        if len(shape) != len(onnx_dims):
            return fail(f"--input_shape has {len(shape)} dims; the model's input has {len(onnx_dims)}")
        for k, (want, have) in enumerate(zip(shape, onnx_dims)):
            if want == -1 and k != 0:
                return fail("E10001: -1 is allowed only as the batch (first) dimension with --dynamic_batch_size")
            if want == -1 and have is not None:
                return fail(f"the model's batch is fixed at {have}: a static model cannot be made dynamic")
            if want != -1 and (want <= 0 or have is not None and want != have):
                return fail(f"--input_shape dim {k} = {want}, the model has {have}")
    if any(d == -1 for d in shape[1:]):
        return fail("dynamic dimensions other than the batch need --input_shape")
    gears = None
    if shape[0] == -1:
        if "dynamic_batch_size" not in opts:
            return fail("E10001: a -1 batch needs --dynamic_batch_size")
        try:
            gears = [int(g) for g in opts["dynamic_batch_size"].split(",")]
        except ValueError:
            return fail(f"E10001: --dynamic_batch_size={opts['dynamic_batch_size']}")
        if not 2 <= len(gears) <= 100 or len(set(gears)) != len(gears) or not all(1 <= g <= 2048 for g in gears):
            return fail(f"E10001: --dynamic_batch_size={opts['dynamic_batch_size']}: 2 to 100 distinct gears, each 1-2048")
    elif "dynamic_batch_size" in opts:
        return fail("E10001: --dynamic_batch_size needs -1 as the batch in --input_shape")
    out = opts["output"]
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        return fail(f"E10001: --output={out}: no such folder")
    with open(model, "rb") as f:
        onnx_bytes = f.read()
    om_format.write(out + ".om", {"input": inputs[0].name, "shape": shape, "gears": sorted(gears) if gears else None,
                                  "soc_version": opts["soc_version"], "framework": 5}, onnx_bytes)
    print("ATC run success, welcome to the next use.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
