"""The small interface every stage implements.

A stage declares what it needs (`Requirements`), says whether this machine meets it
(`availability`), and applies itself at one or more points of a variant's construction:

    apply_weights(transformer)   once per weight variant (QKV fusion, quantization)
    apply_vae(vae)               once per VAE variant (fusion, channels_last, compile)
    apply_execution(transformer) once per execution variant (attention kernel, cache, compile, graphs)
    apply_request(run)           on every request (scheduler, cache threshold)

`resolve` turns a requested config into the config that will actually run on this machine: a
requested stage that cannot run here is switched off (or replaced by its fallback) and the report
says why, so a request never crashes for asking too much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from engine.config import OptimizationConfig
    from engine.environment import Environment


@dataclass(frozen=True)
class Requirements:
    cuda: bool = False
    min_compute_capability: tuple[int, int] | None = None
    packages: tuple[str, ...] = ()  # import names, see engine.environment.OPTIONAL_PACKAGES

    def unmet(self, env: "Environment") -> str | None:
        """A plain-words reason this machine falls short, or None when everything is there."""
        if self.cuda and not env.has_cuda:
            return "needs a CUDA GPU; this machine has none"
        if self.min_compute_capability and env.has_cuda:
            if env.compute_capability < self.min_compute_capability:
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


class Stage:
    name: ClassVar[str]
    benchmark_stage: ClassVar[int]  # the cumulative benchmark stage that introduces it
    summary: ClassVar[str]
    requirements: ClassVar[Requirements] = Requirements()
    # Set while a stage exists only as a declared slot; its issue fills it in.
    not_implemented: ClassVar[str | None] = None
    # For stages that only work inside compiled code: the reason reported when compile is off.
    needs_compile: ClassVar[str | None] = None
    # Config fields that change what the stage builds (default: the field named like the stage).
    build_fields: ClassVar[tuple[str, ...] | None] = None

    # -- what the config asks for -------------------------------------------------------------
    def is_requested(self, config: "OptimizationConfig") -> bool:
        raise NotImplementedError

    def switched_off(self, config: "OptimizationConfig") -> "OptimizationConfig":
        raise NotImplementedError

    # -- what the machine allows ----------------------------------------------------------------
    def availability(self, env: "Environment") -> Availability:
        unmet = self.requirements.unmet(env)
        if unmet:
            return Availability(False, unmet)
        if self.not_implemented:
            return Availability(False, f"not implemented yet ({self.not_implemented})")
        return Availability(True, detail=self.describe_available(env))

    def describe_available(self, env: "Environment") -> str:
        return ""

    def resolve(self, config: "OptimizationConfig", env: "Environment") -> tuple["OptimizationConfig", StageReport]:
        """The config this stage lets run here, and the report for the response."""
        if not self.is_requested(config):
            return config, StageReport(self.name, requested=False, active=False)
        availability = self.availability(env)
        if not availability.available:
            return self.switched_off(config), StageReport(self.name, True, False, reason=availability.reason)
        if self.needs_compile and not config.compile:
            return self.switched_off(config), StageReport(self.name, True, False, reason=self.needs_compile)
        return config, StageReport(self.name, True, True, detail=self.active_detail(config, env))

    def active_detail(self, config: "OptimizationConfig", env: "Environment") -> str:
        return ""

    # -- where it acts (each a no-op unless the stage overrides it) ----------------------------
    def apply_weights(self, transformer, config: "OptimizationConfig", build) -> None:
        pass

    def apply_vae(self, vae, config: "OptimizationConfig", build) -> None:
        pass

    def apply_execution(self, transformer, config: "OptimizationConfig", build) -> None:
        pass

    def apply_request(self, run, config: "OptimizationConfig") -> None:
        pass


class FlagStage(Stage):
    """A stage switched by one boolean field of the config."""

    flag: ClassVar[str]

    def is_requested(self, config):
        return bool(getattr(config, self.flag))

    def switched_off(self, config):
        return config.with_changes(**{self.flag: False})
