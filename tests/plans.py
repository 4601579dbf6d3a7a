"""Run manifests for tests that need one without submitting a run: every field a submitted run
records, read back through ``RunManifest.from_payload`` as a stored one would be."""
from nasq.rundata import RunManifest


def run_manifest(run_id: str = "r1", shards: list[dict] | None = None, *, images: int | None = None,
                 batch_size: int = 8, backend: str = "torch", queue: str = "q", weights: str = "/w.pth",
                 dataset: dict | None = None, **fields) -> RunManifest:
    """``shards``: ``{shard_id, start, stop}`` each (default: one shard of every image);
    ``images``: the dataset's (default: up to the last shard's stop); ``fields``: any other
    field of the manifest's JSON (``created``, ``command``, ``precision``, ...)."""
    images = images or (max(s["stop"] for s in shards) if shards else 8)
    shards = shards if shards is not None else [{"shard_id": "s0", "start": 0, "stop": images}]
    return RunManifest.from_payload({
        "run_id": run_id, "queue": queue, "backend": backend, "batch_size": batch_size, "precision": None,
        "dataset": {"root": "/d", "kind": "jpeg", "fingerprint": "f", "images": images, **(dataset or {})},
        "labels": None, "model": {"weights": weights}, "shards": shards, **fields})
