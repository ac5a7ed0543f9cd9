"""The httptools protocol with the header deadline (imported only where httptools is installed)."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeline.api.connections import HeaderDeadline


class GuardedHttpToolsProtocol(HeaderDeadline, HttpToolsProtocol):
    pass
