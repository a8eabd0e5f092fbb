"""A request's optimization config: the server's default, then the original API's flat `use_*`
flags, then the structured `optimizations` object, then the server's policy.

A stage this machine cannot run is not an error: the engine switches it off and the response says
why (the README's first curl asks for FA3, MXFP4 and CUDA graphs and succeeds on a CPU that has
none of them); the engine also holds load-scope knobs at what the model was loaded with. What the
server's policy forbids (build-time stages under --no-per-request-variants) is dropped here, with a
warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from stages.config import KNOBS, ConflictingFlags, OptimizationConfig, legacy_changes
from stages.registry import get_stage

from .errors import from_pydantic, invalid

FIXED_VARIANT = (
    "this server runs a fixed optimization variant (serve --no-per-request-variants); build-time stages follow the server's defaults"
)


@dataclass
class MergedConfig:
    config: OptimizationConfig  # what the engine is asked to run
    requested: OptimizationConfig  # what the request asked for, before the server's policy
    warnings: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # stage -> why the server's policy switched it off


def merge(default: OptimizationConfig, flags: dict[str, bool | None], overrides: dict, per_request_variants: bool) -> MergedConfig:
    try:
        changes = {**legacy_changes(flags), **overrides}
    except ConflictingFlags as conflict:
        raise invalid(conflict.flag, str(conflict)) from None
    try:
        requested = default.with_changes(**changes)
    except ValidationError as error:  # the request models validate each value; combinations end here
        raise from_pydantic(error, ("optimizations",)) from None
    merged = MergedConfig(requested, requested)
    for name, value in changes.items():
        if value == getattr(default, name) or KNOBS[name].scope != "variant" or per_request_variants:
            continue
        merged.warnings.append(f"{name}={value!r} ignored: {FIXED_VARIANT}")
        stage = get_stage(KNOBS[name].stage)
        if stage.is_requested(requested):  # asked for a stage that will not run: report it as skipped
            merged.ignored[stage.name] = FIXED_VARIANT
        merged.config = merged.config.with_changes(**{name: getattr(default, name)})
    return merged
