"""FastAPI app factory. The endpoints beyond /health arrive with the HTTP-service issue."""

from __future__ import annotations

from fastapi import FastAPI

from engine import KontextEngine, __version__


def create_app(engine: KontextEngine) -> FastAPI:
    app = FastAPI(title="FLUX.1-Kontext optimized", version=__version__)

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "model": engine.model_info,
            "environment": engine.env.summary(),
            "default_optimizations": engine.default_config.model_dump(),
            "stages": engine.stage_status(),
            "variants": engine.variants.report(),
            "memory": engine.memory(),
        }

    return app
