"""Flags: the argument types every command shares, the one-line error parser, and a worker's
device options as flags, generated from their one declaration (``config.BackendOptions``).

From that declaration come the flags of ``nasq worker`` (and those ``nasq eval``/``nasq bench``
take), a local worker's argv (``option_argv``, used by ``queue/local.py``) and the parsing back
(``options_from``); each value is checked once, when it is parsed: ranges by the flag's type,
the backend's precisions and compile modes by ``backends.check_options``.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields

from .config import BackendOptions


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------------------ flag types
# Each checks its value when the flags are parsed, so a bad one is one line naming the flag
# (argparse adds "argument --batch-size:") before anything starts.

def _number(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        v = _number(int, text, "an integer")
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {'at least ' + str(low) if high is None else f'{low} to {high}'}"
                                             f", not {v}")
        return v
    return parse


def seconds(high: float | None = None, what: str = "a number of seconds"):
    """An argparse type: a number above 0 (at most ``high``): seconds, or ``what`` it counts."""
    def parse(text: str) -> float:
        v = _number(float, text, what)
        if not v > 0 or (high is not None and v > high) or v != v:
            raise argparse.ArgumentTypeError(f"must be above 0{f' and at most {high:g}' if high else ''}, not {text}")
        return v
    return parse


def int_list(low: int = 1, high: int | None = None):
    """An argparse type: comma-separated integers, each in [low, high]."""
    one = int_in(low, high)

    def parse(text: str) -> list[int]:
        values = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}")
        return values
    return parse


def broker_flag(p, without: str | None = None) -> None:
    """--broker: the Redis URL of the deployment; ``without`` says what happens without one."""
    p.add_argument("--broker", help="Redis URL of the nasq deployment (default: $NASQ_BROKER_URL or the config file"
                                    + (f"; without one: {without})" if without else ")"))


def wait_flags(p) -> None:
    """--timeout and --no-progress, for a command that waits."""
    p.add_argument("--timeout", type=seconds(), help="give up waiting after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------ device options

#: the options that are flags, in declaration order
OPTION_FIELDS = [f for f in fields(BackendOptions) if "help" in f.metadata]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(spec):
    from . import backends

    if isinstance(spec, str):  # a registry: the union over backends (each backend's own set is checked later)
        return getattr(backends, spec)()
    return spec


def add_field_flag(parser, f: dataclasses.Field, *, default=dataclasses.MISSING, text: str | None = None,
                   unset: str = "") -> None:
    """The flag of one declared field (``config.BackendOptions``, ``request.EvalRequest``): its
    names (``flags``, else ``--<name>``), help, type (``type``, or an integer in ``low``..``high``),
    choices (a registry's name: its union over backends), metavar, and whether it is required,
    all from the field's metadata; ``default`` and ``text`` replace the field's own. The help
    says the default, or ``unset`` for a choice left to someone else."""
    meta = f.metadata
    names = meta.get("flags") or (flag_of(f.name),)
    text = meta["help"] if text is None else text
    if f.type in (bool, "bool"):
        parser.add_argument(*names, dest=f.name, action="store_true", help=text)
        return
    default = f.default if default is dataclasses.MISSING else default
    kw: dict = {"dest": f.name, **({"required": True} if meta.get("required") else {"default": default})}
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if "type" in meta:
        kw["type"] = meta["type"]
    elif "low" in meta:
        kw["type"] = int_in(meta["low"], meta.get("high"))
    if "choices" in meta:
        kw["choices"] = _choices(meta["choices"])
    shown = "" if meta.get("required") or "default:" in text else \
        f" (default: {default})" if default is not None else unset if "choices" in meta else ""
    parser.add_argument(*names, help=text + shown, **kw)


def add_option_flags(parser, names: list[str] | None = None, *, defaults: dict | None = None,
                     helps: dict | None = None, help_suffix: str = "") -> None:
    """Add the flags of the device options ``names`` (all by default) to ``parser``; ``defaults``
    overrides a default (``{"precision": None}``: the worker's), ``helps`` a help text (what the
    option means to this command)."""
    defaults, helps = defaults or {}, helps or {}
    for f in OPTION_FIELDS:
        if names is None or f.name in names:
            add_field_flag(parser, f, default=defaults.get(f.name, f.default),
                           text=helps.get(f.name, f.metadata["help"]) + help_suffix, unset=" (default: the worker's)")


def options_from(args, base: BackendOptions = BackendOptions()) -> BackendOptions:
    """The options in a parsed namespace (fields it does not have keep ``base``'s)."""
    given = {f.name: getattr(args, f.name) for f in OPTION_FIELDS if hasattr(args, f.name)}
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def option_argv(options: BackendOptions) -> list[str]:
    """The flags that give a worker ``options`` (those that differ from the defaults)."""
    argv = []
    for f in OPTION_FIELDS:
        value = getattr(options, f.name)
        if value == f.default:
            continue
        argv += [flag_of(f.name)] if isinstance(value, bool) else [flag_of(f.name), str(value)]
    return argv


#: the options an embedded run gives the workers it starts (with --broker, the workers were
#: started already: these belong to `nasq worker`)
EMBEDDED_ONLY = ("compile", "cuda_graphs", "kernels")
