"""Request and response models of the HTTP API.

The bounds here are hard limits that hold on every server (they also keep generated requests, such
as schemathesis', from asking for absurd work); each server can tighten them further
(`serve --max-size/--max-steps/--max-pixels/--max-images`), checked when the request arrives.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from engine.lora_settings import LoraMode
from engine.requests import DEFAULT_GUIDANCE
from stages.config import LEGACY_FLAGS, USER_FIELDS, OptimizationConfig

MAX_PROMPT_CHARS = 2000  # T5 reads 512 tokens (~2000 characters of English); CLIP reads 77 of them
HARD_MAX_STEPS = 100
HARD_MAX_IMAGES = 8
OutputFormat = Literal["png", "jpeg", "webp"]
SIZE_PATTERN = r"^\s*(auto|\d{1,5}\s*[xX]\s*\d{1,5})?\s*$"
MAX_LORA_SCALE = 8.0  # far past where adapters saturate; bounds generated requests, as the other hard limits do
HARD_MAX_LORAS = 8  # adapters named in one request; each server allows at most its --lora-slots
# Sizes have no upper bound here: each server checks its own (serve --max-size) and names it.


def _no_bool(cls, value: Any) -> Any:
    """JSON true is not the number 1."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def check_text(value: str | None) -> str | None:
    if value is None:
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def check_prompt(value: str) -> str:
    if not check_text(value).strip():
        raise ValueError("must not be blank")
    return value


def _optional(field):
    annotation = field.annotation
    for item in field.metadata:  # keep the bounds (ge/le) but not the knob declaration
        annotation = Annotated[annotation, item]
    return Optional[annotation], Field(None, description=field.description)


# Every user-facing OptimizationConfig field, optional: a field left out keeps the server's default.
# Generated from the config, so that a new knob shows up in the API without an edit here.
Optimizations = create_model(
    "Optimizations",
    __config__=ConfigDict(
        extra="forbid", json_schema_extra={"description": "Per-request stage overrides over the server's default config."}
    ),
    **{name: _optional(OptimizationConfig.model_fields[name]) for name in USER_FIELDS},
)


def _legacy_help(name: str) -> str:
    field, flag = LEGACY_FLAGS[name]
    return f"true: {field} = {flag.on}; false: {field} = {flag.off}"


# The flat switches of the original API, generated from the knobs that declare one.
_LegacyFlags = create_model(
    "_LegacyFlags", **{name: (Optional[bool], Field(None, description=_legacy_help(name))) for name in LEGACY_FLAGS}
)


class LoraUse(BaseModel):
    """One adapter for one request (this request only: nothing carries over to the next)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, description="A loaded adapter's name (GET /v1/loras); a name, never a path.")
    scale: Optional[float] = Field(
        None,
        ge=-MAX_LORA_SCALE,
        le=MAX_LORA_SCALE,
        allow_inf_nan=False,
        description="How strongly it applies; 0 leaves the output exactly as without it. Default: the scale it was loaded with (1.0).",
    )

    _scale = field_validator("scale", mode="before")(_no_bool)


LORAS_DESCRIPTION = "LoRA adapters for this request, by name, combined as diffusers combines them (at most the server's --lora-slots)."


class InferenceRequest(_LegacyFlags):
    """POST /inference as JSON (validated strictly: true is not 1, "2" is not 2). With
    multipart/form-data the same fields are form fields (text, converted), `image` is a file and
    `optimizations` a JSON string."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        ..., min_length=1, max_length=MAX_PROMPT_CHARS, description="The edit instruction, or the description when there is no image."
    )
    image: Optional[str] = Field(
        None, description="Input image as base64 or a data: URL (PNG, JPEG, WebP, GIF, BMP, TIFF). Omit to generate from the prompt alone."
    )
    negative_prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS, description="Used with true_cfg_scale > 1.")
    width: Optional[int] = Field(
        None,
        ge=16,
        multiple_of=16,
        description="Output width (multiple of 16). Give both sizes or neither: "
        "then Kontext picks its preferred resolution closest to the input's aspect ratio.",
    )
    height: Optional[int] = Field(None, ge=16, multiple_of=16, description="Output height (multiple of 16).")
    steps: Optional[int] = Field(
        None, ge=1, le=HARD_MAX_STEPS, description="Denoising steps; default: the scheduler's (28 Euler, 14 DPM-Solver++)."
    )
    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=0.0, le=20.0, allow_inf_nan=False, description="Distilled guidance.")
    true_cfg_scale: float = Field(
        1.0,
        ge=1.0,
        le=20.0,
        allow_inf_nan=False,
        description="True CFG scale; > 1 with a negative_prompt runs two transformer passes per step.",
    )
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="Random seed; default: random, returned in the response.")
    num_images: int = Field(1, ge=1, le=HARD_MAX_IMAGES, description="Images to produce from this prompt.")
    output_format: OutputFormat = Field("png", description="Encoding of the returned images.")
    output_quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality.")
    optimizations: Optional[Optimizations] = Field(  # type: ignore[valid-type]
        None, description="Per-stage overrides over the server's default config (wins over the use_* flags)."
    )
    loras: Optional[list[LoraUse]] = Field(None, max_length=HARD_MAX_LORAS, description=LORAS_DESCRIPTION)

    _prompt = field_validator("prompt")(check_prompt)

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt(cls, value: str | None) -> str | None:
        value = check_text(value)
        return value if value and value.strip() else None

    _numbers = field_validator(
        "width", "height", "steps", "seed", "num_images", "output_quality", "guidance_scale", "true_cfg_scale", mode="before"
    )(_no_bool)

    def legacy_flags(self) -> dict[str, bool | None]:
        return {name: getattr(self, name) for name in LEGACY_FLAGS}


