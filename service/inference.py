"""POST /inference: JSON (image as base64 or a data: URL) or multipart/form-data (image as a file).

Answers JSON with base64 images and everything about the run (seed, timings, stages that ran and
why the others did not, the model's identity), or the raw image when the client's Accept prefers
image/* (one image only; the metadata then travels in X-* headers and Server-Timing).
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from engine.requests import EditResult

from .edits import PreparedEdit, encode_outputs, json_response, negotiate, prepare, run_edit, run_warnings, server_timing
from .errors import APIError, from_pydantic, invalid
from .images import MEDIA_TYPES, base64_text, bytes_from_text
from .schemas import ErrorResponse, InferenceRequest, InferenceResponse

router = APIRouter()

_ERRORS = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in {
        400: "malformed JSON or multipart body",
        401: "missing or wrong API key (when the server has one)",
        406: "raw image asked for with num_images > 1",
        413: "body over the size cap",
        408: "the body did not arrive within the body timeout",
        415: "neither JSON nor a form, or a compressed body",
        422: "a field is invalid; `error.field` names it",
        429: "queue full; retry after Retry-After seconds",
        503: "loading, shutting down, or the GPU ran out of memory on this request",
        504: "no result within the request timeout (queued time counts)",
    }.items()
}

OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/InferenceForm"}},
        },
    }
}
IMAGE_CONTENT = {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()}


@router.post(
    "/inference",
    summary="Edit an image (or generate one from text)",
    response_model=None,
    openapi_extra=OPENAPI_BODY,
    responses={
        200: {
            "model": InferenceResponse,
            "description": "The images and the run's metadata; the raw image when Accept asks for image/*",
            "content": IMAGE_CONTENT,
        },
        **_ERRORS,
    },
)
async def inference(request: Request) -> Response:
    arrived = time.monotonic()
    service = request.app.state.service
    service.require_ready()  # before reading a possibly large body
    body, image_bytes = await _read_body(request)
    prepared = await prepare(service, body, image_bytes)
    accept = negotiate(request.headers.get("accept"))
    if accept and prepared.edit.num_images > 1:
        raise APIError(
            406,
            "not_acceptable",
            f"a raw {accept} answer carries one image; ask for num_images=1 or Accept: application/json",
            field="num_images",
        )
    output_format = prepared.output_format if accept in (None, "image/*") else accept.split("/")[1]

    result, job = await run_edit(service, request, prepared, arrived)
    blobs, encode_s = await encode_outputs(result, output_format, prepared.quality)
    total_s = time.monotonic() - arrived
    timing_header = server_timing(job.queue_s, result, prepared.decode_s, encode_s, total_s)
    if accept:
        return Response(blobs[0], media_type=MEDIA_TYPES[output_format], headers=_metadata_headers(result, timing_header))
    payload = _response(result, prepared, output_format, blobs, job.queue_s, encode_s, total_s)
    return json_response(payload, headers={"Server-Timing": timing_header, "X-Seed": str(result.seed)})


async def _read_body(request: Request) -> tuple[InferenceRequest, bytes | None]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_form(request)
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise APIError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type} is not accepted; send application/json or multipart/form-data",
            field="Content-Type",
        )
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "invalid_json", "the body is empty; send a JSON object with at least a prompt", field="body")
    try:
        body = InferenceRequest.model_validate_json(raw, strict=True)
    except ValidationError as error:
        raise from_pydantic(error) from None
    image = bytes_from_text(body.image) if body.image is not None else None  # "" is refused, never read as "no image"
    return body, image


async def _read_form(request: Request) -> tuple[InferenceRequest, bytes | None]:
    limit = request.app.state.service.settings.max_body_bytes
    form = await request.form(max_files=1, max_fields=64, max_part_size=limit)
    fields: dict[str, str] = {}
    image: bytes | None = None
    for key in form.keys():
        values = form.getlist(key)
        if len(values) > 1:
            raise invalid(key, "given more than once")
        value = values[0]
        if isinstance(value, UploadFile):
            if key != "image":
                raise invalid(key, "only the image field may be a file")
            image = await value.read()
            continue
        if key == "image":
            image = bytes_from_text(value)  # an empty field is refused: leave it out to generate from text
            continue
        if value != "":  # an empty form field means "not given"
            fields[key] = value
    for name in ("optimizations", "loras"):  # an object and a list that travel as JSON strings in a form
        if name in fields:
            fields[name] = json_form_field(name, fields[name])
    try:
        body = InferenceRequest.model_validate(fields)
    except ValidationError as error:
        raise from_pydantic(error) from None
    return body, image


def json_form_field(name: str, text: str):
    """A form field that holds JSON (`optimizations`, `loras`), parsed, or a 422 that says why not."""
    shape = "a JSON object" if name == "optimizations" else "a JSON list"
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid(name, f"must be {shape} ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise invalid(name, f"must be {shape}; this one is nested too deeply to read") from None


def _response(
    result: EditResult, prepared: PreparedEdit, output_format: str, blobs: list[bytes], queue_s: float, encode_s: float, total_s: float
) -> InferenceResponse:
    timings = result.timings
    skipped = {**result.skipped_stages, **prepared.merged.ignored}
    # FP8 weights come from the quantization stage (a variant) or from load (transformer_fp8, the memory plan)
    fp8_stages = ("quantization", "transformer_fp8")
    quantization = next((report.detail or report.name for report in result.stages if report.name in fp8_stages and report.active), None)
    payload = InferenceResponse(
        images=[base64_text(blob) for blob in blobs],
        output_format=output_format,
        media_type=MEDIA_TYPES[output_format],
        seed=result.seed,
        width=result.width,
        height=result.height,
        steps=result.steps,
        scheduler=result.scheduler,
        timings={
            "queue_s": round(queue_s, 6),
            "input_decode_s": round(prepared.decode_s, 6),
            "text_encode_s": round(timings.text_encode_s, 6),
            "vae_encode_s": round(timings.vae_encode_s, 6),
            "denoise_s": round(timings.denoise_s, 6),
            "median_step_s": round(timings.median_step_s, 6),
            "step_s": [round(step, 6) for step in timings.step_s],
            "vae_decode_s": round(timings.vae_decode_s, 6),
            "engine_total_s": round(timings.total_s, 6),
            "variant_build_s": round(timings.variant_build_s, 6),
            "lora_load_s": round(timings.lora_load_s, 6),
            "output_encode_s": round(encode_s, 6),
            "server_total_s": round(total_s, 6),
        },
        active_stages=result.active_stages,
        skipped_stages=skipped,
        stages=[report.as_dict() for report in result.stages],
        quantization=quantization,
        optimizations=result.config.model_dump(),
        requested_optimizations=prepared.merged.requested.model_dump(),
        model=result.model,
        variant=result.variant,
        extras=result.extras,
        warnings=run_warnings(result, prepared),
    )
    return payload


def _metadata_headers(result: EditResult, timing_header: str) -> dict[str, str]:
    def ascii_only(text: str) -> str:
        return text.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")

    skipped = "; ".join(f"{name}: {reason}" for name, reason in result.skipped_stages.items())
    return {
        "Server-Timing": timing_header,
        "X-Seed": str(result.seed),
        "X-Width": str(result.width),
        "X-Height": str(result.height),
        "X-Steps": str(result.steps),
        "X-Active-Stages": ",".join(result.active_stages) or "none",
        "X-Skipped-Stages": ascii_only(skipped) or "none",
        "X-Model": ascii_only(str(result.model.get("name"))),
        "X-Model-Random-Weights": "true" if result.model.get("random_weights") else "false",
    }
