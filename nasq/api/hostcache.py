"""The host cache from the command line: stage a dataset on this host before its runs
(``warm_host_cache``, MLPerf's "the dataset staged on each host before timing"), and see what
it holds (``host_cache_info``)."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..config import Settings, load_settings
from ..errors import NasqError


@dataclass
class CacheInfo:
    root: str
    bound_gb: float
    entries: int
    bytes: int


def _cache_of(settings: Settings):
    """This host's cache (``data.hostcache.HostCache``) as ``settings`` name it."""
    from ..data.hostcache import HostCache

    cache = HostCache.for_settings(settings)
    if cache is None:
        raise NasqError("the host cache is off here (host_cache_gb = 0): set host_cache_gb and host_cache_dir")
    return cache


def host_cache_info(*, settings: Settings | None = None) -> CacheInfo:
    """What this host's cache holds (a sweep first: stale temporary files go, and it is brought
    within its bound)."""
    settings = settings or load_settings()
    cache = _cache_of(settings)
    out = cache.sweep()
    if out.get("skipped"):  # another process sweeps it now
        out = {"entries": 0, "bytes": 0}
    return CacheInfo(cache.root, settings.host_cache_gb, out["entries"], out["bytes"])


def warm_host_cache(*, data: str, settings: Settings | None = None, progress: bool = True, log=print) -> dict:
    """Read every image of ``data`` once into this host's cache (each file's bytes, or each crop
    of u8 shards, named by its sha256), so that the runs of this host's workers read the shared
    storage no more. Returns the images kept and read.

    Raises:
        NasqError: no host cache here, or no such dataset.
    """
    from tqdm import tqdm

    from ..data.digests import cache_for, file_digests
    from ..data.sources import open_source

    settings = settings or load_settings()
    cache = _cache_of(settings)
    source = open_source(data)
    if source.kind == "index":
        raise NasqError("an index dataset has no images to keep")
    source.with_digests(file_digests(source, cache_for(source.root, settings.artifact_dir), log=log))
    source.cache = cache
    for i in tqdm(range(len(source)), unit="img", desc="host cache", file=sys.stderr, disable=not progress):
        if i in source.known_errors or source.digests[i] is None:
            continue
        if source.kind == "u8":
            source.load(i)
        else:
            source.read(i)
    counts = source.counts()
    log(f"{source.root}: {counts['images_from_source']} images read into {cache.root}, "
        f"{counts['images_from_cache']} were there already")
    return counts
