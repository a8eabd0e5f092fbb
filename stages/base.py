"""The small contract every stage implements, and the typed contexts it receives.

A stage is declared once, by its Switch in stages/config.py (its name, when it is off, its preset,
its phases). Its class names that switch and adds what only code can say: what the stage needs
(`requirements`), whether this machine meets it (`availability`), and one hook per declared phase:

    LOAD          apply_load(pipe, config, build)             once, when the model loads (precision and placement
                                                              of the base components: FP8 weights, offload, tiling)
    WEIGHTS       apply_weights(transformer, config, build)   once per weight variant (fusion, quantization)
    EXECUTION     apply_execution(transformer, config, build) once per execution variant (kernels, cache, compile, graphs)
    VAE           apply_vae(vae, config, build)               once per VAE variant (fusion, channels_last, compile)
    REQUEST       apply_request(run, config)                  on every request (sampler, adapters, cache state)

`resolve` says what a requested stage will do on this machine: switched off (or replaced by its
fallback) with the reason when it cannot run, so a request never fails for asking too much. Rules
between two stages live in stages/rules.py, not here. Nothing in this package imports the
engine: the contexts below are all a stage sees of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager

import torch

from .config import DECLARATIONS, KNOBS, OptimizationConfig, Phase, StageDeclaration
from .environment import Environment

if TYPE_CHECKING:
    from .lora_merge import MergedLoras
    from .lora_weights import ScaledLora
    from .precompiled import PrecompiledFunctions

log = logging.getLogger(__name__)


@dataclass
class BuildContext:
    """What a stage may use while it builds: the machine, where the model lives, and a build log."""

    env: Environment
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    # Ahead-of-time compiled functions from a bundle made for this variant's config (stages/precompiled.py)
    precompiled: "PrecompiledFunctions | None" = None

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("build: %s", text)


@dataclass
class RequestContext:
    """Per-request state a stage may use or add to in `apply_request`."""

    transformer: torch.nn.Module  # the variant's transformer that will run
    true_cfg: bool  # two transformer calls per step (conditional and unconditional)
    output_tokens: int  # the output's latent tokens per image (an edit adds as many reference tokens)
    loras: tuple["ScaledLora", ...] = ()  # this request's adapters and scales (the engine's library picked them)
    scheduler: Any = None  # the sampler that will run: a fresh copy of the pipeline's own unless a stage sets one
    default_steps: int = 28  # steps when the request names none: FluxKontextPipeline's default, unless a stage sets them
    variant_key: tuple = ()  # the execution variant that runs (what merged LoRA weights were merged through)
    merged: "MergedLoras | None" = None  # merge mode: the adapters in the variants' shared weights now
    background: bool = False  # a variant's warm-up edit on the build thread, beside the serving thread's edits
    contexts: list[ContextManager] = field(default_factory=list)  # entered around the pipeline call
    extras: dict[str, Any] = field(default_factory=dict)  # per-stage statistics, reported in the result


@dataclass(frozen=True)
class Requirements:
    cuda: bool = False
    min_compute_capability: tuple[int, int] | None = None
    packages: tuple[str, ...] = ()  # import names, see environment.OPTIONAL_PACKAGES

    def unmet(self, env: Environment) -> str | None:
        """A plain-words reason this machine falls short, or None when everything is there."""
        if self.cuda and not env.has_cuda:
            return "needs a CUDA GPU; this machine has none"
        if self.min_compute_capability and env.has_cuda and env.compute_capability < self.min_compute_capability:
            need = ".".join(map(str, self.min_compute_capability))
            have = ".".join(map(str, env.compute_capability))
            return f"needs compute capability {need} or newer; {env.gpu.name} is {have}"
        missing = [name for name in self.packages if not env.has_package(name)]
        if missing:
            return "needs the package(s) " + ", ".join(missing) + " (run setup_flux_optimized.sh on a GPU machine)"
        return None


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # why not, in plain words; empty when available
    detail: str = ""  # what would run, e.g. "FA3 (fa3-fwd 0.0.3)"


@dataclass(frozen=True)
class StageReport:
    """What happened to one stage on one request."""

    name: str
    requested: bool
    active: bool
    detail: str = ""  # what actually ran ("fp8 e4m3 row-wise", "cuDNN SDPA fallback")
    reason: str = ""  # why a requested stage was skipped or replaced

    def as_dict(self) -> dict:
        return {"name": self.name, "requested": self.requested, "active": self.active, "detail": self.detail, "reason": self.reason}

    def switched_off(self, reason: str) -> "StageReport":
        return StageReport(self.name, self.requested, False, reason=reason)


class Stage:
    """A stage's code. Its name, off value, preset and phases come from its Switch (stages/config.py)."""

    switch: ClassVar[str]  # the config field that switches this stage on, and declares it
    title: ClassVar[str]  # a few words for tables: "Inductor compile"
    summary: ClassVar[str]  # one sentence for doctor and /health
    requirements: ClassVar[Requirements] = Requirements()

    # -- its declaration ----------------------------------------------------------------------------
    @property
    def declaration(self) -> StageDeclaration:
        return DECLARATIONS[self.switch]

    @property
    def name(self) -> str:
        return self.declaration.name

    @property
    def preset(self) -> int | None:
        return self.declaration.preset

    @property
    def phases(self) -> frozenset[Phase]:
        return self.declaration.phases

    # -- what the config asks for -------------------------------------------------------------
    def is_requested(self, config: OptimizationConfig) -> bool:
        return getattr(config, self.switch) != self.declaration.off

    def switched_off(self, config: OptimizationConfig) -> OptimizationConfig:
        return config.with_changes(**{self.switch: self.declaration.off})

    def build_key(self, config: OptimizationConfig) -> tuple:
        """The (field, value) pairs that decide what this stage builds: its variant-scope knobs."""
        return tuple((name, getattr(config, name)) for name in self.declaration.knobs if KNOBS[name].scope == "variant")

    # -- what the machine allows ----------------------------------------------------------------
    def availability(self, env: Environment) -> Availability:
        unmet = self.requirements.unmet(env)
        if unmet:
            return Availability(False, unmet)
        return Availability(True, detail=self.describe_available(env))

    def describe_available(self, env: Environment) -> str:
        return ""

    def resolve(self, config: OptimizationConfig, env: Environment) -> tuple[OptimizationConfig, StageReport]:
        """This stage alone on this machine: the config it lets run, and the report for the response."""
        if not self.is_requested(config):
            return config, StageReport(self.name, requested=False, active=False)
        availability = self.availability(env)
        if not availability.available:
            return self.switched_off(config), StageReport(self.name, True, False, reason=availability.reason)
        return config, StageReport(self.name, True, True, detail=self.active_detail(config, env))

    def active_detail(self, config: OptimizationConfig, env: Environment) -> str:
        return ""

    def unrequested_or_unmet(self, config: OptimizationConfig, env: Environment) -> tuple[OptimizationConfig, StageReport] | None:
        """The start of a `resolve` that picks a format itself rather than asking `availability`: the
        answer when this stage is not asked for or this machine lacks its requirements, else None."""
        if not self.is_requested(config):
            return config, StageReport(self.name, requested=False, active=False)
        unmet = self.requirements.unmet(env)
        if unmet:
            return self.switched_off(config), StageReport(self.name, True, False, reason=unmet)
        return None

    # -- the phases (a stage implements exactly the hooks of the phases it declares) ------------
    def apply_weights(self, transformer: torch.nn.Module, config: OptimizationConfig, build: BuildContext) -> None:
        raise NotImplementedError

    def apply_vae(self, vae: torch.nn.Module, config: OptimizationConfig, build: BuildContext) -> None:
        raise NotImplementedError

    def apply_execution(self, transformer: torch.nn.Module, config: OptimizationConfig, build: BuildContext) -> None:
        raise NotImplementedError

    def apply_load(self, pipe: Any, config: OptimizationConfig, build: BuildContext) -> None:
        """`pipe` is the base FluxKontextPipeline; what a stage changes here every variant inherits."""
        raise NotImplementedError

    def apply_request(self, run: RequestContext, config: OptimizationConfig) -> None:
        raise NotImplementedError