def _form_field(name: str, field):
    """The multipart form's view of a field: no null (leave it out instead), files and JSON as text."""
    if name == "image":
        return bytes, Field(None, json_schema_extra={"format": "binary"}, description="The input image file (or base64 text).")
    if name == "optimizations":
        return str, Field(None, description="JSON object with per-stage overrides, as in the JSON body.")
    if name == "loras":
        return str, Field(None, description='JSON list of adapters, as in the JSON body: [{"name": "style", "scale": 0.8}].')
    annotation = field.annotation
    if getattr(annotation, "__origin__", None) is typing.Union:  # Optional[X] -> X
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation, Field(
        None,
        description=field.description,
        **{
            key: getattr(item, key)
            for item in field.metadata
            for key in ("ge", "le", "multiple_of", "max_length", "min_length")
            if getattr(item, key, None) is not None
        },
    )


# POST /inference as multipart/form-data: a documentation model generated from InferenceRequest
# (the route validates a form as InferenceRequest).
InferenceForm = create_model("InferenceForm", **{name: _form_field(name, field) for name, field in InferenceRequest.model_fields.items()})


# -- responses ----------------------------------------------------------------------------------
class StageOutcome(BaseModel):
    name: str
    requested: bool
    active: bool
    detail: str = Field("", description="What ran, e.g. the quantization format.")
    reason: str = Field("", description="Why a requested stage did not run.")


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    source: str
    random_weights: bool = Field(..., description="True for tiny and synthetic-full: the outputs are noise.")
    warning: Optional[str] = None
    dtype: str
    device: str


class InferenceTimings(BaseModel):
    queue_s: float = Field(..., description="Waiting for the GPU worker.")
    input_decode_s: float
    text_encode_s: float
    vae_encode_s: float
    denoise_s: float
    median_step_s: float
    step_s: list[float]
    vae_decode_s: float
    engine_total_s: float = Field(..., description="The edit on the GPU worker, end to end.")
    variant_build_s: float = Field(..., description="> 0 when this request built its optimization variant.")
    lora_load_s: float = Field(0.0, description="> 0 when this request loaded an adapter it named on first use.")
    output_encode_s: float
    server_total_s: float = Field(..., description="Arrival to response, as measured by the server.")


class InferenceResponse(BaseModel):
    images: list[str] = Field(..., description="Base64-encoded images in output_format.")
    output_format: OutputFormat
    media_type: str
    seed: int
    width: int
    height: int
    steps: int
    scheduler: str
    timings: InferenceTimings
    active_stages: list[str]
    skipped_stages: dict[str, str] = Field(..., description="Requested stages that did not run, with the reason.")
    stages: list[StageOutcome]
    quantization: Optional[str] = Field(None, description="The low-precision format that ran, if any.")
    optimizations: dict[str, Any] = Field(..., description="The config that actually ran.")
    requested_optimizations: dict[str, Any]
    model: ModelIdentity
    variant: dict[str, Any]
    extras: dict[str, Any] = Field(default_factory=dict, description="Per-stage statistics, e.g. cache hits.")
    warnings: list[str] = Field(default_factory=list)


