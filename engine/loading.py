"""Load a Kontext pipeline from one of three sources chosen by a single `--model` value:

    a Hugging Face repo id or a local directory   FluxKontextPipeline.from_pretrained
    "tiny"                                        built in code, random weights, runs on a CPU
    "synthetic-full"                              the real architecture, random weights, built on the GPU

`LoadSettings` (from the load-scope knobs the memory plan sets) says which components a checkpoint
should deliver in FP8 and which stay in host memory. Checkpoints are read into host memory, FP8
components quantized Linear by Linear as they are read (diffusers' and transformers' torchao
configs), components already quantized in the checkpoint read as they are; then only the components
that live on the GPU are moved there, so bf16 weights of FP8 components never reach it. Models built
in code are built as before; the load stages (stages/, Phase.LOAD) then quantize and place them.

Every failure a user can fix (no token, license not accepted, no network, wrong directory) becomes a
ModelLoadError whose message says what to do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FluxKontextPipeline

from stages.config import OptimizationConfig

from .model_builders import TINY_TRANSFORMER_CONFIG, build_synthetic_full_pipeline, build_tiny_pipeline
from .model_specs import HUB_DEFAULT, MODEL_ENV_VAR, SYNTHETIC_FULL, TINY, ModelLoadError, ModelSpec

log = logging.getLogger(__name__)

FULL_MAX_AREA = 1024 * 1024
TINY_MAX_AREA = 256 * 256
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


@dataclass
class LoadedModel:
    pipe: FluxKontextPipeline
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)  # what loading and the load stages did (precision, placement)
    prequantized: frozenset[str] = frozenset()  # components the checkpoint held quantized, read as they were


@dataclass(frozen=True)
class LoadSettings:
    """What the load-scope knobs ask of the loader."""

    transformer_fp8: str = "off"  # the resolved format a checkpoint's transformer is quantized to while read
    t5_fp8: bool = False
    host_components: frozenset[str] = frozenset()  # stay in host memory (offloaded, or encoding on the CPU)

    @classmethod
    def from_config(cls, effective: OptimizationConfig) -> "LoadSettings":
        host = set()
        if effective.transformer_offload:
            host.add("transformer")
        if effective.text_encoders != "resident":
            host.update(("text_encoder", "text_encoder_2"))
        return cls(effective.transformer_fp8, effective.t5_fp8, frozenset(host))


def default_model_name(device: str) -> str:
    """--model default: the env var, else the real model on a GPU and the tiny one on a CPU."""
    return os.environ.get(MODEL_ENV_VAR) or (HUB_DEFAULT if device.startswith("cuda") else TINY)


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 is FLUX's native precision on GPUs; CPUs run the tiny model in fp32, where bf16 is slow.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(name: str, device: str, settings: LoadSettings = LoadSettings()) -> LoadedModel:
    device_obj = torch.device(device)
    prequantized: frozenset[str] = frozenset()
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
        try:
            pipe = build_synthetic_full_pipeline(device=device, dtype=dtype)
        except torch.OutOfMemoryError as error:
            raise ModelLoadError(
                "synthetic-full is built in bf16 on the GPU (about 32 GiB) before the memory plan shrinks it, and this GPU has "
                "too little free memory. On a larger GPU, run `quantize --model synthetic-full --out DIR`, then use --model DIR here."
            ) from error
        spec = ModelSpec(
            SYNTHETIC_FULL, SYNTHETIC_FULL, random_weights=True, default_max_area=FULL_MAX_AREA, snap_input_to_kontext_resolutions=True
        )
    else:
        pipe, spec, prequantized = _load_pretrained(name, dtype, settings)
        for component in COMPONENTS:
            if component not in settings.host_components:
                getattr(pipe, component).to(device)
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedModel(pipe, spec, device_obj, dtype, prequantized=prequantized)
    if prequantized:
        loaded.notes.append(f"read prequantized from the checkpoint: {', '.join(sorted(prequantized))}")
    log.info("%s loaded in %.1f s", name, time.perf_counter() - start)
    if spec.warning:
        log.warning("=" * 78)
        log.warning("MODEL %s: %s", spec.name, spec.warning)
        log.warning("=" * 78)
    return loaded


def _load_pretrained(name: str, dtype: torch.dtype, settings: LoadSettings) -> tuple[FluxKontextPipeline, ModelSpec, frozenset[str]]:
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
    prequantized = quantized_components(local) if is_local else frozenset()
    # use_safetensors: without it diffusers falls back to pickled .bin files silently
    options = dict(torch_dtype=dtype, token=token, local_files_only=is_local, use_safetensors=True)
    quantize_while_reading = _quantization_mapping(settings, prequantized)
    if quantize_while_reading:
        from diffusers import PipelineQuantizationConfig

        options["quantization_config"] = PipelineQuantizationConfig(quant_mapping=quantize_while_reading)
    try:
        pipe = FluxKontextPipeline.from_pretrained(str(local) if is_local else name, **options)
    except (OSError, ValueError) as error:  # hub errors are OSErrors; diffusers wraps them in more OSErrors
        raise ModelLoadError(_explain_load_failure(name, token, error)) from error
    spec = ModelSpec(
        name, "local" if is_local else "hub", random_weights=False, default_max_area=FULL_MAX_AREA, snap_input_to_kontext_resolutions=True
    )
    if is_local:
        spec = _maybe_mark_tiny_copy(local, spec)
    return pipe, spec, prequantized


def quantized_components(directory: Path) -> frozenset[str]:
    """Components whose saved config carries a quantization config (prequantized by anyone, not only us)."""
    return frozenset(
        config.parent.name for config in directory.glob("*/config.json") if "quantization_config" in json.loads(config.read_text())
    )


def _quantization_mapping(settings: LoadSettings, prequantized: frozenset[str]) -> dict:
    """Per component, the torchao config that quantizes it Linear by Linear while it is read."""
    mapping = {}
    if settings.transformer_fp8 != "off" and "transformer" not in prequantized:
        from stages.transformer_fp8 import checkpoint_config

        mapping["transformer"] = checkpoint_config(settings.transformer_fp8)
    if settings.t5_fp8 and "text_encoder_2" not in prequantized:
        import transformers

        from stages.text_encoder_fp8 import text_encoder_fp8_config

        mapping["text_encoder_2"] = transformers.TorchAoConfig(text_encoder_fp8_config())
    return mapping


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
    config = json.loads((directory / "transformer" / "config.json").read_text())
    if all(
        config.get(key) == list(value) if isinstance(value, tuple) else config.get(key) == value
        for key, value in TINY_TRANSFORMER_CONFIG.items()
    ):
        return ModelSpec(spec.name, "local", random_weights=True, default_max_area=TINY_MAX_AREA, snap_input_to_kontext_resolutions=False)
    return spec
