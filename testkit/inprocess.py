"""The app in-process, for the fast test tier: its lifespan run as ``serve`` runs it, requests over
``httpx.ASGITransport`` (no socket, no uvicorn), over whatever store and reranker the test hands it
(the in-memory store and a fake engine, or the real ones)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from pipeline.api import create_app
from pipeline.config import Settings
from pipeline.runtime import Runtime


@contextlib.asynccontextmanager
async def app_client(
    settings: Settings, *, headers: dict[str, str] | None = None, **runtime: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    """(client, runtime) for an app over ``Runtime(settings, **runtime)``; startup and shutdown run."""
    rt = Runtime(settings, **runtime)
    app = create_app(settings, runtime=rt)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://winnow.test", headers=headers, timeout=30
        ) as client:
            yield client, rt
