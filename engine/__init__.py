"""The Kontext editing engine: model loading, optimization variants, and the edit call."""

__version__ = "0.1.0"

from .config import OptimizationConfig  # noqa: E402
from .engine import EditCancelled, KontextEngine  # noqa: E402
from .loading import ModelLoadError  # noqa: E402
from .requests import EditRequest, EditResult  # noqa: E402

__all__ = ["__version__", "EditCancelled", "EditRequest", "EditResult", "KontextEngine", "ModelLoadError", "OptimizationConfig"]
