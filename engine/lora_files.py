"""Adapter files: from a name to validated per-module LoRA factors, without touching any model.

    path = adapter_path(directory, "style")                 # names only; never outside the directory
    tensors, metadata = read_safetensors(path, max_bytes)   # header checked before a byte of data is read
    modules, ignored = to_factors(tensors, metadata)        # any layout diffusers loads, alpha folded in
    check_against(modules, linear_shapes(transformer), max_rank)

Only safetensors: the header is parsed here (length, JSON, dtypes, and data offsets that add up to
the file size, which catches truncation), so a pickle is never unpickled (diffusers' own loader
falls back to torch.load). Conversion uses diffusers' own steps, as `FluxKontextPipeline.load_lora_weights`
runs them (kohya sd-scripts, ComfyUI, xlabs, fal Kontext and diffusers/peft layouts; network alphas
or the saved LoraConfig; rank and alpha patterns), so an adapter computes what diffusers computes.
The shape check matters: diffusers zero-pads an A with too few inputs and, with too many, replaces
the base layer itself.
"""

from __future__ import annotations

import json
import os
import re
import struct

import torch

from stages.lora_weights import LoraFactors, lora_places

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
FACTOR_DTYPES = {"F32", "F16", "BF16"}
SCALAR_DTYPES = {"F64", "I64", "I32"}  # some trainers store alpha this way
UNSUPPORTED_KEYS = ("lora_magnitude_vector", "dora_scale", ".lokr_", "lora_B.bias", "norm_q", "norm_k", "norm_added_q", "norm_added_k")


class LoraError(ValueError):
    """An adapter, a name or a request's adapter list was refused; nothing was changed. `status` is
    the HTTP answer and `field` the request field at fault, when there is one."""

    def __init__(self, message: str, status: int = 422, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


# -- names and paths ----------------------------------------------------------------------------
def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise LoraError(
            f"{name!r} is not an adapter name: use 1-64 letters, digits, '.', '_' or '-' (the file name without {SUFFIX}; never a path)"
        )
    return name


def adapter_path(directory: str | os.PathLike, file_name: str) -> str:
    """The adapter file `file_name` (with or without .safetensors) directly inside `directory`;
    refused when it is a path, or when it resolves (through a symbolic link) anywhere else."""
    stem = file_name[: -len(SUFFIX)] if file_name.endswith(SUFFIX) else file_name
    check_name(stem)
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, stem + SUFFIX))
    if os.path.dirname(path) != root:
        raise LoraError(f"adapter {stem!r} resolves outside the LoRA directory")
    if not os.path.isfile(path):
        raise LoraError(f"no adapter file {stem}{SUFFIX} in the server's LoRA directory", status=404)
    return path


def file_in_directory(directory: str | os.PathLike, path: str) -> str:
    """A client's `path` (the seed API's /lora) as a file name inside `directory`: a bare file name,
    or a path that resolves to a file directly inside it. Anything else is refused."""
    root = os.path.realpath(directory)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise LoraError("path must name a .safetensors file in the LoRA directory")
    resolved = os.path.realpath(os.path.join(root, os.path.expanduser(path)))
    if os.path.dirname(resolved) != root:
        raise LoraError(f"path {path!r} is outside the server's LoRA directory; copy the file there and name it")
    if not resolved.endswith(SUFFIX):
        raise LoraError(f"path {path!r}: only {SUFFIX} files are loaded")
    return os.path.basename(resolved)


def available_files(directory: str | os.PathLike) -> list[str]:
    """Adapter names in `directory`: *.safetensors files whose stems are valid names."""
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        stem = entry[: -len(SUFFIX)]
        if entry.endswith(SUFFIX) and NAME_PATTERN.match(stem) and ".." not in stem and os.path.isfile(os.path.join(directory, entry)):
            names.append(stem)
    return names


