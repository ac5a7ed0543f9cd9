"""The connection limits of the HTTP protocol classes: the header deadline and the connection cap.

Below ``server`` (which picks the protocol and runs uvicorn) and ``_httptools`` (the httptools
variant, imported only where httptools is installed): both take the mixin from here, so neither
imports the other.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.config import Settings


class HeaderDeadline:
    """Mixin: the header deadline of a connection's first request, and the connection cap.

    ``header_timeout`` / ``max_connections`` None = read from Settings (worker processes: the env).
    """

    header_timeout: float | None = None
    max_connections: int | None = None
    cycle: Any
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        cls = type(self)
        if cls.header_timeout is None or cls.max_connections is None:
            settings = Settings()
            if cls.header_timeout is None:
                cls.header_timeout = settings.http_header_timeout
            if cls.max_connections is None:
                cls.max_connections = settings.http_max_connections
        self._winnow_opened = time.monotonic()
        self._winnow_timer = self.loop.call_later(cls.header_timeout, self._winnow_deadline)
        if len(self.connections) > cls.max_connections:
            self._winnow_evict()

    def _winnow_idle(self) -> bool:
        """No request in progress: none started yet, or the last one answered (keep-alive)."""
        cycle = self.cycle
        return cycle is None or bool(cycle.response_complete)

    def _winnow_evict(self) -> None:
        """Over the cap: close the oldest connection without a request in progress (this new one
        when every other is busy), so idle sockets cannot lock out new clients."""
        oldest = None
        for conn in self.connections:
            if conn is self or conn.transport.is_closing():
                continue
            if conn._winnow_idle() and (
                oldest is None or conn._winnow_opened < oldest._winnow_opened
            ):
                oldest = conn
        victim = oldest if oldest is not None else self
        victim.connections.discard(victim)  # counted out now; connection_lost comes later
        victim.transport.close()

    def _winnow_deadline(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_winnow_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


class GuardedH11Protocol(HeaderDeadline, H11Protocol):
    pass
