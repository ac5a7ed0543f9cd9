"""uvicorn with the service's connection limits: header deadline, keep-alive, connection cap.

uvicorn bounds idle keep-alive connections but not a client that opens a connection and sends its
headers a byte at a time (slowloris), or nothing at all: such connections would be held for as long
as the client likes. The protocol classes (:mod:`pipeline.api.connections`) close a connection
whose first request's headers are not complete within ``WINNOW_HTTP_HEADER_TIMEOUT``, and keep at
most ``WINNOW_HTTP_MAX_CONNECTIONS`` open: past it, a new connection evicts the oldest one that has no request in progress.

uvicorn's own ``limit_concurrency`` is not used: it counts open connections, so 1,100 sockets that
send nothing made it answer 503 to everyone, ``/health`` included (issue 27). Requests in progress
are counted by the app instead (:class:`pipeline.api.guard.RequestLimit`), where an idle
connection never shows. Body reads are bounded by the guard middleware (``WINNOW_HTTP_BODY_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import Any

from pipeline.api.connections import GuardedH11Protocol
from pipeline.config import Settings

log = logging.getLogger(__name__)
FD_RESERVE = 256  # file descriptors kept for everything but client connections (Milvus, models)


def http_protocol(
    header_timeout: float | None = None, max_connections: int | None = None
) -> type[asyncio.Protocol]:
    """httptools when installed (uvicorn[standard]), else h11 — both with the header deadline.

    With the limits given the class carries them; without, it reads Settings on first use (worker
    processes are handed their settings through the environment, and classes travel by name).
    """
    base: type[asyncio.Protocol] = GuardedH11Protocol
    if importlib.util.find_spec("httptools") is not None:
        from pipeline.api._httptools import GuardedHttpToolsProtocol

        base = GuardedHttpToolsProtocol
    if header_timeout is None and max_connections is None:
        return base
    limits = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type(base.__name__, (base,), limits)


def uvicorn_options(settings: Settings, *, in_process: bool = True) -> dict[str, Any]:
    """The uvicorn keyword arguments that carry Winnow's HTTP settings.

    No ``limit_concurrency``: it counts idle connections (see the module docstring).
    """
    http = (
        http_protocol(settings.http_header_timeout, settings.http_max_connections)
        if in_process
        else http_protocol()
    )
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "http": http,
        "timeout_keep_alive": max(1, round(settings.http_keep_alive)),
        "limit_concurrency": None,
    }


def raise_fd_limit(connections: int) -> int:
    """Raise this process's soft open-files limit towards what ``connections`` sockets need (up
    to the hard limit), so a flood of idle connections meets the cap, not ``EMFILE``; the limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "open-files limit %d is under WINNOW_HTTP_MAX_CONNECTIONS (%d) + %d: raise `ulimit -n` "
            "or lower the cap, or a flood of connections fails accept() before the cap evicts",
            soft,
            connections,
            FD_RESERVE,
        )
    return int(soft)


def serve(settings: Settings, app: Any = None) -> None:
    """Run the API: ``app`` in this process, or ``settings.workers`` fresh processes (env-configured)."""
    import uvicorn

    raise_fd_limit(settings.http_max_connections)  # worker processes inherit it
    if settings.workers > 1:
        uvicorn.run(
            "pipeline.api.app:create_app",
            factory=True,
            workers=settings.workers,
            **uvicorn_options(settings, in_process=False),
        )
    else:
        uvicorn.run(app, **uvicorn_options(settings))
