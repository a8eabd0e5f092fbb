"""The OpenAI Images API shape, so that the official `openai` client works unchanged:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.images.edit(image=open("in.png", "rb"), prompt="make the sky red", size="1024x1024")
    client.images.generate(prompt="a mountain at sunset", size="1024x1024")

Answers carry `b64_json` (this server keeps no files, so `response_format=url` is refused). OpenAI
fields FLUX has no use for (quality, background, style, moderation, ...) are accepted and ignored;
`mask` is refused because Kontext edits from the instruction, not a mask. `seed` and `steps` are
extensions (pass them with the client's `extra_body`).
"""

from __future__ import annotations

import base64
import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from engine import EditRequest

from .edits import PreparedEdit, check_limits, decode_input, encode_outputs, run_edit, server_timing
from .errors import invalid
from .schemas import HARD_MAX_IMAGES, HARD_MAX_STEPS, MAX_PROMPT_CHARS, SIZE_PATTERN, ErrorResponse, OpenAIGenerationRequest, OpenAIImagesResponse, OutputFormat, _check_text

router = APIRouter(prefix="/v1/images", tags=["OpenAI-compatible"])
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 422, 429, 503, 504)}


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise invalid("size", f"{size!r}: write WIDTHxHEIGHT with multiples of 16 (e.g. 1024x1024) or auto")
    return int(match.group(1)), int(match.group(2))


def _prompt(prompt: str) -> str:
    try:
        _check_text(prompt)
    except ValueError as error:
        raise invalid("prompt", str(error)) from None
    if not prompt.strip():
        raise invalid("prompt", "must not be blank")
    return prompt


async def _answer(request: Request, service, prepared: PreparedEdit, arrived: float) -> JSONResponse:
    check_limits(service, prepared.edit, prepared.config, size_fields=("size", "size"), images_field="n")
    result, job = await run_edit(service, request, prepared, arrived)
    blobs, encode_s = await encode_outputs(result, prepared.output_format, prepared.quality)
    total_s = time.monotonic() - arrived
    body = OpenAIImagesResponse(
        created=int(time.time()),
        data=[{"b64_json": base64.b64encode(blob).decode("ascii")} for blob in blobs],
        output_format=prepared.output_format,
        size=f"{result.width}x{result.height}",
        seed=result.seed,
        model=result.model,
    )
    headers = {"Server-Timing": server_timing(job.queue_s, result, prepared.decode_s, encode_s, total_s), "X-Seed": str(result.seed)}
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), headers=headers)


def _prepared(service, edit: EditRequest, output_format: str, compression: int | None, decode_s: float = 0.0, notes: list[str] | None = None) -> PreparedEdit:
    config = service.engine.default_config
    quality = min(100, max(1, compression)) if compression is not None else 90
    return PreparedEdit(edit=edit, config=config, requested=config, output_format=output_format, quality=quality, warnings=notes or [], decode_s=decode_s)


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
    size: Annotated[str, Form(max_length=20, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT or auto (Kontext picks from the input's aspect ratio).")] = "auto",
    response_format: Annotated[Literal["b64_json", "url"], Form()] = "b64_json",
    output_format: Annotated[OutputFormat, Form()] = "png",
    output_compression: Annotated[int, Form(ge=0, le=100, description="Used as the JPEG/WebP quality.")] = None,
    seed: Annotated[int, Form(ge=0, le=2**32 - 1, description="Extension: the random seed.")] = None,
    steps: Annotated[int, Form(ge=1, le=HARD_MAX_STEPS, description="Extension: denoising steps.")] = None,
    user: Annotated[str, Form(max_length=500)] = None,
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
    width, height = _size(size)
    decoded, decode_s = await decode_input(service, await files[0].read())
    edit = EditRequest(prompt=_prompt(prompt), image=decoded.image, width=width, height=height, steps=steps, seed=seed, num_images=n)
    return await _answer(request, service, _prepared(service, edit, output_format or "png", output_compression, decode_s, decoded.notes), arrived)


@router.post("/generations", summary="Generate an image from text (OpenAI Images API shape)", response_model=OpenAIImagesResponse, responses=_ERRORS)
async def images_generations(request: Request, body: OpenAIGenerationRequest):
    arrived = time.monotonic()
    service = request.app.state.service
    service.require_ready()
    _refuse_url(body.response_format)
    width, height = _size(body.size)
    edit = EditRequest(prompt=_prompt(body.prompt), width=width, height=height, steps=body.steps, seed=body.seed, num_images=body.n or 1)
    return await _answer(request, service, _prepared(service, edit, body.output_format or "png", body.output_compression), arrived)
