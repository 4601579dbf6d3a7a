"""The artifact store: one directory per build key, complete or absent.

``<root>/<key>/`` holds the built files and ``meta.json``. A build works in
``<root>/.staging/<key>-<token>/`` and is published with one ``rename`` of that directory,
so a failed or interrupted build never leaves a directory that looks complete. Staging
directories older than a day are swept at the next build.
"""
from __future__ import annotations

import json
import os
import shutil
import time

STAGING = ".staging"
META = "meta.json"


class ArtifactStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

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
        with open(os.path.join(staging, META + ".tmp"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(os.path.join(staging, META + ".tmp"), os.path.join(staging, META))
        dest = self.path(key)
        try:
            os.rename(staging, dest)
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
