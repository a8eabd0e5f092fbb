"""What this machine offers: torch build, accelerator, compute capability, free GPU memory, a C++
compiler and the optional packages.

Every machine probe lives here: stages ask this object whether their needs are met, and `doctor`
and /health print it. It is computed once per process (`current_environment()`), because probing
CUDA and importing packages is slow.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
import shutil
from dataclasses import dataclass, field

import torch

from patches import installed_version as package_version

# Import name -> distribution name, for every optional package a stage may need.
OPTIONAL_PACKAGES = {
    "torchao": "torchao",
    "fa3_fwd_interface": "fa3-fwd",
    "flash_attn_interface": "flash_attn_3",
    "para_attn": "para-attn",
    "triton": "triton",
}


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int
    free_memory_bytes: int | None = None  # when the environment was probed (before the model loads); None: unknown


@dataclass(frozen=True, eq=False)  # hashed by identity: one per process and device
class Environment:
    python: str
    torch_version: str
    torch_cuda: str | None
    device: str  # "cuda:N" or "cpu": where the engine runs
    gpu: GpuInfo | None
    packages: dict[str, str | None] = field(default_factory=dict)  # import name -> version or None
    has_cxx_compiler: bool = True  # Inductor on the CPU compiles C++
    world_size: int = 1  # processes in the torch.distributed group (torchrun), for context parallelism

    @property
    def has_cuda(self) -> bool:
        return self.gpu is not None

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        return self.gpu.compute_capability if self.gpu else None

    def has_package(self, import_name: str) -> bool:
        return self.packages.get(import_name) is not None

    def summary(self) -> dict:
        gpu = None
        if self.gpu:
            gpu = {
                "index": self.gpu.index,
                "name": self.gpu.name,
                "compute_capability": ".".join(map(str, self.gpu.compute_capability)),
                "total_memory_gb": round(self.gpu.total_memory_bytes / 2**30, 1),
                "free_memory_gb": None if self.gpu.free_memory_bytes is None else round(self.gpu.free_memory_bytes / 2**30, 1),
            }
        return {
            "python": self.python,
            "torch": self.torch_version,
            "torch_cuda": self.torch_cuda,
            "device": self.device,
            "gpu": gpu,
            "packages": dict(self.packages),
            "cxx_compiler": self.has_cxx_compiler,
            "world_size": self.world_size,
        }


def _importable_version(import_name: str, dist_name: str) -> str | None:
    try:
        if importlib.util.find_spec(import_name) is None:
            return None
    except (ImportError, ValueError):
        return None
    return package_version(dist_name) or "unknown version"


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def current_environment(device: str | None = None) -> Environment:
    device = device or default_device()
    gpu = None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for, but torch sees no CUDA GPU on this machine")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        props = torch.cuda.get_device_properties(index)
        free, _ = torch.cuda.mem_get_info(index)  # what other processes and this one's CUDA context leave
        gpu = GpuInfo(index, props.name, (props.major, props.minor), props.total_memory, free)
        device = f"cuda:{index}"
    packages = {name: _importable_version(name, dist) for name, dist in OPTIONAL_PACKAGES.items()}
    return Environment(
        python=platform.python_version(),
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        device=device,
        gpu=gpu,
        packages=packages,
        has_cxx_compiler=shutil.which("g++") is not None or shutil.which("c++") is not None,
        world_size=torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1,
    )
