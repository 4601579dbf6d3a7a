"""Where a worker may read and write: the trust boundary for paths that arrive in messages.

Anyone who can write to the broker can put any path in a task message. A worker therefore
resolves every path it is handed (symbolic links included, with ``os.path.realpath``) and
uses it only when it lies under one of its read roots (data, weights, labels, artifacts) or,
for what it writes (outputs, reports, sweeps, artifacts), one of its write roots. Roots come
from the worker's configuration (``--read-root``/``--write-root``, ``read_roots``/
``write_roots`` settings); a worker's own artifact and report directories are always roots.

What this does not cover: files *inside* an allowed folder that are links to elsewhere (a
dataset of symbolic links is common and is read as it is), and a link swapped in between the
check and the use by someone who can already write inside a root.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import NasqError


class RootError(NasqError):
    """A path outside every root this worker may use."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(text, what: str) -> str:
    """An id that becomes a file or folder name or a Redis key part (a run id, a shard id):
    letters, digits and ``_.-``, starting with a letter or digit, at most 128 characters.

    Raises:
        RootError: anything else (a ``/``, ``..``, an empty string, a non-string).
    """
    if not isinstance(text, str) or not _NAME.fullmatch(text):
        raise RootError(f"{what} must be letters, digits and _.- (at most 128), not {str(text)[:60]!r}")
    return text


def split_paths(text: str | None) -> tuple[str, ...]:
    """``"/data:/models"`` (``os.pathsep``-separated, as ``PATH``) -> ("/data", "/models")."""
    return tuple(p for p in (text or "").split(os.pathsep) if p.strip())


def _resolve(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class Roots:
    """Resolved folders a worker may read from and write to (a write root is readable too)."""

    read: tuple[str, ...]
    write: tuple[str, ...]

    @classmethod
    def of(cls, read=(), write=()) -> Roots:
        w = tuple(dict.fromkeys(_resolve(p) for p in write if p))
        return cls(read=tuple(dict.fromkeys([*(_resolve(p) for p in read if p), *w])), write=w)

    def readable(self, path: str, what: str) -> str:
        """``path`` resolved, if it lies under a read root.

        Raises:
            RootError: naming what the path was for, where it resolves to, and the roots.
        """
        return self._check(path, what, self.read, "read", "--read-root")

    def writable(self, path: str, what: str) -> str:
        """``path`` resolved, if it lies under a write root (RootError otherwise)."""
        return self._check(path, what, self.write, "write", "--write-root")

    @staticmethod
    def _check(path: str, what: str, roots: tuple[str, ...], verb: str, flag: str) -> str:
        if not isinstance(path, str) or not path or "\0" in path or not os.path.isabs(os.path.expanduser(path)):
            raise RootError(f"{what} {path!r} is not an absolute path")
        real = _resolve(path)
        if any(_under(real, r) for r in roots):
            return real
        where = f" (it resolves to {real})" if real != os.path.normpath(path) else ""
        allowed = ", ".join(roots) or "none"
        raise RootError(f"{what} {path}{where} is outside this worker's {verb} roots ({allowed}); if it should "
                        f"{verb} there, start the worker with {flag} DIR (or the {verb}_roots setting)")

    def describe(self) -> dict:
        return {"read_roots": list(self.read), "write_roots": list(self.write)}
