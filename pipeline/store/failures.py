"""What a failed Milvus call means: ran out of time, connection reset, unreachable, or an answer.

Decided by exception type, gRPC status and pymilvus' own wording only: Milvus's answers can quote
user text (a filter, a collection name), which must never turn a 422 into a 503.
"""

from __future__ import annotations

import re
from typing import Any


def _grpc_code(exc: BaseException) -> Any:
    """The gRPC status of a transport failure (raw, or wrapped by pymilvus' retry loop)."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        return exc.code()
    code = getattr(exc, "code", None)
    return code if isinstance(code, grpc.StatusCode) else None


def _message(exc: BaseException) -> str:
    """Matched only by prefix against pymilvus' own wording: Milvus' answers can quote user text
    (a filter, a collection name) and must never turn a 422 into a 503."""
    return str(getattr(exc, "message", "") or "")


def is_deadline(exc: BaseException) -> bool:
    """The call ran out of time: Milvus is hung or slow, but the connection itself may be fine."""
    import grpc
    from pymilvus.exceptions import MilvusException

    if _grpc_code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    if isinstance(exc, TimeoutError | grpc.FutureTimeoutError):
        return True
    if isinstance(exc, MilvusException):
        # messages pymilvus writes itself when its retry loop or load wait runs out of time
        msg = _message(exc)
        return bool(_RETRY_TIMEOUT.match(msg)) or msg.startswith(
            "wait for loading collection timeout"
        )
    return False


_RETRY_TIMEOUT = re.compile(r"\[\w+\] Retry timeout:")


def is_reset(exc: BaseException) -> bool:
    """gRPC UNAVAILABLE: the connection failed under the call; a new one may well succeed.

    pymilvus wraps a failed connect handshake in its own "Fail connecting" error: the gRPC status
    is then the cause's.
    """
    import grpc

    seen: BaseException | None = exc
    for _ in range(3):
        if seen is None:
            break
        if _grpc_code(seen) == grpc.StatusCode.UNAVAILABLE:
            return True
        seen = seen.__cause__
    return False


def is_unavailable(exc: BaseException) -> bool:
    """Milvus could not be reached: no connection, a dropped or closed channel.

    Decided by exception type, gRPC status and pymilvus' own connect messages only.
    """
    import grpc
    from pymilvus.exceptions import MilvusException, MilvusUnavailableException

    if isinstance(exc, MilvusUnavailableException | ConnectionError | grpc.RpcError):
        return True
    if _grpc_code(exc) is not None:
        return True
    if isinstance(exc, ValueError) and "closed channel" in str(exc):  # closed under our feet
        return True
    if isinstance(exc, MilvusException):
        msg = _message(exc)
        return msg.startswith(("Fail connecting to server", "should create connection first"))
    return False
