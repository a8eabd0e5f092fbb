"""Runtime compatibility fixes for installed packages.

Each fix lives in its own module, names the upstream versions it was written for, checks the
installed version before touching anything, and fails loudly (PatchVersionError) on a version it
does not know, instead of patching code it has never seen. Installed files are never edited.
"""

from __future__ import annotations

import functools
import importlib.metadata


class PatchVersionError(RuntimeError):
    """The installed package is a version this patch was not written for."""


@functools.cache  # read from the package metadata on disk (a millisecond); stages ask on every resolve
def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_known_version(distribution: str, known: tuple[str, ...], patch: str) -> str:
    return _require_known(distribution, installed_version(distribution), known, patch)


def require_known_torch(version: str | None, known: tuple[str, ...], patch: str) -> str:
    """The installed torch `version` without its local build suffix (+cu130, which does not change
    torch's Python code), if `patch` was written for it. The caller reads the version, so that a test
    can stand in another one."""
    return _require_known("torch", (version or "").split("+")[0] or None, known, patch)


def _require_known(distribution: str, version: str | None, known: tuple[str, ...], patch: str) -> str:
    if version not in known:
        raise PatchVersionError(
            f"{patch} was written for {distribution} {', '.join(known)}, but {version or 'no version'} is installed. "
            f"Install a known version (see requirements.txt) or review the patch for this version before adding it."
        )
    return version
