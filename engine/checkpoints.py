"""Prequantized checkpoints: a pipeline directory whose transformer (and, if chosen, T5) holds FP8
weights, written once by `quantize --out DIR` and loaded with `--model DIR` without the bf16 weights
ever being materialised, on the GPU or anywhere else.

The directory is what diffusers' `save_pretrained` writes, in safetensors only (no pickles): each
quantized component's config.json carries its torchao quantization config, so a plain
`FluxKontextPipeline.from_pretrained(DIR, use_safetensors=True)` reads the FP8 tensors as they are.
`prequantized.json` beside it records the format, the source, the load-scope knobs and the package
versions that wrote it: torchao's serialized tensors are versioned, so a load with other versions
is warned about, and a format this machine cannot run is refused before anything is read.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

import torch

from patches import installed_version
from stages.environment import Environment
from stages.tensors import has_quantized_weights
from stages.text_encoder_fp8 import text_encoder_fp8_config
from stages.transformer_fp8 import checkpoint_config, format_of, has_fp8_gemms

from .loading import ModelLoadError

log = logging.getLogger(__name__)

MANIFEST = "prequantized.json"
RECORDED_PACKAGES = ("torch", "torchao", "diffusers", "transformers", "safetensors")
# While a checkpoint is made, the transformer and text encoders stay in host memory (quantized where
# they were built or read): writing one needs no GPU memory budget.
WRITING_KNOBS = {"transformer_fp8": "auto", "transformer_offload": True, "text_encoders": "cpu"}


def save_prequantized(pipe, out_dir: Path, source: str, knobs: dict) -> dict:
    """Write `pipe` (transformer already FP8) to `out_dir` as a prequantized checkpoint; returns the manifest."""
    fmt = format_of(pipe.transformer)
    if fmt is None:
        raise ValueError("the transformer has no FP8 weights to save: load the model with transformer_fp8 on")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty: give a new directory to --out")
    _describe_for_saving(pipe.transformer, fmt)
    t5_fp8 = has_quantized_weights(pipe.text_encoder_2)
    if t5_fp8:
        _describe_t5_for_saving(pipe.text_encoder_2)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    pickles = sorted(str(path.relative_to(out_dir)) for path in out_dir.rglob("*") if path.suffix in (".bin", ".pt", ".pkl"))
    if pickles:
        raise RuntimeError(f"save_pretrained wrote pickled weights {pickles}; refusing a checkpoint that is not pure safetensors")
    manifest = {
        "format": fmt,
        "components": {"transformer": f"fp8 {fmt}", "text_encoder_2": "fp8 weight_only" if t5_fp8 else "as loaded"},
        "source": source,
        "knobs": knobs,
        "versions": {name: installed_version(name) for name in RECORDED_PACKAGES},
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(model: str) -> dict | None:
    path = Path(model).expanduser() / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_usable(model: str, env: Environment) -> list[str]:
    """Refuse, before reading any weights, a prequantized checkpoint this machine cannot run; return
    warnings about package versions that differ from the ones that wrote it."""
    manifest = read_manifest(model)
    if manifest is None:
        return []
    if manifest["format"] == "rowwise" and not has_fp8_gemms(env):
        where = f"{env.gpu.name} has compute capability {'.'.join(map(str, env.compute_capability))}" if env.has_cuda else "this is a CPU"
        raise ModelLoadError(
            f"{model} holds FP8 row-wise weights for FP8 GEMMs, which need compute capability 8.9+ ({where}). Run "
            f"`flux_kontext_optimized.py quantize --model <the bf16 model> --out DIR` on this machine: it writes FP8 "
            "weight-only weights, which run here."
        )
    differing = {
        name: (recorded, installed_version(name))
        for name, recorded in manifest.get("versions", {}).items()
        if recorded is not None and installed_version(name) != recorded
    }
    return [f"{model} was written with {name} {was}; this machine has {now}" for name, (was, now) in differing.items()]


def _describe_for_saving(transformer: torch.nn.Module, fmt: str) -> None:
    """diffusers flattens torchao tensors into safetensors (and records the config) only for a model
    that carries a quantizer: one quantized in place has none yet."""
    if getattr(transformer, "hf_quantizer", None) is not None:
        return
    from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer

    config = checkpoint_config(fmt)
    transformer.hf_quantizer = TorchAoHfQuantizer(config, pre_quantized=False)
    transformer.hf_quantizer.validate_environment()  # sets the flags save_pretrained reads
    transformer.register_to_config(quantization_config=config)


def _describe_t5_for_saving(text_encoder: torch.nn.Module) -> None:
    """The same for transformers' T5 (quantized in place by stages/text_encoder_fp8.py)."""
    if getattr(text_encoder, "hf_quantizer", None) is not None:
        return
    import transformers
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    config = transformers.TorchAoConfig(text_encoder_fp8_config())
    text_encoder.hf_quantizer = TorchAoHfQuantizer(config, pre_quantized=False)
    text_encoder.config.quantization_config = config
