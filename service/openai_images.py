"""The OpenAI Images API shape, so that the official `openai` client works unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.images.edit(image=open("in.png", "rb"), prompt="make the sky red", size="1024x1024")
    client.images.generate(prompt="a mountain at sunset", size="1024x1024")

Answers carry `b64_json` (this server keeps no files, so `response_format=url` is refused). OpenAI
fields FLUX has no use for (quality, background, style, moderation, ...) are accepted and ignored;
`mask` is refused because Kontext edits from the instruction, not a mask. `seed`, `steps` and
`loras` are extensions (pass them with the client's `extra_body`; in the edits form `loras` is a
JSON string).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError

from .edits import OPENAI_FIELD_NAMES, encode_outputs, json_response, prepare, run_edit, server_timing
from .errors import APIError, from_pydantic, invalid
from .images import base64_text
from .inference import json_form_field
from .schemas import (
    HARD_MAX_IMAGES,
    HARD_MAX_STEPS,
    MAX_PROMPT_CHARS,
    SIZE_PATTERN,
    ErrorResponse,
    InferenceRequest,
    OpenAIGenerationRequest,
    OpenAIImagesResponse,
    OutputFormat,
)

router = APIRouter(prefix="/v1/images", tags=["OpenAI-compatible"])
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 415, 422, 429, 503, 504)}


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise invalid("size", f"{size!r}: write WIDTHxHEIGHT with multiples of 16 (e.g. 1024x1024) or auto")
    width, height = int(match.group(1)), int(match.group(2))
    if width % 16 or height % 16 or min(width, height) < 16:
        raise invalid("size", f"{size!r}: both sides must be multiples of 16 (e.g. 1024x1024)")
    return width, height


def _as_inference_request(
    prompt: str,
    size: str | None,
    n: int | None,
    steps: int | None,
    seed: int | None,
    output_format: str | None,
    compression: int | None,
    loras: list | None = None,
) -> InferenceRequest:
    """The OpenAI fields in the shape every editing endpoint shares (service/edits.py:prepare)."""
    width, height = _size(size)
    fields = {
        "prompt": prompt,
        "width": width,
        "height": height,
        "num_images": n or 1,
        "steps": steps,
        "seed": seed,
        "output_format": output_format or "png",
        "loras": loras,
    }
    if compression is not None:
        fields["output_quality"] = min(100, max(1, compression))
    try:
        return InferenceRequest.model_validate(fields)
    except ValidationError as error:
        raise from_pydantic(error) from None


async def _answer(request: Request, body: InferenceRequest, image: bytes | None, arrived: float) -> Response:
    service = request.app.state.service
    prepared = await prepare(service, body, image, OPENAI_FIELD_NAMES)
    result, job = await run_edit(service, request, prepared, arrived)
    blobs, encode_s = await encode_outputs(result, prepared.output_format, prepared.quality)
    total_s = time.monotonic() - arrived
    response = OpenAIImagesResponse(
        created=int(time.time()),
        data=[{"b64_json": base64_text(blob)} for blob in blobs],
        output_format=prepared.output_format,
        size=f"{result.width}x{result.height}",
        seed=result.seed,
        model=result.model,
    )
    headers = {"Server-Timing": server_timing(job.queue_s, result, prepared.decode_s, encode_s, total_s), "X-Seed": str(result.seed)}
    return json_response(response, headers, exclude_none=True)


def require_json(request: Request) -> None:
    """A JSON-only route: anything else is a 415 (FastAPI would call it an invalid body). Dependencies
    run before the body is validated."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        problem = f"Content-Type {content_type or '(none)'} is not accepted; send application/json"
        raise APIError(415, "unsupported_media_type", problem, field="Content-Type")


def require_form(request: Request) -> None:
    """The edits route takes a multipart form, as OpenAI's does: a JSON body would otherwise be read
    as an empty form and answered "prompt: required"."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        problem = f"Content-Type {content_type or '(none)'} is not accepted; send multipart/form-data (the image as a file)"
        raise APIError(415, "unsupported_media_type", problem, field="Content-Type")


def _refuse_url(response_format: str | None) -> None:
    if response_format == "url":
        raise invalid("response_format", "url is not supported (this server stores no images); use b64_json")


@router.post("/edits", summary="Edit an image (OpenAI Images API shape)", response_model=OpenAIImagesResponse, responses=_ERRORS)
async def images_edits(
    request: Request,
    prompt: Annotated[str, Form(min_length=1, max_length=MAX_PROMPT_CHARS, description="The edit instruction.")],
    image: Annotated[list[UploadFile], File(description="The image to edit (one; Kontext edits a single image).")] = None,
    image_array: Annotated[list[UploadFile], File(alias="image[]", description="The same, as the client sends a list.")] = None,
    mask: Annotated[UploadFile, File(description="Refused: Kontext edits from the instruction, not a mask.")] = None,
    model: Annotated[str, Form(max_length=200, description="Accepted for compatibility; the server's model answers.")] = None,
    n: Annotated[int, Form(ge=1, le=HARD_MAX_IMAGES)] = 1,
    size: Annotated[
        str, Form(max_length=20, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT or auto (Kontext picks from the input's aspect ratio).")
    ] = "auto",
    response_format: Annotated[Literal["b64_json", "url"], Form()] = "b64_json",
    output_format: Annotated[OutputFormat, Form()] = "png",
    output_compression: Annotated[int, Form(ge=0, le=100, description="Used as the JPEG/WebP quality.")] = None,
    seed: Annotated[int, Form(ge=0, le=2**32 - 1, description="Extension: the random seed.")] = None,
    steps: Annotated[int, Form(ge=1, le=HARD_MAX_STEPS, description="Extension: denoising steps.")] = None,
    loras: Annotated[
        str, Form(max_length=20000, description='Extension: LoRA adapters as a JSON list, e.g. [{"name": "style", "scale": 0.8}].')
    ] = None,
    user: Annotated[str, Form(max_length=500)] = None,
    _form: None = Depends(require_form),
):
    arrived = time.monotonic()
    service = request.app.state.service
    service.require_ready()
    _refuse_url(response_format)
    if mask is not None:
        raise invalid("mask", "not supported: FLUX.1-Kontext edits from the instruction; describe the region in the prompt")
    files = (image or []) + (image_array or [])
    if not files:
        raise invalid("image", "required: send the image to edit as a multipart file")
    if len(files) > 1:
        raise invalid("image", f"{len(files)} images given; FLUX.1-Kontext edits one image per request")
    adapters = json_form_field("loras", loras) if loras is not None else None
    body = _as_inference_request(prompt, size, n, steps, seed, output_format, output_compression, adapters)
    return await _answer(request, body, await files[0].read(), arrived)


@router.post(
    "/generations", summary="Generate an image from text (OpenAI Images API shape)", response_model=OpenAIImagesResponse, responses=_ERRORS
)
async def images_generations(request: Request, body: OpenAIGenerationRequest, _json: None = Depends(require_json)):
    arrived = time.monotonic()
    service = request.app.state.service
    service.require_ready()
    _refuse_url(body.response_format)
    loras = [use.model_dump() for use in body.loras] if body.loras is not None else None
    inference = _as_inference_request(
        body.prompt, body.size, body.n, body.steps, body.seed, body.output_format, body.output_compression, loras
    )
    return await _answer(request, inference, None, arrived)
