"""The checks of a user's input, before anything is queued or started: weights (read whole),
data (a usable image), labels (matching the images, ImageNet classes), the roots local or live
workers may use, and what a backend's build needs; ``plan_run`` gathers them into a ``Plan``."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

from .. import backends
from ..artifacts.spec import check_om_options
from ..config import Settings
from ..data.labels import find_labels, out_of_range, read_labels, stem
from ..data.digests import cache_for, file_digests
from ..data.sources import Source, check_usable, open_source
from ..errors import DatasetError, NasqError
from ..queue.session import Session
from ..roots import split_paths
from ..request import EvalRequest
from ..wire import EvalJob, MAX_BATCH_SIZE, OutputSpec


def check_weights(weights: str, backend: str, num_outputs: int | None = None) -> str:
    """Check the weights here, before anything is queued: a checkpoint is read whole (md5 for
    the published file, head size, every key and every shape) where torch is installed; a
    client without torch checks the file and the md5 and leaves the rest to the worker that
    loads it (saying so); a built model must suit the backend."""
    from ..model.checkpoint import check_file, check_state_dict, read_checkpoint

    cls = backends.backend_class(backend)
    weights = os.path.abspath(weights)
    if not os.path.exists(weights):
        raise NasqError(f"weights {weights} do not exist")
    if weights.endswith((".pth", ".pt")):
        try:
            import torch  # noqa: F401 - where it is installed, the checkpoint is read whole here
        except ImportError:
            torch = None
        if torch is not None:
            check_state_dict(read_checkpoint(weights), weights, num_outputs)
        else:
            check_file(weights)
            print(f"note: torch is not installed here, so the keys and shapes of {os.path.basename(weights)} are "
                  "checked by the worker that loads it (a bad checkpoint fails the run's shards, named)",
                  file=sys.stderr)
        if ".pth" not in cls.artifact_suffixes and not needs_build(weights, backend):
            raise NasqError(f"backend {backend} runs a compiled model ({', '.join(cls.artifact_suffixes)}), "
                            f"not a checkpoint: build one with `nasq build` and pass it as --weights")
    elif not (weights.endswith(cls.artifact_suffixes) or os.path.isfile(os.path.join(weights, "meta.json"))):
        raise NasqError(f"backend {backend} cannot run {weights!r}; it takes {', '.join(cls.artifact_suffixes)}")
    return weights


def labels_for(source: Source, data: str, labels: str | None, *, allow_bad: bool = False) -> str | None:
    path = labels or (find_labels(data) if source.kind != "index" else None)
    if path is None:
        return None
    table = read_labels(path)
    if not any(stem(n) in table for n in source.names):
        raise DatasetError(f"none of the {len(source)} images in {source.root} has a label in {path}: "
                           "is it the right label file?")
    bad = out_of_range(table, source.names)
    if bad and not allow_bad:
        shown = ", ".join(f"{n} {label}" for n, label in bad[:3])
        raise DatasetError(f"{path}: {len(bad)} image(s) have labels outside the ImageNet classes 0-999 (e.g. {shown}); "
                           "they could never be predicted right. Fix the label file, or pass --allow-bad-labels to go "
                           "on (they count as misses)")
    return os.path.abspath(path)


def with_roots(settings: Settings, *, read=(), write=()) -> Settings:
    """Settings for private local workers: they may read and write what this call names (a
    file's folder, a data folder, an output folder) besides what the settings allow."""
    def join(current: str, extra) -> str:
        return os.pathsep.join([*split_paths(current), *(os.path.abspath(p) for p in extra
                                                         if p and not str(p).startswith("index:"))])
    return replace(settings, read_roots=join(settings.read_roots, read), write_roots=join(settings.write_roots, write))


def check_worker_roots(session: Session, queue: str, job: EvalJob) -> None:
    """Refuse a run that no live worker of ``queue`` may read (or write) by its roots, naming
    the roots, instead of failing every shard on the workers."""
    from ..roots import RootError, Roots

    infos = [(n, w) for n, w in session.store.registry.workers().items()
             if w["alive"] and queue in w.get("queues", []) and "read_roots" in w]
    errors = []
    for name, info in infos:
        try:
            job.within(Roots.of(info["read_roots"], info["write_roots"]))
            return
        except RootError as e:
            errors.append(f"{name}: {e}")
    if errors:
        raise NasqError(f"no live worker on {queue} may use this run's paths; {errors[0]}")


def needs_build(weights: str, backend: str) -> bool:
    """A checkpoint given to a backend that runs a built model (onnxruntime, openvino)."""
    return backends.backend_class(backend).build_target is not None and weights.endswith((".pth", ".pt"))


@dataclass(frozen=True)
class Plan:
    """An evaluation checked and ready to submit."""

    weights: str
    source: Source
    labels: str | None
    backend: str
    batch_size: int
    precision: str | None
    num_outputs: int | None
    output: OutputSpec | None
    #: the build target's options (ais_bench: chip, gears or batch size)
    build: dict
    #: the request as checked: paths absolute, the label file found (the rerun command and the
    #: manifest's record of it)
    request: EvalRequest | None = None


def plan_request(request: EvalRequest, *, content: bool = True, digest_cache: str | None = None, log=None) -> Plan:
    """``plan_run`` for a request; the plan keeps the request with its paths as checked."""
    plan = plan_run(weights=request.weights, data=request.data, labels=request.labels, backend=request.backend,
                    batch_size=request.batch_size, precision=request.precision, num_outputs=request.num_outputs,
                    output_dir=request.output_dir, outfmt=request.outfmt, allow_bad_labels=request.allow_bad_labels,
                    soc_version=request.soc_version, gears=request.gears, content=content,
                    digest_cache=digest_cache, log=log)
    checked = request.replace(weights=plan.weights, data=plan.source.root, labels=plan.labels,
                              output_dir=plan.output.dir if plan.output else None,
                              outfmt=plan.output.fmt if plan.output else request.outfmt,
                              gears=tuple(plan.build["gears"]) if plan.build.get("gears") else request.gears)
    return replace(plan, request=checked)


def plan_run(*, weights, data, labels, backend, batch_size, precision, num_outputs, output_dir, outfmt,
             allow_bad_labels: bool = False, soc_version: str | None = None, gears: list[int] | None = None,
             content: bool = True, digest_cache: str | None = None, log=None) -> Plan:
    """``content``: list the dataset with the sha256 of every image (``nasq.data.digests``,
    cached in ``digest_cache``, a folder), so that the run's workers refuse a file that changed."""
    if not (isinstance(batch_size, int) and 1 <= batch_size <= MAX_BATCH_SIZE):
        raise NasqError(f"batch_size must be 1 to {MAX_BATCH_SIZE}, not {batch_size!r}")
    source = open_source(data)
    check_usable(source)
    if content and source.kind != "index":
        source.with_digests(file_digests(source, cache_for(source.root, digest_cache), log=log))
    output = OutputSpec(os.path.abspath(output_dir), outfmt.upper()) if output_dir else None
    weights = check_weights(weights, backend, num_outputs)
    return Plan(weights=weights, source=source, labels=labels_for(source, data, labels, allow_bad=allow_bad_labels),
                 backend=backend, batch_size=batch_size, precision=precision, num_outputs=num_outputs, output=output,
                 build=build_options_for(backend, weights, batch_size=batch_size, soc_version=soc_version, gears=gears))


def build_options_for(backend: str, weights: str, *, batch_size: int, soc_version: str | None = None,
                      gears: list[int] | None = None) -> dict:
    """What the backend's build target needs besides the checkpoint: for ais_bench (an ATC
    build), the chip and either the batch gears or the one batch size, as the seed builds one
    .om per batch size.

    Raises:
        NasqError: --soc-version/--gears where no .om is built, an ATC build without a chip, or a
            batch size that is not one of the gears.
    """
    if not needs_build(weights, backend) or backends.backend_class(backend).build_target != "om":
        if soc_version or gears:
            raise NasqError("--soc-version and --gears say how to build an .om from a checkpoint (--backend ais_bench "
                            f"with a .pth); they do not apply to --backend {backend} with {os.path.basename(weights)}")
        return {}
    if not soc_version:
        raise NasqError("the ais_bench backend runs an .om: pass --soc-version (e.g. Ascend310P3, see `npu-smi info`) "
                        "to build one on the build queue (a build worker on a CANN host, with atc), or --weights X.om")
    if gears and batch_size not in gears:
        raise NasqError(f"-b {batch_size} is not one of the gears {','.join(map(str, gears))}")
    check_om_options(soc_version, gears)
    return {"soc_version": soc_version, "gears": sorted(gears)} if gears else \
        {"soc_version": soc_version, "batch_size": batch_size}
