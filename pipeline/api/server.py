"""uvicorn with the service's connection limits: header deadline, keep-alive, concurrency cap.

uvicorn bounds idle keep-alive connections but not a client that opens a connection and sends its
headers a byte at a time (slowloris): such connections would be held for as long as the client likes.
The protocol classes here close a connection whose first request's headers are not complete within
``WINNOW_HTTP_HEADER_TIMEOUT``. Body reads are bounded by the guard middleware (``WINNOW_HTTP_BODY_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.config import Settings

log = logging.getLogger(__name__)


class _HeaderDeadline:
    """Mixin: close the connection when no request has started ``header_timeout`` s after it opened."""

    header_timeout: float | None = None  # None = read from Settings (worker processes: the env)
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        timeout = type(self).header_timeout
        if timeout is None:
            timeout = type(self).header_timeout = Settings().http_header_timeout
        self._winnow_timer = self.loop.call_later(timeout, self._winnow_deadline)

    def _winnow_deadline(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_winnow_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    pass


def http_protocol(header_timeout: float | None = None) -> type[asyncio.Protocol]:
    """httptools when installed (uvicorn[standard]), else h11 — both with the header deadline.

    With ``header_timeout`` the class carries it; without, it reads Settings on first use (worker
    processes are handed their settings through the environment, and classes travel by name).
    """
    base: type[asyncio.Protocol] = GuardedH11Protocol
    if importlib.util.find_spec("httptools") is not None:
        from pipeline.api._httptools import GuardedHttpToolsProtocol

        base = GuardedHttpToolsProtocol
    if header_timeout is None:
        return base
    return type(base.__name__, (base,), {"header_timeout": header_timeout})


def uvicorn_options(settings: Settings, *, in_process: bool = True) -> dict[str, Any]:
    """The uvicorn keyword arguments that carry Winnow's HTTP settings."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "http": http_protocol(settings.http_header_timeout if in_process else None),
        "timeout_keep_alive": max(1, round(settings.http_keep_alive)),
        "limit_concurrency": settings.http_max_concurrency,
    }


def serve(settings: Settings, app: Any = None) -> None:
    """Run the API: ``app`` in this process, or ``settings.workers`` fresh processes (env-configured)."""
    import uvicorn

    if settings.workers > 1:
        uvicorn.run(
            "pipeline.api.app:create_app",
            factory=True,
            workers=settings.workers,
            **uvicorn_options(settings, in_process=False),
        )
    else:
        uvicorn.run(app, **uvicorn_options(settings))
