"""HTTP API: ``create_app(settings)`` builds the FastAPI app (routes, lifespan, errors, metrics)."""

from pipeline.api.app import create_app

__all__ = ["create_app"]
