"""Test double of ``ais_bench.infer.interface.InferSession`` (ais_bench 0.0.2).

Written from ais_bench's documented interface (API_GUIDE.md of ``ais-bench_workload/tool/ais_bench``
in Ascend's tools repository, and the behaviour of its ``aclruntime`` backend described there), not
copied from it, and backed by ONNX Runtime on the ONNX model inside a test-double ``.om`` (written by
the ATC double, ``tests/doubles/bin/atc``). It holds a caller to the contract more strictly than the
real session, so an adapter that passes here does not rely on anything the NPU would refuse:

* ``InferSession(device_id, model_path, acl_json_path=None, debug=False, loop=1)``: ``device_id``
  an int naming one of the NPUs this process may see (``ASCEND_RT_VISIBLE_DEVICES`` as it was when
  this module was imported, counted as the runtime counts it, else ``ASCEND_DOUBLE_NPUS`` devices,
  default 8; a variable changed after the import is refused: the runtime reads it once);
  ``model_path`` an existing regular ``.om`` that is not a symlink, not writable by group or
  others, owned by the user or one of their groups, its path of ``[A-Za-z0-9_./-]`` (``ValueError``
  otherwise, as 0.0.2's path check raises); ``loop`` executions per ``infer`` (1..100000).
* ``get_inputs()`` / ``get_outputs()``: ``tensor_desc`` objects (``name``, ``datatype``, ``format``
  0 = NCHW, ``shape``, ``size``, ``realsize``). A dynamic-batch model shows -1 as its batch and
  ``size`` in bytes at the largest gear; the hidden gear-index input is not listed.
* ``infer(feeds, mode="static", custom_sizes=100000, out_array=True)``: ``feeds`` a list, one
  C-contiguous float32 numpy array per model input, of the compiled shape. ``static``: only for a
  static model, the batch it was compiled for. ``dymbatch``: only for a dynamic-batch model, the
  batch must be one of its gears (aclruntime does not pad or pick a gear: "the dymBatch parameter
  is not correct"). Returns a list, one host numpy array per model output, its batch the gear's.
  Errors are ``RuntimeError``, as aclruntime raises them. ``out_array=False`` (device tensors) is
  not doubled. Stricter than 0.0.2 on one point: a non-contiguous array is refused (0.0.2 copies
  it), so an adapter that passes here never pays for a hidden copy.
* ``summary().exec_time_list``: one ``(start_ms, end_ms)`` pair per model execution, measured from
  the session's creation (the 0.0.2 format; older versions listed durations in ms);
  ``reset_summaryinfo()`` clears it.
* ``free_resource()`` releases the session (later calls fail); ``InferSession.finalize()`` is a
  class method ending the process's ACL use. There is no ``free_device()`` in any version.

Every session and every ``infer`` is appended as a JSON line to ``$AIS_BENCH_DOUBLE_LOG`` when set,
with the process id and the physical NPU, so tests can see pinning and gear selection.
"""
from __future__ import annotations

import enum
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import om_format  # noqa: E402  (tests/doubles/om_format.py)

_MODES = ("static", "dymbatch", "dymhw", "dymdims", "dymshape")
#: the runtime reads the visibility variable once, when it starts
_VISIBLE_AT_IMPORT = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")


class dtype(enum.Enum):  # noqa: N801  (aclruntime's name)
    float32 = 0
    float16 = 1
    int32 = 3
    uint8 = 4


class tensor_desc:  # noqa: N801
    def __init__(self, name: str, datatype: dtype, shape: list[int], size: int, realsize: int):
        self.name, self.datatype, self.format, self.shape = name, datatype, 0, list(shape)
        self.size, self.realsize = size, realsize


class _Summary:
    def __init__(self, exec_time_list):
        self.exec_time_list = list(exec_time_list)


def _log(event: dict) -> None:
    path = os.environ.get("AIS_BENCH_DOUBLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")


