"""Load a Kontext pipeline from one of three sources chosen by a single `--model` value:

    a Hugging Face repo id or a local directory   FluxKontextPipeline.from_pretrained
    "tiny"                                        built in code, random weights, runs on a CPU
    "synthetic-full"                              the real architecture, random weights, built on the GPU

Every failure a user can fix (no token, license not accepted, no network, wrong directory) becomes a
ModelLoadError whose message says what to do.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FluxKontextPipeline

from .model_builders import TINY_TRANSFORMER_CONFIG, build_synthetic_full_pipeline, build_tiny_pipeline
from .model_specs import HUB_DEFAULT, MODEL_ENV_VAR, SYNTHETIC_FULL, TINY, ModelSpec

log = logging.getLogger(__name__)

FULL_MAX_AREA = 1024 * 1024
TINY_MAX_AREA = 256 * 256


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message tells the user what to do next."""


@dataclass
class LoadedModel:
    pipe: FluxKontextPipeline
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)  # what load-scope stages changed (T5 precision)


def default_model_name(device: str) -> str:
    """--model default: the env var, else the real model on a GPU and the tiny one on a CPU."""
    return os.environ.get(MODEL_ENV_VAR) or (HUB_DEFAULT if device.startswith("cuda") else TINY)


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 is FLUX's native precision on GPUs; CPUs run the tiny model in fp32, where bf16 is slow.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: str, device: str) -> LoadedModel:
    device_obj = torch.device(device)
    dtype = compute_dtype(device_obj)
    start = time.perf_counter()
    if name == TINY:
        pipe = build_tiny_pipeline(dtype=dtype, device=device)
        spec = ModelSpec(TINY, TINY, random_weights=True, default_max_area=TINY_MAX_AREA, snap_input_to_kontext_resolutions=False)
    elif name == SYNTHETIC_FULL:
        if device_obj.type != "cuda":
            raise ModelLoadError(
                "synthetic-full is the 12B architecture built directly on a GPU in bf16; this machine runs on the CPU. "
                "Use --model tiny here, or run on a CUDA machine."
            )
        pipe = build_synthetic_full_pipeline(device=device, dtype=dtype)
        spec = ModelSpec(
            SYNTHETIC_FULL, SYNTHETIC_FULL, random_weights=True, default_max_area=FULL_MAX_AREA, snap_input_to_kontext_resolutions=True
        )
    else:
        pipe, spec = _load_pretrained(name, dtype)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedModel(pipe, spec, device_obj, dtype)
    log.info("%s loaded in %.1f s", name, time.perf_counter() - start)
    if spec.warning:
        log.warning("=" * 78)
        log.warning("MODEL %s: %s", spec.name, spec.warning)
        log.warning("=" * 78)
    return loaded


def _load_pretrained(name: str, dtype: torch.dtype) -> tuple[FluxKontextPipeline, ModelSpec]:
    local = Path(name).expanduser()
    is_local = local.exists()
    if not is_local and ("/" not in name or name.startswith((".", "/", "~"))):
        raise ModelLoadError(
            f"--model {name!r} is neither a directory nor a Hugging Face repo id (owner/name). "
            f"Use a repo id such as {HUB_DEFAULT}, a directory written by save_pretrained, 'tiny' or 'synthetic-full'."
        )
    if is_local and not (local / "model_index.json").exists():
        raise ModelLoadError(f"{local} has no model_index.json: point --model at a directory written by save_pretrained.")
    token = os.environ.get("HF_TOKEN") or None
    try:
        pipe = FluxKontextPipeline.from_pretrained(
            str(local) if is_local else name, torch_dtype=dtype, token=token, local_files_only=is_local
        )
    except (OSError, ValueError) as error:  # hub errors are OSErrors; diffusers wraps them in more OSErrors
        raise ModelLoadError(_explain_load_failure(name, token, error)) from error
    spec = ModelSpec(
        name, "local" if is_local else "hub", random_weights=False, default_max_area=FULL_MAX_AREA, snap_input_to_kontext_resolutions=True
    )
    if is_local:
        spec = _maybe_mark_tiny_copy(local, spec)
    return pipe, spec


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _explain_load_failure(name: str, token: str | None, error: BaseException) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    causes = list(_causes(error))
    if any(isinstance(c, GatedRepoError) for c in causes):
        return (
            f"{name} is gated. Accept its license at https://huggingface.co/{name} with your account, then "
            "export HF_TOKEN=<a read token from https://huggingface.co/settings/tokens> and start again "
            f"({'HF_TOKEN is set but was refused' if token else 'HF_TOKEN is not set'})."
        )
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        return f"{name} was not found on the Hugging Face Hub: check the spelling, or set HF_TOKEN for a private repo."
    if any(isinstance(c, ConnectionError) for c in causes) or "not fully cached" in str(error):
        return (
            f"{name} is not in the local Hugging Face cache and the Hub could not be reached. Connect to the "
            "network (with HF_TOKEN set: FLUX.1-Kontext-dev is gated) or pass a local directory to --model. "
            "To try the service without weights, use --model tiny."
        )
    return f"could not load {name}: {error}. Check the path or repo id, and HF_TOKEN for gated models."


def _maybe_mark_tiny_copy(directory: Path, spec: ModelSpec) -> ModelSpec:
    """A saved copy of the tiny model is still random weights: keep saying so after a round trip.

    The tiny architecture exists only in this project, with random weights, so its config identifies it.
    """
    import json

    config = json.loads((directory / "transformer" / "config.json").read_text())
    if all(
        config.get(key) == list(value) if isinstance(value, tuple) else config.get(key) == value
        for key, value in TINY_TRANSFORMER_CONFIG.items()
    ):
        return ModelSpec(spec.name, "local", random_weights=True, default_max_area=TINY_MAX_AREA, snap_input_to_kontext_resolutions=False)
    return spec