# -- reading --------------------------------------------------------------------------------------
def read_safetensors(path: str, max_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, after checking its size and header."""
    import safetensors.torch

    size = os.path.getsize(path)
    if size > max_bytes:
        raise LoraError(f"the file is {size / 2**20:.1f} MB, over this server's {max_bytes / 2**20:g} MB limit (serve --lora-max-mb)")
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise LoraError("not a safetensors file (shorter than its 8-byte header length)")
        (header_bytes,) = struct.unpack("<Q", head)
        if header_bytes > min(size - 8, MAX_HEADER_BYTES):
            raise LoraError("not a safetensors file (its header length does not fit the file)")
        try:
            header = json.loads(handle.read(header_bytes))
        except (ValueError, UnicodeDecodeError):
            raise LoraError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoraError("not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for key, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in FACTOR_DTYPES | SCALAR_DTYPES:
            raise LoraError(f"tensor {key!r} has dtype {dtype!r}; LoRA factors are F32, F16 or BF16")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            raise LoraError(f"tensor {key!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + header_bytes + end != size:
        raise LoraError(f"the file is truncated or padded: its header describes {8 + header_bytes + end} bytes, the file has {size}")
    try:
        return safetensors.torch.load_file(path, device="cpu"), metadata
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise LoraError(f"unreadable safetensors file: {error}") from None


# -- converting -------------------------------------------------------------------------------------
def to_factors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict[str, LoraFactors], list[str]]:
    """{unfused module name: factors (fp32, alpha/rank folded into B)} and the keys left aside
    (text-encoder LoRAs: this service adapts the transformer only)."""
    from diffusers import FluxKontextPipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key  # how peft itself reads rank and alpha patterns

    unsupported = next((key for key in tensors if any(part in key for part in UNSUPPORTED_KEYS)), None)
    if unsupported:
        raise LoraError(f"{unsupported}: DoRA, LoKr, LoRA biases and Control-LoRA norms are not supported")
    try:
        state, alphas = FluxKontextPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    except Exception as error:  # noqa: BLE001 - the converters raise ValueError, KeyError, AssertionError ...
        raise LoraError(f"not a FLUX LoRA layout diffusers can convert ({type(error).__name__}: {error})") from None
    ignored = sorted(key for key in state if not key.startswith("transformer."))
    state = {key.removeprefix("transformer."): value for key, value in state.items() if key.startswith("transformer.")}
    if not state:
        raise LoraError("the file has no transformer LoRA weights")
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    saved_config = None
    if LORA_ADAPTER_METADATA_KEY in metadata:
        try:
            everything = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
        except ValueError:
            raise LoraError(f"its {LORA_ADAPTER_METADATA_KEY} metadata is not JSON") from None
        saved_config = {k.removeprefix("transformer."): v for k, v in everything.items() if k.startswith("transformer.")} or None
    alphas = {k.removeprefix("transformer."): v for k, v in (alphas or {}).items() if k.startswith("transformer.")} or None
    ranks = {f"^{key}": value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim == 2}
    if not ranks:
        raise LoraError("the file has no LoRA up (B) matrices")
    try:
        config = _create_lora_config(state, None if saved_config else alphas, saved_config, ranks)
    except Exception as error:  # noqa: BLE001
        raise LoraError(f"its LoRA configuration cannot be derived ({error})") from None
    if config.use_dora or config.lora_bias:
        raise LoraError("its saved configuration asks for DoRA or LoRA biases, which are not supported")

    modules: dict[str, LoraFactors] = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise LoraError(f"unsupported key {key!r} (expected only lora_A/lora_B weights)")
            continue
        module = key.removesuffix(".lora_A.weight")
        down, up = state[key], state.get(f"{module}.lora_B.weight")
        if up is None or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{module}: lora_A and lora_B are missing or do not chain (A {tuple(down.shape)}, B {_shape(up)})")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / (rank**0.5 if config.use_rslora else rank)
        down, up = down.float(), up.float() * scaling
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraError(f"{module}: the weights hold NaN or infinite values")
        modules[module] = LoraFactors(down.contiguous(), up.contiguous())
    if len(modules) * 2 != len(state):
        raise LoraError("some lora_B matrices have no lora_A")
    return modules, ignored


def _shape(tensor: torch.Tensor | None):
    return None if tensor is None else tuple(tensor.shape)


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear by unfused diffusers name (a fused projection answers for its parts)."""
    return {
        name: (layer.out_features if part is None else layer.out_features // 3, layer.in_features)
        for name, (layer, part) in lora_places(transformer).items()
    }


def check_against(modules: dict[str, LoraFactors], shapes: dict[str, tuple[int, int]], max_rank: int) -> None:
    for module, factors in modules.items():
        expected = shapes.get(module)
        if expected is None:
            raise LoraError(f"it targets {module!r}, which is not a Linear of this model")
        found = (factors.up.shape[0], factors.down.shape[1])
        if found != expected:
            raise LoraError(f"{module}: the LoRA maps {found[1]} -> {found[0]} features, the model's layer {expected[1]} -> {expected[0]}")
        if factors.down.shape[0] > max_rank:
            raise LoraError(f"{module}: rank {factors.down.shape[0]} is over this server's maximum {max_rank} (serve --lora-max-rank)")