def _visible() -> list[str]:
    v = _VISIBLE_AT_IMPORT
    if os.environ.get("ASCEND_RT_VISIBLE_DEVICES") != v:
        raise RuntimeError(f"ASCEND_RT_VISIBLE_DEVICES changed after ais_bench was imported ({v!r} -> "
                           f"{os.environ.get('ASCEND_RT_VISIBLE_DEVICES')!r}); pin the process before importing it")
    if v is None:
        return [str(i) for i in range(int(os.environ.get("ASCEND_DOUBLE_NPUS", "8")))]
    return [x.strip() for x in v.split(",") if x.strip()]


def _check_path(path) -> None:
    """0.0.2's model path check (``check_model_path_legality``): ValueError, as it raises."""
    import re
    import stat

    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z0-9_./-]+", path):
        raise ValueError(f"The path:{path!r} is illegal. Please check the error log")
    if os.path.islink(path):
        raise ValueError(f"The path:{path} is a soft link")
    if not path.endswith(".om") or not os.path.isfile(path):
        raise ValueError(f"The path:{path} is not an existing .om file")
    st = os.stat(path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"The path:{path} is writable by group or others")
    if st.st_uid != os.geteuid() and st.st_gid not in os.getgroups() and st.st_gid != os.getegid():
        raise ValueError(f"The path:{path} is owned by neither the user nor a group of the user")


