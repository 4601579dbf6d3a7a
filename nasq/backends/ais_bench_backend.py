"""Ascend offline models (``.om``) through ais_bench's ``InferSession``.

No Ascend NPU or CANN toolkit exists where nasq is developed, so this adapter is held to ais_bench's
documented interface instead: ais_bench 0.0.2 with its ``aclruntime`` 0.0.2 backend (the wheels built
from ``ais-bench_workload/tool/ais_bench`` in Ascend's tools repository; its API_GUIDE.md), through
the test double in ``tests/doubles`` that enforces that contract (docs/ASCEND.md). What nasq relies
on, and how it uses it:

* ``InferSession(device_id, model_path, acl_json_path=None, debug=False, loop=1)`` loads the .om on
  NPU ``device_id`` of those the process sees. A worker is pinned with ``ASCEND_RT_VISIBLE_DEVICES``
  before anything loads the ACL (``workers/pinning.py``), so inside a worker the NPU is always
  ``npu:0``; a variable already set (by a scheduler) is honoured, its entries counted as the runtime
  counts them.
* ``get_inputs()[0]`` is a ``tensor_desc`` (``name``, ``datatype``, ``format``, ``shape``, ``size``,
  ``realsize``): ``shape[0]`` is the batch a static .om was compiled for, or -1 for an .om compiled
  with ``--dynamic_batch_size`` gears. nasq checks float32, NCHW (format 0) and 3x331x331 at load.
* ``infer([x], mode="static")`` for a static .om: ``x`` must hold exactly the compiled batch (nasq
  pads a short batch: ``fixed_batch``, and ``-b`` must equal the compiled batch).
  ``infer([x], mode="dymbatch")`` for a gear .om: the batch of ``x`` selects the gear and must be one
  exactly (aclruntime neither pads nor chooses: "the dymBatch parameter is not correct"). nasq runs a
  batch on the smallest gear that holds it, padded with copies of its first image (as the
  ``ais_bench`` tool pads a short batch) and the padding's outputs dropped. ``x`` is one C-contiguous
  float32 NCHW array: aclruntime compares only byte sizes, so a wrong dtype of the same size would
  pass there silently. The result is a list of host numpy arrays, one per output (``[0]``: logits).
* ``summary().exec_time_list``: one entry per model execution, ``(start_ms, end_ms)`` since the
  session started (0.0.2; earlier versions listed durations in ms under ``sumary()``);
  ``reset_summaryinfo()`` clears it. nasq reads it after every batch, so the compute time and
  latency percentiles of a report are the NPU's execution time as ``python3 -m ais_bench``
  measures it (``NPU_compute_time``), not host time around the call. Like the tool, nasq runs one
  warm-up execution (per gear) at load and clears the list. The times are float32 ms since the
  session started, so their resolution decays in a long-lived worker (about 2 ms after 5 hours):
  a batch whose device time exceeds its host time falls back to host time.
* ``InferSession`` raises ``ValueError``/``TypeError`` as well as ``RuntimeError``: 0.0.2 refuses
  an .om that is a symlink, writable by group or others, owned by neither the user nor a group of
  theirs, or whose path has characters outside ``[A-Za-z0-9_./-]``.
* ``free_resource()`` releases the model and the context. There is no ``free_device()`` in any
  version; ``finalize()`` ends ACL for the whole process (a worker could not load another model
  after it), so nasq never calls it. Versions before 0.0.2 (no ``free_resource``, no
  ``out_array``, ``dymbatch`` ignored) are refused at load.

An .om computes in the precision ATC compiled it for: the seed's command sets no
``--precision_mode``, so ATC's default (``force_fp16``) applies; the report's model block says so
(``compute_precision``).

Gears come from the artifact's ``meta.json`` when the .om was built by ``nasq build --target om``
(``--gears``); for any other .om the batch size must be one of its gears (checked at load).
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import time

import numpy as np

from ..config import BackendOptions
from ..errors import BackendError
from ..model.spec import PREPROCESS, ModelRef
from .base import Backend


def device_ms(exec_time_list) -> float:
    """Total execution time in ms of ``summary().exec_time_list``: (start, end) pairs in ms
    (ais_bench 0.0.2; durations in ms, as earlier versions listed them, are summed too)."""
    total = 0.0
    for entry in exec_time_list or []:
        if isinstance(entry, (tuple, list)):
            start, end = entry
            total += float(end) - float(start)
        else:
            total += float(entry)
    return total


def find_om(path: str) -> tuple[str, dict]:
    """(the .om to load, what nasq's build recorded about it: gears, chip, ATC precision mode;
    each None for an .om nasq did not build).

    Raises:
        BackendError: no .om there, or several in one folder.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.om")))
        if len(found) != 1:
            raise BackendError(f"ais_bench: {path} holds {len(found)} .om files ({', '.join(map(os.path.basename, found)) or 'none'}); "
                               "give --weights the one to run")
        path = found[0]
    elif not path.endswith(".om"):
        raise BackendError(f"ais_bench runs a compiled .om, not {path!r}: build one with `nasq build --target om "
                           "--soc-version Ascend310P3` on a CANN host (or give `nasq eval` --soc-version)")
    if not os.path.isfile(path):
        raise BackendError(f"ais_bench model {path!r} does not exist")
    meta = {}
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        pass
    spec = meta.get("spec") or {}
    atc = next((s for s in meta.get("steps") or [] if s.get("name") == "atc"), {})
    return path, {"gears": [int(g) for g in spec.get("gears") or []] or None, "soc_version": spec.get("soc_version"),
                  "precision_mode": atc.get("precision_mode")}