class ErrorDetail(BaseModel):
    type: str
    field: Optional[str] = None
    message: str
    request_id: Optional[str] = None
    details: Optional[list[dict[str, Any]]] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- OpenAI Images API ----------------------------------------------------------------------------
class OpenAIGenerationRequest(BaseModel):
    """POST /v1/images/generations (the fields FLUX can honour; other OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)  # JSON only: true is not 1, "2" is not 2

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: Optional[str] = Field(None, max_length=200, description="Accepted for compatibility; the server's model answers.")
    n: Optional[int] = Field(1, ge=1, le=HARD_MAX_IMAGES)
    size: Optional[str] = Field("auto", max_length=20, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT (multiples of 16) or auto.")
    response_format: Optional[Literal["b64_json", "url"]] = Field(
        "b64_json", description="b64_json only (url is refused: this server keeps no files)."
    )
    output_format: Optional[OutputFormat] = "png"
    output_compression: Optional[int] = Field(None, ge=0, le=100, description="Used as the JPEG/WebP quality.")
    user: Optional[str] = Field(None, max_length=500)
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="Extension: the random seed.")
    steps: Optional[int] = Field(None, ge=1, le=HARD_MAX_STEPS, description="Extension: denoising steps.")
    loras: Optional[list[LoraUse]] = Field(None, max_length=HARD_MAX_LORAS, description="Extension: " + LORAS_DESCRIPTION)

    _numbers = field_validator("n", "output_compression", "seed", "steps", mode="before")(_no_bool)

    _prompt = field_validator("prompt")(check_prompt)


class OpenAIImage(BaseModel):
    b64_json: Optional[str] = None
    url: Optional[str] = None
    revised_prompt: Optional[str] = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    output_format: OutputFormat
    size: str
    seed: int = Field(..., description="Extension: the seed used.")
    model: ModelIdentity = Field(..., description="Extension: the model that answered.")


# -- LoRA adapters --------------------------------------------------------------------------------
class LoraLoadRequest(BaseModel):
    """POST /v1/loras: load an adapter file from the server's LoRA directory."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=200, description="The file name in the LoRA directory, without .safetensors.")
    scale: float = Field(
        1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False, description="The scale for requests that name it without one."
    )


class SeedLoraRequest(BaseModel):
    """POST /lora, the original API's body. `path` names a file in the LoRA directory (a bare file name,
    or a path that resolves there); anything outside the directory is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["load", "unload"] = "load"
    name: Optional[str] = Field(None, min_length=1, max_length=200, description="The adapter's name; default: the file's name.")
    path: Optional[str] = Field(None, min_length=1, max_length=1000, description="A .safetensors file in the LoRA directory (load only).")
    scale: float = Field(
        1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False, description="The scale for requests that name it without one."
    )


class LoraInfo(BaseModel):
    name: str
    file: str
    rank: int = Field(..., description="The largest rank among its layers.")
    layers: int = Field(..., description="How many Linears it adapts.")
    targets: list[str] = Field(..., description="The adapted Linears, with block indices folded (transformer_blocks.*.attn.to_q).")
    memory_mb: float = Field(..., description="Its factors in device memory.")
    default_scale: float
    load_s: float
    ignored_keys: int = Field(..., description="Keys left aside, e.g. text-encoder LoRA weights (only the transformer is adapted).")


class LoraSwaps(BaseModel):
    count: int = Field(..., description="Requests that changed adapters: copied them into the slots, or restored and merged the weights.")
    last_ms: Optional[float] = None
    median_ms: Optional[float] = Field(None, description="Over the recent swaps.")


class LoraLibraryState(BaseModel):
    available: list[str] = Field(..., description="Adapter files in the LoRA directory, by name.")
    mode: LoraMode = Field(..., description="How adapters run (serve --lora-mode).")
    slots: int = Field(..., description="Adapters one request may combine.")
    max_rank: int
    max_mb: float
    max_loaded: int
    loaded: list[LoraInfo]
    loaded_memory_mb: float
    swaps: LoraSwaps


class LoraLoaded(BaseModel):
    loaded: LoraInfo
    replaced: bool = Field(..., description="True when an adapter of this name was loaded before (now replaced).")
    warnings: list[str] = Field(default_factory=list)


class LoraUnloaded(BaseModel):
    name: str
    unloaded: bool = True
