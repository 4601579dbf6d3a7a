"""What a worker process keeps between tasks: the loaded model, dataset listings, labels.

Each is checked, per shard, against the fingerprint the run was submitted with (the weights'
and the label file's sha256, the dataset's listing fingerprint): an input that changed under a
run fails its shards with one line instead of being scored against other data. The checks cost
a ``stat`` per shard; a file is hashed again only when its size or mtime changed.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

from .. import backends
from ..config import BackendOptions
from ..data.labels import read_labels
from ..data.sources import U8_INDEX, Source, open_source
from ..errors import RunError
from ..files import file_digest, read_json, verify_files
from ..model.spec import ModelRef

log = logging.getLogger("nasq.worker")


class DeviceResources:
    """One loaded backend on ``device`` (reloaded when a task asks for another model or
    options), dataset listings checked against the fingerprint a run was submitted with, and
    the last label file read."""

    def __init__(self, device: str, host_cache=None):
        self.device = device
        #: where the sources a run lists with digests also keep and find images (``HostCache``)
        self.host_cache = host_cache
        self.backend: backends.Backend | None = None
        self._backend_key: tuple | None = None
        self._sources: dict[tuple[str, str], tuple[tuple, Source, str]] = {}
        self._labels: tuple[tuple, str, dict] | None = None
        self._weights_sha256: str | None = None
        #: seconds the last ``backend_for`` spent loading (0 when the model was already loaded)
        self.last_load_s = 0.0

    def backend_for(self, name: str, model: ModelRef, batch_size: int, options: BackendOptions) -> backends.Backend:
        """The loaded model for a run (loaded again when the run asks for another one, or the
        file changed).

        Raises:
            RunError: the weights file is not the one the run was submitted with (``model.sha256``).
        """
        st = os.stat(_pinned(model.weights))  # the weights, or an artifact's meta.json
        key = (name, model.weights, st.st_mtime_ns, st.st_size, st.st_ino, model.num_outputs, options,
               batch_size if backends.backend_class(name).load_per_batch_size else None)
        self.last_load_s = 0.0
        if self._backend_key != key:
            self.drop_backend()  # stays empty if the load below fails
            digest = _pinned_digest(model)
            _same("weights file" if os.path.isfile(model.weights) else "artifact's meta.json", _pinned(model.weights),
                  model.sha256, digest)
            if os.path.isdir(model.weights):
                check_artifact(model.weights)
            t = time.perf_counter()
            b = backends.create(name, self.device)
            b.load(model, batch_size=batch_size, options=options)
            self.last_load_s = time.perf_counter() - t
            log.info("loaded %s on %s in %.1f s", model.weights, self.device, self.last_load_s)
            self.backend, self._backend_key, self._weights_sha256 = b, key, digest
        elif model.sha256:  # loaded before (maybe by a task that pinned nothing): this run's pin holds
            self._weights_sha256 = self._weights_sha256 or _pinned_digest(model)
            _same("weights file", _pinned(model.weights), model.sha256, self._weights_sha256)
        return self.backend

    def drop_backend(self) -> None:
        """Release the device (after an out-of-memory error, or before loading another model)."""
        if self.backend is not None:
            self.backend.close()
        self.backend, self._backend_key = None, None

    def source_for(self, dataset, digest_list: Callable[[str], bytes | None] | None = None) -> Source:
        """The dataset's listing (a ``wire.DatasetRef``), checked against the run's: with its
        ``content``, the run's digest list (``digest_list(content)``, from Redis) must hash with
        the listing here to it, and each image read is checked against its digest; else the
        listing's fingerprint. Listed again when the folder, or its u8 index, changed."""
        root, stamp = dataset.root, _stamp(dataset.root)
        want = dataset.content or dataset.fingerprint
        cached = self._sources.get((root, want))
        if cached is None or cached[0] != stamp:
            src = open_source(root)
            if dataset.content:
                raw = digest_list(dataset.content) if digest_list else None
                if raw is None:
                    raise RunError(f"the digest list of the dataset at {root} (nasq:digests:{dataset.content[:16]}...) "
                                   "is not in Redis (expired, or flushed): resubmit the run")
                src.attach(raw, dataset.content)
                src.cache = self.host_cache  # entries are named by the digests: only with them
            elif src.fingerprint != dataset.fingerprint:
                raise RunError(f"the dataset at {root} on {socket.gethostname()} differs from the one the run was "
                               f"submitted with (fingerprint {src.fingerprint} vs {dataset.fingerprint}): its files "
                               "changed since, or this worker sees other files; every worker must see the same files")
            if len(self._sources) >= 8:
                self._sources.pop(next(iter(self._sources)))
            self._sources[(root, want)] = cached = (stamp, src, want)
        return cached[1]

    def labels_for(self, path: str | None, sha256: str | None = None) -> dict[str, int] | None:
        """The label file's table, checked against the run's ``sha256`` of it.

        Raises:
            RunError: the file changed since the run was submitted.
        """
        if path is None:
            return None
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        if self._labels is None or self._labels[0] != key:
            self._labels = (key, file_digest(path), read_labels(path))
        _same("label file", path, sha256, self._labels[1])
        return self._labels[2]


def _pinned(weights: str) -> str:
    """The file a run pins by its sha256: the weights, or an artifact's meta.json."""
    return os.path.join(weights, "meta.json") if os.path.isdir(weights) else weights


def _pinned_digest(model: ModelRef) -> str | None:
    path = _pinned(model.weights)
    return file_digest(path) if model.sha256 and os.path.isfile(path) else None


def check_artifact(folder: str) -> None:
    """An artifact's files hold the bytes its meta.json records (each read and hashed: once
    per process and artifact, when it is loaded).

    Raises:
        RunError: naming the first file that does not; it is not used.
    """
    meta = read_json(os.path.join(folder, "meta.json"))
    if not isinstance(meta, dict):
        return  # not one of nasq's artifacts (a folder given as --weights): its backend checks it
    bad = verify_files(folder, meta.get("files") or {})
    if bad:
        name, why = next(iter(bad.items()))
        raise RunError(f"{os.path.join(folder, name)} does not match the artifact's meta.json ({why}): it was changed "
                       "after it was built and is not used. Submit the run again: the client moves the artifact aside "
                       "and has the build queue build it again")


def _same(what: str, path: str, expected: str | None, actual: str | None) -> None:
    if expected and actual and expected != actual:
        raise RunError(f"the {what} {path} changed since the run was submitted (sha256 {expected[:12]}... then, "
                       f"{actual[:12]}... now); rerun with the file as it is now, or restore it")


def _stamp(root: str) -> tuple:
    """What changes when a dataset folder's listing does: the folder's mtime (a file added,
    removed or renamed) and that of its u8 index."""
    if root.startswith("index:"):
        return (root,)
    out = []
    for path in (root, os.path.join(root, U8_INDEX)):
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)