class AisBenchBackend(Backend):
    name = "ais_bench"
    artifact_suffixes = (".om",)
    device_kinds = ("npu",)

    @classmethod
    def check_device(cls, device: str) -> None:
        import importlib.util

        if importlib.util.find_spec("ais_bench") is None:
            raise BackendError("the ais_bench backend needs ais_bench, which is not installed: install the ais_bench "
                               "and aclruntime wheels (Ascend's tools repository, ais-bench_workload) on this CANN "
                               "host")
        super().check_device(device)
    #: a checkpoint is built to an .om first (ATC on the build queue, needs --soc-version)
    build_target = "om"
    #: -b is checked against the .om's static batch or gears at load
    load_per_batch_size = True

    def load(self, model: ModelRef, *, batch_size: int, options: BackendOptions = BackendOptions()) -> None:
        self.check_options(options)
        kind, _, index = self.device.partition(":")
        if kind != "npu":
            raise BackendError(f"ais_bench runs on npu:N, not {self.device!r}")
        path, built = find_om(model.weights)
        try:
            from ais_bench.infer.interface import InferSession
        except ImportError:
            raise BackendError("the ais_bench backend needs Ascend's ais_bench and aclruntime wheels (from the "
                               "ais_bench release, installed on a CANN host after `source "
                               "/usr/local/Ascend/ascend-toolkit/set_env.sh`)") from None
        try:
            self._sess = InferSession(int(index or 0), path)
        except (RuntimeError, ValueError, TypeError) as e:
            raise BackendError(f"ais_bench could not load {path} on {self.device} "
                               f"(ASCEND_RT_VISIBLE_DEVICES={os.environ.get('ASCEND_RT_VISIBLE_DEVICES')}): {e}. "
                               "ais_bench 0.0.2 loads only a regular file (no symlink) that is not writable by group "
                               "or others, owned by you or your group, its path made of A-Z a-z 0-9 _ . / -") from None
        missing = [a for a in ("free_resource", "summary", "reset_summaryinfo") if not hasattr(self._sess, a)]
        if missing or "out_array" not in inspect.signature(self._sess.infer).parameters:
            self._sess = None
            raise BackendError("ais_bench: this ais_bench is older than 0.0.2 (no "
                               f"{', '.join(missing) or 'infer(..., out_array)'}); nasq needs 0.0.2's interface "
                               "(dymbatch mode, free_resource, summary): install the current ais_bench wheels")
        desc = self._sess.get_inputs()[0]
        dtype = getattr(desc.datatype, "name", str(desc.datatype)).rsplit(".", 1)[-1]
        shape = [int(d) for d in desc.shape]
        if dtype != "float32" or int(getattr(desc, "format", 0)) != 0 or shape[1:] != list(PREPROCESS.chw):
            raise BackendError(f"ais_bench: {path} takes {dtype} {shape} (format {desc.format}); nasq feeds "
                               f"float32 NCHW [N, {', '.join(map(str, PREPROCESS.chw))}] as the seed's ATC command compiles")
        self._soc = built["soc_version"]
        if shape[0] > 0:  # static: one batch size, short batches padded by the caller
            if batch_size != shape[0]:
                raise BackendError(f"ais_bench: {os.path.basename(path)} was compiled for batch {shape[0]}; run it "
                                   f"with -b {shape[0]} (or build one per batch size, or one with --gears)")
            self.fixed_batch, self._gears, self._mode = shape[0], None, "static"
        else:
            gears = built["gears"]
            if gears is None:  # not built by nasq: the batch size must be a gear, as aclruntime checks
                try:
                    self._sess.set_dynamic_batchsize(batch_size)
                except RuntimeError as e:
                    raise BackendError(f"ais_bench: batch size {batch_size} is not a gear of {path}: {e}") from None
                gears = [batch_size]
            elif batch_size not in gears:
                raise BackendError(f"ais_bench: batch size {batch_size} is not one of {os.path.basename(path)}'s gears "
                                   f"({', '.join(map(str, gears))}); run with -b one of them")
            self.fixed_batch, self._gears, self._mode = None, sorted(gears), "dymbatch"
        # one warm-up execution per compiled shape, as the ais_bench tool does, then a clean summary
        for n in self._gears or [self.fixed_batch]:
            self._infer(np.zeros((n, *PREPROCESS.chw), np.float32))
        self._pending_ms: float | None = None
        self._sess.reset_summaryinfo()
        self.model_info = {"artifact": os.path.abspath(path), "gears": self._gears,
                           "compute_precision": built["precision_mode"] or
                           "as ATC compiled it (its default --precision_mode is force_fp16)",
                           **(model.options.get("provenance") or {})}

    def _infer(self, x: np.ndarray) -> np.ndarray:
        try:
            return self._sess.infer([x], mode=self._mode)[0]
        except (RuntimeError, ValueError, TypeError) as e:
            raise BackendError(f"ais_bench infer ({self._mode}, batch {len(x)}) failed: {e}") from None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self._mode == "dymbatch":
            gear = next((g for g in self._gears if g >= n), None)
            if gear is None:
                raise BackendError(f"ais_bench: a batch of {n} is larger than every gear ({self._gears})")
            if gear > n:
                x = np.concatenate([x, np.repeat(x[:1], gear - n, axis=0)])  # a new, contiguous array
        t = time.perf_counter()
        out = self._infer(x)
        host_ms = (time.perf_counter() - t) * 1e3
        out = np.asarray(out, dtype=np.float32).reshape(len(x), -1)[:n]
        self.num_outputs = out.shape[1]
        ms = device_ms(self._sess.summary().exec_time_list)
        self._sess.reset_summaryinfo()
        # the list's float32 timestamps coarsen as the session ages: never more than the host saw
        self._pending_ms = (self._pending_ms or 0.0) + (ms if 0 < ms <= host_ms else host_ms)
        return out

    def take_device_ms(self) -> float | None:
        ms, self._pending_ms = self._pending_ms, None
        return ms

    def versions(self) -> dict[str, str]:
        from ..versions import package_versions

        return package_versions(("ais_bench", "aclruntime"), missing="unknown")

    def describe_device(self) -> str:
        return f"{self._soc or 'Ascend'}, ais_bench {self._mode}" + \
            (f" (gears {','.join(map(str, self._gears))})" if self._gears else "")

    def environment(self) -> dict:
        """The chip, the NPU the worker is pinned to and the CANN toolkit's version (from the
        toolkit's own version file, as ``npu-smi``-less hosts have it)."""
        return {"accelerator": self._soc or "Ascend", "visible_npu": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),
                "cann": _cann_version()}

    def close(self) -> None:
        sess, self._sess = getattr(self, "_sess", None), None
        if sess is not None:
            sess.free_resource()  # never finalize(): it would end ACL for this whole worker process


def _cann_version() -> str | None:
    """The CANN toolkit's version from ``$ASCEND_TOOLKIT_HOME`` (set by CANN's set_env.sh)."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    for path in ([os.path.join(home, "version.cfg"), os.path.join(home, "..", "version.cfg")] if home else []):
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    if key.strip() in ("version", "toolkit_version", "Version"):
                        return value.strip().strip('"[]')
        except OSError:
            continue
    return None
