"""The artifact store: one directory per build key, complete or absent.

``<root>/<key>/`` holds the built files and ``meta.json``, which records the sha256 of each. A
build works in ``<root>/.staging/<key>-<token>/`` and is published with one ``rename`` of that
directory, so a failed or interrupted build never leaves a directory that looks complete.
Staging directories older than a day are swept at the next build. An artifact is used only if
its files hold the bytes its meta.json records (``verified``): one changed after it was built is
moved to ``<root>/.quarantine/`` and built again; a worker checks the files it loads itself.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

from ..files import fsync_dir, verify_files, write_json

STAGING = ".staging"
QUARANTINE = ".quarantine"
META = "meta.json"
#: digests of the artifacts' files per (path, size, mtime): a cache hit is checked without reading them
DIGESTS = ".digests.json"


@dataclass
class BuildResult:
    """An artifact in the store: its key, directory, metadata, and whether it was already there."""

    key: str
    path: str
    meta: dict
    cached: bool

    @property
    def table(self) -> str:
        from .verify import table

        rows = [r for r in self.meta.get("verification") or [] if r]
        how = "cache hit" if self.cached else f"built in {self.meta.get('build_s')} s"
        lines = [f"artifact  {self.path}", f"key       {self.key}", f"target    {self.meta['target']}  ({how})",
                 f"files     {', '.join(self.meta.get('files', {}))}"]
        g = self.meta.get("graph")
        if g:
            lines.append(f"graph     {g['nodes']} nodes, {g['slice_nodes']} Slice, "
                         f"{g['consecutive_slice_pairs']} consecutive Slice pairs")
        for s in self.meta.get("steps", []):
            if "command" in s:
                lines.append(f"step      {s['name']} ({s['seconds']} s): {s['command'].splitlines()[0]}")
        if rows:
            lines += ["verification against PyTorch fp32 (fixed batch of generated images):", table(rows)]
        return "\n".join(lines)


class ArtifactStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def result(self, key: str) -> BuildResult | None:
        """The artifact as a cache hit, or None when it is not built (or was changed after it
        was built: then it is quarantined, and built again)."""
        meta = self.verified(key)
        return BuildResult(key, self.path(key), meta, True) if meta is not None else None

    def verified(self, key: str) -> dict | None:
        """The metadata of a complete artifact whose files hold the bytes it records, or None.
        An artifact whose files do not is moved to ``.quarantine`` (logged), so that a build
        can publish the key again.

        Raises:
            NasqError: a file of it that cannot be read (not judged changed: nothing is moved).
        """
        meta = self.get(key)
        if meta is None:
            return None
        bad = self._bad(key, meta)
        if not bad:
            return meta
        self.quarantine(key, bad)
        return self.get(key) if self.get(key) is not None and not self._bad(key, self.get(key)) else None

    def _bad(self, key: str, meta: dict) -> dict[str, str]:
        from ..errors import NasqError

        try:
            return verify_files(self.path(key), meta.get("files") or {}, cache_file=os.path.join(self.root, DIGESTS))
        except OSError as e:
            raise NasqError(f"artifact {key}: cannot read {e.filename or self.path(key)}: {e.strerror or e}") from None

    def quarantine(self, key: str, bad: dict[str, str]) -> str | None:
        """Move an artifact whose files changed after it was built out of the way; returns where.
        The folder moved is checked again: one that a build published meanwhile (whole, as its
        meta.json records) is put back."""
        import logging

        dest = os.path.join(self.root, QUARANTINE, f"{key}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.rename(self.path(key), dest)
        except OSError:
            return None  # moved by another process first
        meta = _read_meta(dest)
        if meta is not None and not verify_files(dest, meta.get("files") or {}):
            try:
                os.rename(dest, self.path(key))  # a fresh build, not the changed one: back in place
                return None
            except OSError:
                pass
        name, why = next(iter(bad.items()))
        logging.getLogger("nasq.build").warning(
            "artifact %s: %s does not match its meta.json (%s): it was changed after it was built and is not used; "
            "moved to %s; it is built again", key, name, why, dest)
        return dest

    def get(self, key: str) -> dict | None:
        """The metadata of a complete artifact, or None."""
        meta = os.path.join(self.path(key), META)
        try:
            with open(meta, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def staging_path(self, key: str, token: str) -> str:
        return os.path.join(self.root, STAGING, f"{key}-{token}")

    def staging(self, key: str, token: str) -> str:
        """A fresh staging directory for this build request (emptied if a redelivery left one)."""
        base = os.path.join(self.root, STAGING)
        os.makedirs(base, exist_ok=True)
        self._sweep(base)
        d = self.staging_path(key, token)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    def commit(self, key: str, staging: str, meta: dict) -> str:
        """Write meta.json into the staging directory and publish it as ``<root>/<key>``."""
        write_json(meta, os.path.join(staging, META))
        dest = self.path(key)
        try:
            os.rename(staging, dest)
            fsync_dir(os.path.dirname(dest))
        except OSError:
            if self.get(key) is None:  # a partial directory in the way: not ours to keep
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(staging, dest)
            else:  # someone else published the same key first
                shutil.rmtree(staging, ignore_errors=True)
        return dest

    def discard(self, staging: str | None) -> None:
        if staging and os.path.basename(os.path.dirname(staging)) == STAGING:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _sweep(base: str, max_age: float = 24 * 3600) -> None:
        now = time.time()
        for e in os.scandir(base):
            try:
                if now - e.stat().st_mtime > max_age:
                    shutil.rmtree(e.path, ignore_errors=True)
            except OSError:
                pass


def _read_meta(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, META), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
