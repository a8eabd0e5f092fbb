"""FastAPI app factory.

    app = create_app(loader=lambda: KontextEngine.load("tiny"), settings=ServiceSettings(queue_size=8))
    app = create_app(engine)          # an engine already loaded (tests)

Layers, outside in: CORS (only with --cors-origins), request tracking (request id, body cap, drain
gate, metrics), API key, then the routes: /inference, /v1/images/{edits,generations}, /v1/loras
(and the original /lora), /health, /ready, /metrics, /benchmark. The engine is loaded by the GPU worker when the app starts, so /health
and /ready answer during loading.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from engine import __version__

from . import inference, loras, openai_images, operations
from .auth import ApiKeyMiddleware
from .errors import install_error_handlers
from .images import set_pillow_pixel_limit
from .middleware import RequestTrackingMiddleware
from .runtime import EngineLoader, Service
from .schemas import InferenceForm, InferenceRequest
from .settings import ServiceSettings

DESCRIPTION = 'FLUX.1-Kontext image editing with per-request optimization stages. Errors: {"error": {"type", "field", "message"}}.'


def create_app(
    engine=None,
    settings: ServiceSettings | None = None,
    loader: EngineLoader | None = None,
    service: Service | None = None,  # a prepared one, e.g. with a pool of worker processes (serve --gpus)
) -> FastAPI:
    settings = service.settings if service else settings or ServiceSettings()
    service = service or Service(settings, engine=engine, loader=loader)
    set_pillow_pixel_limit(settings.max_input_pixels)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.begin_drain()
            await run_in_threadpool(service.stop)

    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "HEAD", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"],
                expose_headers=["X-Request-ID", "X-Seed", "Retry-After", "Server-Timing", "X-Model-Random-Weights"],
            )
        )
    routers = (inference.router, openai_images.router, loras.router, operations.router)
    route_paths = frozenset(route.path for router in routers for route in router.routes)
    middleware += [
        Middleware(RequestTrackingMiddleware, service=service, route_paths=route_paths),
        Middleware(ApiKeyMiddleware, api_key=settings.api_key),
    ]

    app = FastAPI(title="FLUX.1-Kontext optimized", version=__version__, description=DESCRIPTION, lifespan=lifespan, middleware=middleware)
    app.state.service = service
    install_error_handlers(app, settings.max_body_bytes)
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """The generated schema, plus the two /inference body models (the route reads its body by hand:
    one endpoint, two content types), with this server's own limits as the numeric bounds."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, definitions = models_json_schema(
        [(InferenceRequest, "validation"), (InferenceForm, "validation")], ref_template="#/components/schemas/{model}"
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(definitions.get("$defs", {}))
    service = app.state.service
    _apply_limits(components, service)
    if service.model is not None:  # the smallest size depends on the model: cache once it is known
        app.openapi_schema = schema
    return schema


def _apply_limits(components: dict, service) -> None:
    settings = service.settings

    def bound(properties: dict, name: str, **limits) -> None:
        prop = properties.get(name)
        if prop is None:
            return
        for target in [prop, *prop.get("anyOf", [])]:
            if target.get("type") in ("integer", "number"):
                target.update(limits)

    edits_form = next((name for name in components if name.startswith("Body_images_edits")), None)
    for name, images in (
        ("InferenceRequest", "num_images"),
        ("InferenceForm", "num_images"),
        ("OpenAIGenerationRequest", "n"),
        (edits_form, "n"),
    ):
        properties = components.get(name, {}).get("properties", {})
        bound(properties, "width", minimum=service.min_side(), maximum=settings.max_size)
        bound(properties, "height", minimum=service.min_side(), maximum=settings.max_size)
        bound(properties, "steps", maximum=settings.max_steps)
        bound(properties, images, maximum=settings.max_images)
    if "InferenceRequest" in components:
        components["InferenceRequest"]["dependentRequired"] = {"width": ["height"], "height": ["width"]}
