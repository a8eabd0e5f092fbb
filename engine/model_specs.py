"""What kind of model is loaded, and how the rest of the system must present it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

HUB_DEFAULT = "black-forest-labs/FLUX.1-Kontext-dev"
MODEL_ENV_VAR = "FLUX_KONTEXT_MODEL"
TINY = "tiny"
SYNTHETIC_FULL = "synthetic-full"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message tells the user what to do next. (Here, beside the
    specs, so that the command line catches it without importing torch and diffusers.)"""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what was asked for: a hub id, a directory, "tiny" or "synthetic-full"
    source: str  # "hub", "local", "tiny", "synthetic-full"
    random_weights: bool
    default_max_area: int  # output pixels when the request gives no size
    snap_input_to_kontext_resolutions: bool  # diffusers' _auto_resize: the input image is resized to ~1 MP

    @property
    def warning(self) -> str | None:
        if self.source == SYNTHETIC_FULL:
            return (
                "synthetic-full has the real FLUX.1-Kontext-dev architecture with RANDOM weights: "
                "its outputs are noise, it exists only to measure speed"
            )
        if self.random_weights:
            return "this model has RANDOM weights: outputs are noise, useful only for testing the service"
        return None

    def as_dict(self) -> dict:
        return {**asdict(self), "warning": self.warning}
