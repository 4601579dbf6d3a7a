"""Installed package versions, for provenance (reports, build metadata)."""
from __future__ import annotations


def package_versions(names, *, missing: str = "absent") -> dict[str, str]:
    """name -> installed version (``missing`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = missing
    return out
