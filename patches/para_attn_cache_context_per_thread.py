"""para-attn's first-block cache context, one per thread.

Written for para-attn 0.3.38. para-attn keeps the request's cache context (the residuals it compares
and the skip threshold) in one module global, `_current_cache_context`, set by `utils.cache_context`
around a transformer call. The service runs a variant's warm-up edit on a build thread while the
GPU worker's thread runs requests (service/builds.py): with one global, each would read and
overwrite the other's residuals. Importing this module gives each thread its own current context
(a threading.local), through the three functions that touch it; every other para-attn function
reaches the context through `get_current_cache_context`, looked up in the module at call time.
On an unknown para-attn version it raises PatchVersionError instead of patching.
"""

from __future__ import annotations

import contextlib
import threading

from . import require_known_version

KNOWN_PARA_ATTN = ("0.3.38",)
_local = threading.local()


def get_current_cache_context():
    return getattr(_local, "context", None)


def set_current_cache_context(cache_context=None):
    _local.context = cache_context


@contextlib.contextmanager
def cache_context(cache_context):
    outer = get_current_cache_context()
    _local.context = cache_context
    try:
        yield
    finally:
        _local.context = outer


def apply() -> str:
    """Patch para-attn (idempotent); returns the para-attn version patched."""
    version = require_known_version("para-attn", KNOWN_PARA_ATTN, __name__)
    from para_attn.first_block_cache import utils

    if utils.get_current_cache_context is not get_current_cache_context:
        utils.get_current_cache_context = get_current_cache_context
        utils.set_current_cache_context = set_current_cache_context
        utils.cache_context = cache_context
    return version


apply()