class InferSession:
    def __init__(self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False,
                 loop: int = 1):
        import onnxruntime as ort

        if not isinstance(device_id, int) or isinstance(device_id, bool) or not 0 <= device_id <= 255:
            raise RuntimeError(f"device id {device_id!r} is invalid")
        visible = _visible()
        if device_id >= len(visible):
            raise RuntimeError(f"aclrtSetDevice failed: device {device_id} does not exist "
                               f"({len(visible)} visible: ASCEND_RT_VISIBLE_DEVICES={os.environ.get('ASCEND_RT_VISIBLE_DEVICES')})")
        _check_path(model_path)
        if not isinstance(loop, int) or not 1 <= loop <= 100000:
            raise RuntimeError(f"loop {loop!r} must be in [1, 100000]")
        try:
            self._header, onnx_bytes = om_format.read(model_path)
        except ValueError as e:
            raise RuntimeError(f"aclmdlLoadFromFile failed: {e}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        self._ort = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.device_id, self.model_path, self.loop = device_id, model_path, loop
        self._physical = visible[device_id]
        self._zero = time.perf_counter()
        self._times: list[tuple[float, float]] = []
        self._batch: int | None = None  # set_dynamic_batchsize
        self._freed = False
        self._ort_out = self._ort.get_outputs()
        _log({"event": "session", "device_id": device_id, "physical": self._physical,
              "visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"), "visible_at_import": _VISIBLE_AT_IMPORT,
              "model": model_path,
              "shape": self._header["shape"], "gears": self._header.get("gears")})

    # -- what the model was compiled for
    @property
    def _dynamic(self) -> bool:
        return self._header["shape"][0] < 0

    def _shape_at(self, batch: int) -> list[int]:
        return [batch, *self._header["shape"][1:]]

    def _max_batch(self) -> int:
        return max(self._header["gears"]) if self._dynamic else self._header["shape"][0]

    def _alive(self) -> None:
        if self._freed:
            raise RuntimeError("the session's resources were freed (free_resource)")

    def get_inputs(self) -> list[tensor_desc]:
        self._alive()
        size = int(np.prod(self._shape_at(self._max_batch()))) * 4
        real = int(np.prod(self._shape_at(self._batch))) * 4 if self._dynamic and self._batch else size
        return [tensor_desc(self._header["input"], dtype.float32, self._header["shape"], size, real)]

    def get_outputs(self) -> list[tensor_desc]:
        self._alive()
        descs = []
        for o in self._ort_out:
            shape = [self._header["shape"][0], *o.shape[1:]]
            size = int(np.prod([self._max_batch(), *o.shape[1:]])) * 4
            descs.append(tensor_desc(o.name, dtype.float32, shape, size, size))
        return descs

    def get_max_dym_batchsize(self) -> int:
        self._alive()
        if not self._dynamic:
            raise RuntimeError("not a dymbatch model")
        return max(self._header["gears"])

    def set_dynamic_batchsize(self, batch: int) -> None:
        self._alive()
        if not self._dynamic:
            raise RuntimeError("not a dymbatch model!")
        if not isinstance(batch, (int, np.integer)) or batch <= 0 or batch > 4096:
            raise RuntimeError(f"dymbatch {batch!r} out of range")
        if int(batch) not in self._header["gears"]:
            raise RuntimeError("the dymBatch parameter is not correct; model has dynamic batch size:{"
                               + "".join(f"[{g}]" for g in self._header["gears"])
                               + "}, please set correct dynamic batch size")
        self._batch = int(batch)

    def set_staticbatch(self) -> None:
        self._alive()
        self._batch = None

    def infer(self, feeds, mode: str = "static", custom_sizes=100000, out_array: bool = True):
        self._alive()
        if not isinstance(feeds, list) or not feeds:
            raise RuntimeError(f"feeds must be a non-empty list, not {type(feeds).__name__}")
        if mode not in _MODES:
            raise RuntimeError(f'wrong infer_mode:{mode}, only support "static","dymbatch","dymhw","dymdims","dymshape"')
        if out_array is not True:
            raise RuntimeError("test double: out_array=False (device tensors) is not doubled")
        if len(feeds) != 1:
            raise RuntimeError(f"input datas and intensors nums not matched! ({len(feeds)} feeds, 1 input)")
        feed = feeds[0]
        if not isinstance(feed, np.ndarray):
            raise RuntimeError(f"type:{type(feed)} invalid")
        if feed.dtype != np.float32:
            raise RuntimeError(f"input dtype {feed.dtype} is not the model's float32")
        if not feed.flags.c_contiguous:
            raise RuntimeError("input is not C-contiguous")
        if feed.ndim != len(self._header["shape"]) or list(feed.shape[1:]) != self._header["shape"][1:]:
            raise RuntimeError(f"input shape {list(feed.shape)} does not match the model's {self._header['shape']}")
        if mode == "static":
            if self._dynamic:
                raise RuntimeError("static mode on a dymbatch model: in size "
                                   f"{feed.nbytes} needsize {self.get_inputs()[0].size} not match")
            if feed.shape[0] != self._header["shape"][0]:
                raise RuntimeError(f"check i:0 name:{self._header['input']} in size:{feed.nbytes} "
                                   f"needsize:{self.get_inputs()[0].size} not match")
        elif mode == "dymbatch":
            self.set_dynamic_batchsize(int(feed.shape[0]))
        else:
            raise RuntimeError(f"mode {mode} does not fit this model (compiled with a static shape or batch gears)")
        outs = None
        for _ in range(self.loop):
            t0 = time.perf_counter()
            outs = self._ort.run(None, {self._ort.get_inputs()[0].name: feed})
            t1 = time.perf_counter()
            self._times.append(((t0 - self._zero) * 1e3, (t1 - self._zero) * 1e3))
        _log({"event": "infer", "physical": self._physical, "mode": mode, "batch": int(feed.shape[0])})
        return [np.ascontiguousarray(o, dtype=np.float32) for o in outs]

    def summary(self) -> _Summary:
        self._alive()
        return _Summary(self._times)

    def reset_summaryinfo(self) -> None:
        self._alive()
        self._times.clear()

    def free_resource(self) -> None:
        if not self._freed:
            self._freed = True
            self._ort = None
            _log({"event": "free_resource", "physical": self._physical})

    @staticmethod
    def finalize() -> None:
        _log({"event": "finalize"})
