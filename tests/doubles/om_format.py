"""The file format of the test doubles' "offline models": what the ATC double writes and the
ais_bench double loads. A real .om is compiled for an NPU; this one carries the ONNX model ATC was
given, behind a header with what ATC was told (input shape, gears, chip), so the ais_bench double
can run it with ONNX Runtime and hold callers to the shapes the .om was compiled for.

    NASQ-TEST-DOUBLE-OM 1\\n
    {"input": "image", "shape": [-1, 3, 331, 331], "gears": [1, 4, 8], ...}\\n
    <the ONNX model's bytes>
"""
from __future__ import annotations

import json

MAGIC = b"NASQ-TEST-DOUBLE-OM 1\n"


def write(path: str, header: dict, onnx_bytes: bytes) -> None:
    with open(path, "wb") as f:
        f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + onnx_bytes)


def read(path: str) -> tuple[dict, bytes]:
    """(header, ONNX bytes). Raises ValueError for anything else."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not an offline model (bad magic)")
    header, _, onnx_bytes = data[len(MAGIC):].partition(b"\n")
    return json.loads(header), onnx_bytes
