"""Versions of the software that produced a result, recorded in every result's provenance."""

from __future__ import annotations

import functools
import platform
from importlib import metadata


@functools.cache
def software_versions() -> dict[str, str]:
    """Installed versions of smoothcert and the packages a certificate depends on."""
    versions = {"python": platform.python_version()}
    for dist in ("smoothcert", "torch", "numpy", "scipy", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
