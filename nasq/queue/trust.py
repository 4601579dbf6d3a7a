"""Which run records a worker may act on by itself.

Healing, ``nasq resume`` and the merge act on a run's record in Redis, not on a message: they
send its shards again, merge its results, write its report. With message signing on, Redis is
not trusted (whoever can write to it is who signing keeps out), so a record counts only if its
manifest came signed by the submitting client, with the same keys and the same serializer as
the messages (Celery's ``auth``); the signed manifest then replaces the plain one. Without
signing, the plain manifest is used, as messages are.
"""
from __future__ import annotations

import logging

from kombu.serialization import dumps, loads

from ..errors import NasqError
from ..rundata import RunManifest
from ..wire import MessageError

log = logging.getLogger("nasq.trust")

_TYPE, _ENCODING = "application/data", "utf-8"


class UntrustedRecord(NasqError):
    """A run record that is not signed by a trusted certificate while signing is on, or that is
    malformed."""


class ManifestTrust:
    """``seal(manifest)`` for the submitting client; ``manifest(store, run_id)`` for whoever
    acts on a record."""

    def __init__(self, app):
        self.signing = app.conf.task_serializer == "auth"
        self._refused: set[str] = set()

    def seal(self, manifest: RunManifest) -> str | None:
        """The manifest signed with this process's key (None without signing)."""
        if not self.signing:
            return None
        content_type, _, payload = dumps(manifest.to_payload(), serializer="auth")
        assert content_type == _TYPE, content_type
        return payload.decode() if isinstance(payload, bytes) else payload

    def manifest(self, store, run_id: str) -> RunManifest | None:
        """The run's manifest, if it may be acted on; None if there is no such run.

        Raises:
            UntrustedRecord: signing is on and the record is not signed by a trusted certificate,
                or is signed for another run; or the record is malformed (the field is named).
        """
        if not self.signing:
            try:
                return store.runs.manifest(run_id)
            except MessageError as e:
                raise self._refuse(run_id, f"its manifest is malformed: {e}") from None
        sealed = store.runs.sealed_manifest(run_id)
        if sealed is None:
            if not store.runs.has_run(run_id):
                return None
            raise self._refuse(run_id, "its manifest is not signed (submitted by a client without the signing key, "
                                       "or written into Redis by hand)")
        try:
            manifest = loads(sealed, _TYPE, _ENCODING, accept=[_TYPE])
        except Exception as e:  # noqa: BLE001 - the serializer raises SecurityError, ValueError, ...
            raise self._refuse(run_id, f"its manifest's signature does not verify ({type(e).__name__})") from None
        try:
            manifest = RunManifest.from_payload(manifest)
        except MessageError as e:
            raise self._refuse(run_id, f"its signed manifest is malformed: {e}") from None
        if manifest.run_id != run_id:
            raise self._refuse(run_id, "its signed manifest is another run's")
        return manifest

    def _refuse(self, run_id: str, why: str) -> UntrustedRecord:
        signed = ("; message signing is on, so only runs submitted by a client with a trusted certificate are "
                  "healed, resumed or merged") if self.signing else ""
        if run_id not in self._refused:  # once per process and run: healing asks every few seconds
            self._refused.add(run_id)
            log.warning("run %s: refused to act on its record in Redis: %s%s", run_id, why, signed)
        return UntrustedRecord(f"run {run_id}: {why}" + ("; with message signing on, only runs submitted by a client "
                                                         "with a trusted certificate are acted on" if signed else ""))
