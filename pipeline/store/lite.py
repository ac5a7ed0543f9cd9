"""Milvus Lite's quirks, installed when a Lite URI is opened (never on import).

Milvus Lite runs its gRPC server in this process: it resets clients that send keepalive pings,
reports a file held by another process only as a logged traceback, and segments Chinese with the
jieba package, which logs its dictionary loading. :func:`install` puts the log filters in place
on the first connect (:func:`connect_kwargs`, the client options a Lite connection needs);
the store quiets jieba when it is built with that analyzer.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

# Milvus Lite serves the file over gRPC from a thread of this process, with gRPC's default server
# policy: keepalive pings on a connection without calls are abuse. pymilvus pings every 10 s
# regardless, so an idle Lite store was reset with GOAWAY "too_many_pings" about every 2 minutes
# (gRPC printing an error line each time; a call starting at that moment failing). In process no
# peer vanishes unnoticed: no keepalive pings at all. (Servers keep pymilvus' pings: Milvus permits
# them, and they keep idle connections alive through NAT and load balancers.)
LITE_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": 0}

_REMOTE_SCHEMES = ("http://", "https://", "tcp://", "grpc://")


def is_lite(uri: str) -> bool:
    """A path (``./data/winnow.db``) is a Milvus Lite file; a URL is a Milvus server."""
    return not uri.startswith(_REMOTE_SCHEMES)


def lite_path(uri: str) -> Path:
    return Path(uri).expanduser().resolve()


def quiet_jieba() -> None:
    """Milvus Lite segments Chinese with the jieba package in this process; jieba sets its own
    logger to DEBUG on import and prints its dictionary loading on every first use."""
    try:
        import jieba
    except ImportError:  # pragma: no cover - Lite then refuses the collection with its own message
        return
    jieba.setLogLevel(logging.WARNING)


class _LiteLockWatch(logging.Filter):
    """Milvus Lite reports a file locked by another process only as a logged traceback.

    This filter drops that traceback (the store raises ``StoreInUse`` with one line instead)
    and notes, per thread, that the lock was the cause.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            from milvus_lite.exceptions import DataDirLockedError
        except ImportError:  # pragma: no cover - a milvus-lite without the lock
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DataDirLockedError):
            self.seen.locked = True
            return False
        return True


LOCK_WATCH = _LiteLockWatch()
_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Put Lite's log filter in place (once per process) before a Lite file is opened."""
    global _installed
    with _install_lock:
        if not _installed:
            logging.getLogger("milvus_lite.server_manager").addFilter(LOCK_WATCH)
            _installed = True


def installed() -> bool:
    """Whether :func:`install` ran in this process (an import of the store must not run it)."""
    return _installed


def connect_kwargs(uri: str) -> dict[str, Any]:
    """MilvusClient options of a Lite connection; starts watching for a locked file."""
    install()
    lite_path(uri).parent.mkdir(parents=True, exist_ok=True)
    LOCK_WATCH.seen.locked = False
    return {"grpc_options": LITE_GRPC_OPTIONS}


def was_locked() -> bool:
    """The last connect on this thread failed because another process holds the file."""
    return bool(getattr(LOCK_WATCH.seen, "locked", False))
