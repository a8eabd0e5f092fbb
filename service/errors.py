"""One error shape for every failure, and the handlers that make sure nothing else reaches a client.

    {"error": {"type": "invalid_request", "field": "width", "message": "width: ...", "details": [...],
               "request_id": "..."}}

`type` is stable and machine-readable, `field` names the offending input (dotted for nested
fields, "body" for the body as a whole, null when no single input is at fault), `message` is for
people. Validation errors list every problem in `details`. Unexpected exceptions are logged with
their traceback under the request id and answered with a 500 that carries no internals.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from stages.config import USER_FIELDS

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; never sent, only counted

log = logging.getLogger("flux_kontext.service")

_TYPES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "body_timeout",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


class APIError(StarletteHTTPException):
    """An error with a type, the field at fault and a message; raised anywhere in request handling."""

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.error_type = error_type
        self.message = message
        self.field = field
        self.extra = extra or {}


def invalid(field: str, problem: str, error_type: str = "invalid_request") -> APIError:
    """A 422 for one field: `invalid("width", "must be a multiple of 16")`."""
    return APIError(422, error_type, f"{field}: {problem}", field=field)


def from_lora_error(error) -> APIError:
    """An adapter refused by the engine's LoRA library (engine/lora_files.py LoraError): 404 for a
    missing file or adapter, 409 for a full library, 422 for everything else, naming the problem."""
    error_type = {404: "not_found", 409: "conflict"}.get(error.status, "invalid_lora")
    message = f"{error.field}: {error}" if error.field else str(error)
    return APIError(error.status, error_type, message, field=error.field)


def error_body(error_type: str, message: str, field: str | None = None, request_id: str | None = None, **extra) -> dict:
    return {"error": {"type": error_type, "field": field, "message": message, **extra, "request_id": request_id}}


def error_response(
    request: Request, status_code: int, error_type: str, message: str, field: str | None = None, headers=None, **extra
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(error_body(error_type, message, field, request_id, **extra), status_code=status_code, headers=headers)


# -- validation errors --------------------------------------------------------------------------
_LOCATION_PREFIXES = {"body", "query", "path", "header", "cookie", "form"}


def field_name(location: Iterable) -> str:
    parts = list(location)
    if parts and parts[0] in _LOCATION_PREFIXES:
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or "body"


def _problem(error: dict, field: str) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        name = field.rsplit(".", 1)[-1]
        parent = field.rsplit(".", 1)[0] if "." in field else None
        if parent == "optimizations":
            known = ", ".join(USER_FIELDS)
            return f"unknown optimization {name!r}; known: {known} (request settings such as steps go at the top level)"
        return f"unknown field {name!r}"
    if kind == "missing":
        return "required"
    if kind == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def validation_details(errors: Iterable[dict], prefix: tuple = ()) -> list[dict]:
    details = []
    for error in errors:
        field = field_name(prefix + tuple(error.get("loc", ())))
        details.append({"field": field, "message": f"{field}: {_problem(error, field)}", "type": error.get("type")})
    return details


def validation_error(errors: Iterable[dict], prefix: tuple = ()) -> APIError:
    """A pydantic error list as one APIError: 400 for malformed JSON, 422 for everything else."""
    details = validation_details(errors, prefix)
    if not details:
        return APIError(422, "invalid_request", "invalid request", field="body")
    if any(detail["type"] == "json_invalid" for detail in details):
        first = next(detail for detail in details if detail["type"] == "json_invalid")
        return APIError(400, "invalid_json", first["message"].replace("body: ", "", 1), field="body", extra={"details": details})
    message = "; ".join(detail["message"] for detail in details[:5]) + (f" (and {len(details) - 5} more)" if len(details) > 5 else "")
    return APIError(422, "invalid_request", message, field=details[0]["field"], extra={"details": details})


def from_pydantic(error: ValidationError, prefix: tuple = ()) -> APIError:
    return validation_error(error.errors(include_url=False, include_input=False), prefix)


# -- handlers -----------------------------------------------------------------------------------
def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.status_code, exc.error_type, exc.message, exc.field, exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        error_type = _TYPES_BY_STATUS.get(status, "client_error" if status < 500 else "server_error")
        message, field = str(exc.detail), None
        if status == 413:
            message, field = f"the request body is over the {max_body_bytes / 2**20:g} MB limit (serve --max-body-mb)", "body"
        elif status == 404:
            message = f"no endpoint at {request.url.path}; see /docs"
        elif status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif status == 400:  # Starlette's multipart parser and FastAPI's body reader
            field = "body"
            if "parsing the body" in message:
                message = "the body could not be parsed (malformed multipart or form data)"
        return error_response(request, status, error_type, message, field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        error = validation_error(exc.errors())
        return error_response(request, error.status_code, error.error_type, error.message, error.field, **error.extra)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        # The client closed the connection while sending its body: nobody will read an answer, and
        # it is not the server's fault. The status only reaches the logs and /metrics.
        log.info(
            "client disconnected during %s %s (request %s)", request.method, request.url.path, getattr(request.state, "request_id", None)
        )
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", None)
        log.error("unhandled error in %s %s (request %s)", request.method, request.url.path, request_id, exc_info=exc)
        return error_response(request, 500, "internal_error", f"internal error; it was logged under request id {request_id}")
