"""Per-request optimization overrides: the flat `use_*` flags of the original API and the structured
`optimizations` object, merged over the server's default config.

Precedence: server default < flat flags < `optimizations`. A stage this machine cannot run is not an
error: the engine switches it off and the response says why (the verbatim curl of the README asks
for FA3, MXFP4 and CUDA graphs and succeeds on a CPU that has none of them).
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import ConfigDict, Field, create_model

from engine import OptimizationConfig
from engine.config import BUILD_FIELDS

from .errors import invalid

try:  # another stage issue adds the validated best solver; until then DPM-Solver++ 2M Karras
    from stages.scheduler import BEST_SOLVER_AT_14_STEPS
except ImportError:  # pragma: no cover - depends on the scheduler issue
    BEST_SOLVER_AT_14_STEPS = "dpmpp_2m_karras"

OPTIMIZATION_FIELDS: tuple[str, ...] = tuple(OptimizationConfig.model_fields)

# Which stage (as named in responses and /health) each config field belongs to.
FIELD_STAGE = {
    "compile": "compile",
    "fuse_qkv": "fuse_qkv",
    "channels_last": "channels_last",
    "fast_gelu": "fast_gelu",
    "first_block_cache": "first_block_cache",
    "cache_threshold": "first_block_cache",
    "cache_backend": "first_block_cache",
    "attention": "attention",
    "quantization": "quantization",
    "scheduler": "scheduler",
    "steps": "scheduler",
    "cuda_graphs": "cuda_graphs",
}


def _optional(field):
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return Optional[annotation], Field(None, description=field.description)


# Every OptimizationConfig field, optional: a field left out keeps the server's default. Built from
# the config itself so that a new stage field or scheduler name shows up here without an edit.
Optimizations = create_model(
    "Optimizations",
    __config__=ConfigDict(extra="forbid", json_schema_extra={"description": "Per-request stage overrides over the server's default config."}),
    **{name: _optional(field) for name, field in OptimizationConfig.model_fields.items()},
)

# The original API's flat switches: name -> (config field, value when true, value when false).
LEGACY_FLAGS: dict[str, tuple[str, object, object]] = {
    "use_flash_attention": ("attention", "fa3", "sdpa"),
    "use_mxfp4": ("quantization", "auto", "none"),  # "auto": the best native format of this GPU
    "use_fp8": ("quantization", "fp8", "none"),
    "use_dpm_solver": ("scheduler", BEST_SOLVER_AT_14_STEPS, "euler"),
    "use_cuda_graphs": ("cuda_graphs", True, False),
    "use_compile": ("compile", True, False),
    "use_first_block_cache": ("first_block_cache", True, False),
    "use_qkv_fusion": ("fuse_qkv", True, False),
    "use_channels_last": ("channels_last", True, False),
}

LEGACY_FLAG_HELP = {
    "use_flash_attention": "attention = fa3 (FlashAttention 3); false: sdpa",
    "use_mxfp4": "quantization = auto (the best native low-precision format of this GPU; the response says which ran); false: none",
    "use_fp8": "quantization = fp8; false: none",
    "use_dpm_solver": f"scheduler = {BEST_SOLVER_AT_14_STEPS} (14 steps by default); false: euler",
    "use_cuda_graphs": "cuda_graphs",
    "use_compile": "compile (Inductor; the first request per shape compiles)",
    "use_first_block_cache": "first_block_cache",
    "use_qkv_fusion": "fuse_qkv",
    "use_channels_last": "channels_last",
}


def legacy_changes(flags: dict[str, bool | None]) -> dict:
    """Config changes from the flat flags that were given (None = not given)."""
    given = {name: value for name, value in flags.items() if value is not None}
    if given.get("use_fp8") and given.get("use_mxfp4"):
        raise invalid("use_fp8", "use_fp8 and use_mxfp4 both pick a quantization format; set only one")
    changes: dict = {}
    for name, value in given.items():
        field, on, off = LEGACY_FLAGS[name]
        if value:
            changes[field] = on
        else:
            changes.setdefault(field, off)  # a true flag for the same field wins over a false one
    return changes


def merge(default: OptimizationConfig, flags: dict[str, bool | None], overrides: dict, per_request_variants: bool) -> tuple[OptimizationConfig, OptimizationConfig, list[str], dict[str, str]]:
    """(config to run, config asked for, warnings, {stage: why the server's policy ignored it})."""
    changes = {**legacy_changes(flags), **overrides}
    requested = default.with_changes(**changes)
    warnings: list[str] = []
    ignored: dict[str, str] = {}
    if not per_request_variants:
        for name in [name for name in changes if name in BUILD_FIELDS and changes[name] != getattr(default, name)]:
            value = changes.pop(name)
            stage = FIELD_STAGE.get(name, name)
            why = "this server runs a fixed optimization variant (serve --no-per-request-variants); build-time stages follow the server's defaults"
            warnings.append(f"{name}={value!r} ignored: {why}")
            if value not in (False, "none", "sdpa"):
                ignored[stage] = why
    try:
        config = default.with_changes(**changes)
        config = OptimizationConfig.model_validate(config.model_dump())
    except ValueError as error:  # pragma: no cover - the request models validate every value first
        raise invalid("optimizations", str(error)) from None
    return config, requested, warnings, ignored
