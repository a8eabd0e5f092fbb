"""The engine's request and result types (transport-neutral: the CLI and HTTP both build these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from stages.base import StageReport
from stages.config import OptimizationConfig

from .timing import Timings

DEFAULT_GUIDANCE = 2.5  # FLUX.1-Kontext-dev's recommended distilled guidance


class BuildInProgress(Exception):
    """An edit that would record CUDA graphs, asked not to wait for a build beside the serving thread
    (engine.records_cuda_graphs), found one running: nothing was run."""


class EditCancelled(Exception):
    """`should_stop` asked the edit to stop; raised at the next step boundary. (Here, not in engine.py,
    so that the service catches it without importing diffusers.)"""


@dataclass(frozen=True)
class LoraChoice:
    """An adapter a request runs with, by name (never a path)."""

    name: str
    scale: float | None = None  # None: the scale the adapter was loaded with (1.0 unless given)

    @classmethod
    def parse(cls, text: str) -> "LoraChoice":
        """NAME or NAME:SCALE, as the command line writes it."""
        name, colon, scale = text.rpartition(":") if ":" in text else (text, "", "")
        try:
            return cls(name, float(scale) if colon else None)
        except ValueError:
            raise ValueError(f"--lora {text!r}: write NAME or NAME:SCALE, e.g. style:0.8") from None


@dataclass
class EditRequest:
    prompt: str
    image: Image.Image | None = None  # None: Kontext generates from the text alone
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    max_area: int | None = None  # pixel budget when width/height are not given
    steps: int | None = None  # None: the scheduler's default (28 Euler, 14 DPM-Solver++, 20 UniPC)
    guidance_scale: float = DEFAULT_GUIDANCE
    true_cfg_scale: float = 1.0  # > 1 with a negative prompt runs true CFG (two transformer calls per step)
    seed: int | None = None  # None: a random seed, reported back
    num_images: int = 1
    loras: tuple[LoraChoice, ...] = ()  # adapters for this request only; nothing carries over to the next


@dataclass
class EditResult:
    images: list[Image.Image]
    seed: int
    width: int
    height: int
    steps: int
    scheduler: str
    timings: Timings
    stages: tuple[StageReport, ...]
    config: OptimizationConfig  # what actually ran
    model: dict
    variant: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # per-stage statistics (e.g. cache hits)
    warnings: list[str] = field(default_factory=list)  # how what ran differs from what was asked, beyond skipped stages

    @property
    def active_stages(self) -> list[str]:
        return [report.name for report in self.stages if report.active]

    @property
    def skipped_stages(self) -> dict[str, str]:
        """Requested stages that did not run, with the reason."""
        return {report.name: report.reason for report in self.stages if report.requested and not report.active}

    def metadata(self) -> dict:
        """Everything but the pixels, JSON-ready."""
        return {
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "scheduler": self.scheduler,
            "timings": self.timings.as_dict(),
            "active_stages": self.active_stages,
            "stages": [report.as_dict() for report in self.stages],
            "skipped_stages": self.skipped_stages,
            "optimizations": self.config.model_dump(),
            "model": self.model,
            "variant": self.variant,
            **self.extras,
        }
