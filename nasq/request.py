"""An evaluation as it is asked for, declared once (``EvalRequest``), as ``config.BackendOptions``
declares a worker's options.

From the declaration come the flags of ``nasq eval`` and ``python -m producer``
(``add_request_flags``), the keyword arguments of ``api.evaluate`` and ``api.submit_evaluation``
(``takes_request``: their signature lists every field with its default), the request recorded
in the run's manifest (``to_payload``) and the command line that runs the evaluation again
(``rerun_argv``). A default is written in one place: its field.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field, fields

from .config import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, MAX_SHARD_IMAGES
from .config import _flag as _arg  # a field's flag metadata, as BackendOptions declares its own
from .flags import add_field_flag, flag_of, int_in, int_list

# Beyond BackendOptions' keys (``help``, ``choices``: a tuple or a registry of ``nasq.backends``,
# ``metavar``), a request field's flag may say: ``flags`` (default: ``--the-name``), ``required``,
# ``type`` (an argparse type), and ``rerun``: False where the rerun command leaves it out (it
# says where the run goes, not what it is), or the field it comes with (``outfmt``: ``output_dir``).


def _flags(f) -> tuple[str, ...]:
    return f.metadata.get("flags") or (flag_of(f.name),)


@dataclass(frozen=True)
class EvalRequest:
    """What an evaluation is: the model, the data and how they are run. ``None`` leaves the
    choice to nasq (the checkpoint's head, the worker's precision, the default plan)."""

    weights: str = field(metadata=_arg(
        "Cadene-format checkpoint (.pth) or a built model for the backend", required=True))
    data: str = field(metadata=_arg(
        "folder of JPEGs, of .bin files, or of u8 shards (the same path on every worker)", required=True))
    labels: str | None = field(default=None, metadata=_arg(
        "val_label.txt (default: one in or beside --data; none: no accuracy)"))
    backend: str = field(default="torch", metadata=_arg("inference runtime", choices="names"))
    precision: str | None = field(default=None, metadata=_arg(
        "the run's precision; fp16/bf16 take the CUDA fast path (default: the worker's)", choices="precisions"))
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata=_arg(
        "images per forward pass", flags=("-b", "--batch-size"), type=int_in(1, MAX_BATCH_SIZE)))
    shard_size: int | None = field(default=None, metadata=_arg(
        "images per shard task (default: a few shards per worker, <= 1000)", type=int_in(1, MAX_SHARD_IMAGES)))
    allow_bad_labels: bool = field(default=False, metadata=_arg(
        "go on when some labels are not ImageNet classes 0-999 (they count as misses)"))
    num_outputs: int | None = field(default=None, metadata=_arg(
        "1001 keeps the background class (as the published checkpoint and the Ascend recipe's ONNX), 1000 drops it "
        "(default: the checkpoint's)", type=int, choices=(1001, 1000)))
    queue: str | None = field(default=None, metadata=_arg("evaluation queue (default: eval.<backend>)", rerun=False))
    require_workers: int | None = field(default=None, metadata=_arg(
        "with a broker: submit nothing unless at least N live workers consume the queue", type=int_in(1, 100_000),
        metavar="N", rerun=False))
    soc_version: str | None = field(default=None, metadata=_arg(
        "ais_bench with a checkpoint: the chip to build the .om for, e.g. Ascend310P3 (ATC on the build queue; see "
        "`npu-smi info`)"))
    gears: tuple[int, ...] | None = field(default=None, metadata=_arg(
        "ais_bench with a checkpoint: dynamic batch gears of the .om, e.g. 1,4,8 (-b must be one; default: a static "
        ".om of -b)", type=int_list(1, MAX_BATCH_SIZE)))
    output_dir: str | None = field(default=None, metadata=_arg(
        "also write every image's logits in ais_bench's layout (shared storage)", flags=("--output",), metavar="DIR"))
    outfmt: str = field(default="NPY", metadata=_arg("format for --output", choices=("NPY", "TXT", "BIN"),
                                                     rerun="output_dir"))

    def to_payload(self) -> dict:
        """The request as the manifest records it (JSON types)."""
        d = dataclasses.asdict(self)
        d["gears"] = list(self.gears) if self.gears is not None else None
        return d

    def replace(self, **changes) -> EvalRequest:
        return dataclasses.replace(self, **changes)


def request_of(cls, given: EvalRequest | None, kwargs: dict, *, caller: str) -> EvalRequest:
    """``given`` with ``kwargs`` (the request's fields by keyword) applied; a keyword that is not
    a field is a TypeError naming it, as Python's own."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in kwargs]
    if given is None and missing:
        raise TypeError(f"{caller}() missing required keyword argument: {missing[0]!r}")
    if "gears" in kwargs and kwargs["gears"] is not None:
        kwargs = {**kwargs, "gears": tuple(kwargs["gears"])}
    return dataclasses.replace(given, **kwargs) if given is not None else cls(**kwargs)


def takes_request():
    """Decorate an API function ``fn(request=None, /, *, <its own keywords>, **fields)`` so that
    its signature (``help()``, ``inspect``) lists the request's fields as keywords with their
    defaults, and it receives them as one ``EvalRequest`` in ``request``."""
    cls = EvalRequest  # as declared when the function is decorated

    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        first = [p for p in sig.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_ONLY]
        first = [p.replace(default=None) for p in first]
        # a required field (weights, data) shows None: a request given whole needs none of them
        # (``request_of`` says which one is missing when neither is given)
        ours = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                  default=None if f.default is dataclasses.MISSING else f.default)
                for f in fields(cls)]

        @functools.wraps(fn)
        def call(request=None, /, **kwargs):
            if request is not None and not isinstance(request, cls):
                raise TypeError(f"{fn.__name__}() takes an {cls.__name__} positionally, or its fields by keyword "
                                f"(weights=..., data=...), not {type(request).__name__}")
            mine = {k: kwargs.pop(k) for k in [p.name for p in own] if k in kwargs}
            return fn(request_of(cls, request, kwargs, caller=fn.__name__), **mine)

        call.__signature__ = sig.replace(parameters=[*first, *ours, *own])
        return call
    return wrap


def add_request_flags(parser) -> None:
    """The flags of every field of ``EvalRequest`` (``nasq eval`` and ``python -m producer``)."""
    for f in fields(EvalRequest):
        add_field_flag(parser, f)


def request_from_args(args) -> EvalRequest:
    """The request in a namespace parsed with ``add_request_flags``."""
    return request_of(EvalRequest, None, {f.name: getattr(args, f.name) for f in fields(EvalRequest)},
                      caller="request_from_args")


def rerun_argv(request: EvalRequest) -> list[str]:
    """The flags that ask for ``request`` again, in declaration order: every value that is set
    (a default included: the command says every choice), except what says where the run goes
    (``rerun=False``) and what comes only with another field (``rerun="output_dir"``)."""
    argv: list[str] = []
    for f in fields(request):
        meta, value = f.metadata, getattr(request, f.name)
        with_field = meta.get("rerun", True)
        if with_field is False or value is None or value is False:
            continue
        if isinstance(with_field, str) and getattr(request, with_field) is None:
            continue
        flag = _flags(f)[0]
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv
