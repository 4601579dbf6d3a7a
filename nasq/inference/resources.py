"""What a worker process keeps between tasks: the loaded model, dataset listings, labels."""
from __future__ import annotations

import logging
import os
import socket
import time

from .. import backends
from ..config import BackendOptions
from ..data.labels import read_labels
from ..data.sources import Source, open_source
from ..errors import RunError
from ..model.spec import ModelRef

log = logging.getLogger("nasq.worker")


class DeviceResources:
    """One loaded backend on ``device`` (reloaded when a task asks for another model or
    options), dataset listings checked against the fingerprint a run was submitted with, and
    the last label file read."""

    def __init__(self, device: str):
        self.device = device
        self.backend: backends.Backend | None = None
        self._backend_key: tuple | None = None
        self._sources: dict[str, Source] = {}
        self._labels: tuple[tuple, dict] | None = None
        #: seconds the last ``backend_for`` spent loading (0 when the model was already loaded)
        self.last_load_s = 0.0

    def backend_for(self, name: str, model: ModelRef, batch_size: int, options: BackendOptions) -> backends.Backend:
        # the mtime: a checkpoint rewritten in place is loaded again
        key = (name, model.weights, os.path.getmtime(model.weights), model.num_outputs, options,
               batch_size if backends.backend_class(name).load_per_batch_size else None)
        self.last_load_s = 0.0
        if self._backend_key != key:
            self.drop_backend()  # stays empty if the load below fails
            t = time.perf_counter()
            b = backends.create(name, self.device)
            b.load(model, batch_size=batch_size, options=options)
            self.last_load_s = time.perf_counter() - t
            log.info("loaded %s on %s in %.1f s", model.weights, self.device, self.last_load_s)
            self.backend, self._backend_key = b, key
        return self.backend

    def drop_backend(self) -> None:
        """Release the device (after an out-of-memory error, or before loading another model)."""
        if self.backend is not None:
            self.backend.close()
        self.backend, self._backend_key = None, None

    def source_for(self, root: str, fingerprint: str) -> Source:
        src = self._sources.get(root)
        if src is None or src.fingerprint != fingerprint:
            src = open_source(root)
            if src.fingerprint != fingerprint:
                raise RunError(f"the dataset at {root} on {socket.gethostname()} differs from the one the run was "
                               f"submitted with (fingerprint {src.fingerprint} vs {fingerprint}); every worker must "
                               "see the same files")
            self._sources[root] = src
        return src

    def labels_for(self, path: str | None) -> dict[str, int] | None:
        if path is None:
            return None
        key = (path, os.path.getmtime(path))
        if self._labels is None or self._labels[0] != key:
            self._labels = (key, read_labels(path))
        return self._labels[1]
