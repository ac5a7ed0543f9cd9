"""MilvusStore: one collection of passages with a dense HNSW index and a BM25 sparse index.

The same code serves Milvus Lite (a ``.db`` path, embedded) and a Milvus server (``http://host:19530``).
Differences between the two (Lite's negative BM25 distances) are normalised here and never leak out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pipeline.breaker import Breaker
from pipeline.documents import MAX_DOC_ID_BYTES, MAX_TITLE_BYTES
from pipeline.domain import Hit, Passage

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from pipeline.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

PROP_MODEL = "winnow.embed_model"
PROP_DIM = "winnow.dim"
ID_LEN = 40
MAX_TEXT_BYTES = 65535
OUTPUT_FIELDS = ["doc_id", "chunk", "title", "text", "metadata"]
PING_TIMEOUT = 1.0  # seconds: /ready must answer quickly whatever Milvus does
PING_CACHE_S = 0.5  # a health answer is reused this long (many probes, one RPC)
# creating a collection with its indexes, flushing, dropping: ingest-side work that a busy
# Milvus may legitimately take longer than a query's deadline for; still bounded
SLOW_OP_TIMEOUT = 120.0
# a caller stops waiting this long after its call's deadline, whatever the call's thread still does
# (pymilvus' reconnect holds a process-wide lock for its own connect timeout, ignoring ours)
GRACE_S = 0.25
MAX_INFLIGHT = 64  # Milvus calls running at once; more are refused (StoreBusy), never queued

FUSIONS = ("rrf", "weighted", "normalized")  # see MilvusStore.hybrid and pipeline.fusion

ANALYZERS: dict[str, dict[str, Any]] = {
    "standard": {
        "tokenizer": "standard",
        "filter": ["lowercase", {"type": "stop", "stop_words": ["_english_"]}],
    },
    "english": {"type": "english"},
    "jieba": {"tokenizer": "jieba", "filter": ["lowercase"]},
}


class StoreError(RuntimeError):
    """Base class of store errors."""


class StoreUnavailable(StoreError):
    """Milvus cannot be reached (or timed out); the service answers 503 and retries later.

    ``retry_after``: seconds after which a retry may succeed (the breaker's cool-down when open).
    """

    retry_after: float = 5.0

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = retry_after


class StoreBusy(StoreUnavailable):
    """Every Milvus call slot is taken (WINNOW_MILVUS_MAX_INFLIGHT): refused at once (429), never
    queued past its deadline behind calls that may be stuck on a hung Milvus."""

    retry_after = 1.0


class SchemaMismatch(StoreError):
    """The collection was built with another embedding model or dimension."""


class InvalidFilter(StoreError, ValueError):
    """The caller's filter expression was rejected by Milvus (``expression``: the client's text)."""

    def __init__(self, message: str, expression: str = "") -> None:
        super().__init__(message)
        self.expression = expression


class StoreInUse(StoreUnavailable):
    """Another process holds this Milvus Lite file (one process per file).

    A StoreUnavailable: a server keeps answering 503 and picks the file up once it is free.
    ``str(exc)`` is a ready one-line message for a CLI.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        super().__init__(
            f"Milvus Lite file {self.path} is in use by another process (a running "
            "`python -m pipeline serve` or ingest?): stop it, send documents through the running "
            "service with `python -m ingest PATH --server http://HOST:PORT`, or point "
            "WINNOW_MILVUS_URI at a Milvus server"
        )


_LITERAL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def quote(value: str) -> str:
    r"""A Milvus string literal (Milvus Lite has no filter templating).

    Not JSON: Milvus' parser knows the escapes \\ \" \n \r \t but not \uXXXX, which
    ``json.dumps`` writes for other control characters (an id holding one made every query on it
    fail); those go in raw, and Milvus reads them as themselves.
    """
    return '"' + value.translate(_LITERAL_ESCAPES) + '"'


def in_list(field_name: str, values: Iterable[str]) -> str:
    return f"{field_name} in [{','.join(quote(v) for v in values)}]"


def clip_utf8(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "ignore")


# Milvus Lite serves the file over gRPC from a thread of this process, with gRPC's default server
# policy: keepalive pings on a connection without calls are abuse. pymilvus pings every 10 s
# regardless, so an idle Lite store was reset with GOAWAY "too_many_pings" about every 2 minutes
# (gRPC printing an error line each time; a call starting at that moment failing). In process no
# peer vanishes unnoticed: no keepalive pings at all. (Servers keep pymilvus' pings: Milvus permits
# them, and they keep idle connections alive through NAT and load balancers.)
LITE_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": 0}


def _close_quietly(client: MilvusClient) -> None:
    with contextlib.suppress(Exception):  # a broken connection has nothing to release
        client.close()


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


def _is_deadline(exc: BaseException) -> bool:
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


def _is_reset(exc: BaseException) -> bool:
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


def _is_unavailable(exc: BaseException) -> bool:
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


def _quiet_jieba() -> None:
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


_LITE_LOCK_WATCH = _LiteLockWatch()
logging.getLogger("milvus_lite.server_manager").addFilter(_LITE_LOCK_WATCH)


def _one_line_rpc_errors(record: logging.LogRecord) -> bool:
    """pymilvus logs every failed RPC with a ~40-line traceback in the message; keep line one.

    With Milvus hung, every request fails: one line each is news, forty is a flood. The store
    turns the error into StoreUnavailable, which says the rest.
    """
    if isinstance(record.msg, str) and "\nTraceback:" in record.msg:
        record.msg = record.msg.split("\nTraceback:", 1)[0]
    return True


logging.getLogger("pymilvus.decorators").addFilter(_one_line_rpc_errors)


class _Deadline:
    """One call's time budget, shared by its connect and every RPC it makes."""

    def __init__(self, seconds: float, uri: str) -> None:
        self.end = time.monotonic() + seconds
        self.seconds, self.uri = seconds, uri

    def left(self) -> float:
        """Seconds left for the next step; StoreUnavailable once the budget is spent."""
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise StoreUnavailable(f"Milvus at {self.uri} did not answer within {self.seconds:g}s")
        return remaining


_IN_CALL = threading.local()  # .deadline: set on a store thread while it runs one call


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class MilvusStore:
    """Thread-safe wrapper over ``MilvusClient``; reconnects by itself after Milvus comes back.

    Every call runs under one deadline (``timeout``, i.e. WINNOW_MILVUS_TIMEOUT) that covers the
    (re)connect and each RPC it makes, so a hung Milvus turns into ``StoreUnavailable`` within the
    timeout. Calls run concurrently on one gRPC channel (the client is thread-safe); only a
    (re)connect is serialised, and waiting for it counts against the caller's own deadline.

    The deadline holds at the caller, not only inside pymilvus: each call runs on one of the
    store's own ``max_inflight`` threads and its caller stops waiting ``GRACE_S`` after the
    deadline even when that thread is stuck (pymilvus' ``_recover`` reconnect holds a process-wide
    lock for its own connect timeout). A call finding every thread busy is refused at once
    (:class:`StoreBusy`), never queued. A circuit breaker (:class:`pipeline.breaker.Breaker`) opens
    after ``breaker_failures`` failed calls in a row; while open, calls fail in microseconds and a
    background probe (one thread, its own deadline) closes it once Milvus answers again.
    """

    def __init__(
        self,
        uri: str,
        collection: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        analyzer: str = "standard",
        hnsw_m: int = 16,
        hnsw_ef_construction: int = 200,
        hnsw_ef: int = 200,
        rrf_k: int = 5,
        fusion: str = "rrf",
        fusion_weights: tuple[float, float] = (0.5, 0.5),
        max_inflight: int = MAX_INFLIGHT,
        breaker_failures: int = 3,
        breaker_cooldown: float = 2.0,
        consistency: str = "Session",
    ) -> None:
        self.uri = uri
        self.collection = collection
        self.token = token
        self.timeout = timeout
        self.analyzer = analyzer
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction
        self.hnsw_ef = hnsw_ef
        self.rrf_k = rrf_k
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
        self.fusion = fusion
        self.fusion_weights = fusion_weights
        self.consistency = consistency  # of searches; reads that plan a write are always Strong
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "grpc://"))
        if analyzer == "jieba" and self.is_lite:
            _quiet_jieba()
        self._client: MilvusClient | None = None
        self._connect_lock = threading.Lock()  # held only while (re)connecting
        self._state_lock = threading.Lock()  # held only to swap self._client; never during I/O
        self._ping_lock = threading.Lock()  # one health probe at a time; others reuse its answer
        self._ping_at = -1e9
        self._ping_ok = False
        self._ping_pool: ThreadPoolExecutor | None = None
        self.max_inflight = max(1, max_inflight)
        self._inflight = 0  # calls holding a store thread (a stuck one too)
        self._slot_lock = threading.Lock()
        # arun() waits (loop, future) that end when the breaker opens
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._pool: ThreadPoolExecutor | None = None
        # a trial (the probe's, or a call's in half-open) may take a whole call deadline: no
        # second trial meanwhile, or a request would wait out its deadline beside the probe
        self.breaker = Breaker(
            "milvus",
            threshold=breaker_failures,
            cooldown=breaker_cooldown,
            trial_timeout=timeout + 2 * GRACE_S,
        )
        self._probe: threading.Thread | None = None  # the background prober while open
        self._probe_call: threading.Thread | None = None  # its current call (maybe stuck)
        self._stop = threading.Event()
        self._loaded = False
        self.model: str | None = None
        self.dim: int | None = None

    @property
    def slow_timeout(self) -> float:
        """Deadline of create/flush/drop (never shorter than a query's)."""
        return max(self.timeout, SLOW_OP_TIMEOUT)

    @classmethod
    def from_settings(cls, s: Settings, collection: str | None = None) -> MilvusStore:
        return cls(
            s.milvus_uri,
            collection if collection is not None else s.collection,
            token=s.milvus_token.get_secret_value() if s.milvus_token else None,
            timeout=s.milvus_timeout,
            analyzer=s.analyzer,
            hnsw_m=s.hnsw_m,
            hnsw_ef_construction=s.hnsw_ef_construction,
            hnsw_ef=s.hnsw_ef,
            rrf_k=s.rrf_k,
            fusion=s.fusion,
            fusion_weights=(s.fusion_dense_weight, s.fusion_bm25_weight),
            max_inflight=s.milvus_max_inflight,
            breaker_failures=s.milvus_breaker_failures,
            breaker_cooldown=s.milvus_breaker_cooldown,
            consistency=s.read_consistency,
        )

    # --- connection ------------------------------------------------------------------------
    @property
    def lite_path(self) -> Path:
        return Path(self.uri).expanduser().resolve()

    def _connect(self, timeout: float) -> MilvusClient:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        if self.is_lite:
            self.lite_path.parent.mkdir(parents=True, exist_ok=True)
        # dedicated: our own channel, closed with the client (a shared one outlives close())
        kwargs: dict[str, Any] = {"uri": self.uri, "timeout": timeout, "dedicated": True}
        if self.is_lite:
            kwargs["grpc_options"] = LITE_GRPC_OPTIONS
        if self.token:
            kwargs["token"] = self.token
        _LITE_LOCK_WATCH.seen.locked = False
        try:
            return MilvusClient(**kwargs)
        except MilvusException:
            if self.is_lite and getattr(_LITE_LOCK_WATCH.seen, "locked", False):
                raise StoreInUse(self.lite_path) from None
            raise

    def _get_client(self, deadline: _Deadline) -> MilvusClient:
        """The live client, or a new one; waits for another connect only until ``deadline``."""
        client = self._client
        if client is not None:
            return client
        if not self._connect_lock.acquire(timeout=deadline.left()):
            raise StoreUnavailable(
                f"Milvus at {self.uri}: still connecting after {deadline.seconds:g}s"
            )
        try:
            client = self._client
            if client is None:
                client = self._connect(deadline.left())
                with self._state_lock:
                    self._client, self._loaded = client, False
            return client
        finally:
            self._connect_lock.release()

    # --- deadlines, slots and the breaker ---------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._state_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_inflight, thread_name_prefix="milvus-io")
            return self._pool

    def _submit(
        self, work: Callable[[_Deadline], T], seconds: float, *, record: bool
    ) -> tuple[Future[T], _Deadline]:
        """Start ``work`` on a store thread under a new deadline, or refuse at once: breaker
        open (StoreUnavailable) or every thread busy (StoreBusy)."""
        import pymilvus  # noqa: F401  (a first import takes seconds: not Milvus' time)

        if record and not self.breaker.allow():
            wait = self.breaker.retry_after()
            raise StoreUnavailable(
                f"Milvus at {self.uri} kept failing: calls refused for {wait:.1f}s more "
                "while a probe checks it (circuit open)",
                retry_after=max(1.0, wait),
            )
        if not self._take_slot():
            raise StoreBusy(
                f"Milvus at {self.uri}: all {self.max_inflight} call slots are busy "
                "(WINNOW_MILVUS_MAX_INFLIGHT)"
            )
        deadline = _Deadline(seconds, self.uri)

        def run() -> T:
            _IN_CALL.deadline = deadline
            try:
                return work(deadline)
            finally:
                _IN_CALL.deadline = None

        try:
            fut = self._executor().submit(run)
        except BaseException:
            self._free_slot()
            raise
        # the slot is free when the thread is (or the call never started), not when the caller
        # gives up: a stuck thread keeps counting against max_inflight
        fut.add_done_callback(lambda _: self._free_slot())
        return fut, deadline

    def _take_slot(self) -> bool:
        with self._slot_lock:
            if self._inflight >= self.max_inflight:
                return False
            self._inflight += 1
            return True

    def _free_slot(self) -> None:
        with self._slot_lock:
            self._inflight -= 1

    def _timed_out(self, deadline: _Deadline, record: bool) -> StoreUnavailable:
        self._note_health(False)
        if record:
            self._failed()
        return StoreUnavailable(f"Milvus at {self.uri} did not answer within {deadline.seconds:g}s")

    def _settle(self, exc: BaseException | None, record: bool) -> None:
        """Tell the breaker how a call ended: unreachable/timed out, or Milvus answered."""
        if not record:
            return
        if isinstance(exc, StoreUnavailable):
            self._failed()
        else:  # an answer, even a refusal (a bad filter), means Milvus is there
            self.breaker.success()

    def _failed(self) -> None:
        opened = self.breaker.opened
        self.breaker.failure()
        if self.breaker.opened != opened:
            self._wake_waiters()
        if self.breaker.state != "closed":
            self._start_probe()

    def _call(
        self,
        fn: Callable[[MilvusClient, Callable[[], float]], T],
        *,
        timeout: float | None = None,
        record: bool = True,
    ) -> T:
        """Run ``fn(client, left)`` on a store thread under one deadline that holds here.

        On a store thread already (a call made by a method run through :meth:`arun`), ``fn`` runs
        inline under that call's deadline. ``record=False``: the outcome is not the breaker's
        (health probes, with their own shorter budget).
        """
        inline: _Deadline | None = getattr(_IN_CALL, "deadline", None)
        if inline is not None:
            return self._attempts(fn, inline)
        seconds = timeout if timeout is not None else self.timeout
        fut, deadline = self._submit(lambda d: self._attempts(fn, d), seconds, record=record)
        try:
            result = fut.result(timeout=max(0.0, deadline.end - time.monotonic()) + GRACE_S)
        except FutureTimeout:
            raise self._timed_out(deadline, record) from None
        except BaseException as exc:
            self._settle(exc, record)
            raise
        self._settle(None, record)
        return result

    async def arun(self, method: Callable[..., T], *args: Any) -> T:
        """``method(*args)`` (a store method: dense, hybrid, bm25, …) for an event loop.

        The call takes a store thread (no thread of the loop's default pool) and the await ends
        by the deadline plus ``GRACE_S`` whatever that thread does; every Milvus call ``method``
        makes shares that one deadline. When the breaker opens meanwhile (other calls kept
        failing), the wait ends at once: Milvus is down, and waiting out the deadline of every
        call already in flight would only hold their clients.
        """
        fut, deadline = self._submit(lambda _: method(*args), self.timeout, record=True)
        loop = asyncio.get_running_loop()
        call = asyncio.wrap_future(fut)
        call.add_done_callback(_retrieve)  # it may be left behind: never "exception not retrieved"
        opened: asyncio.Future[None] = loop.create_future()
        entry = (loop, opened)
        with self._slot_lock:
            self._waiters.add(entry)
        try:
            done, _ = await asyncio.wait(
                {call, opened},
                timeout=max(0.0, deadline.end - time.monotonic()) + GRACE_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            with self._slot_lock:
                self._waiters.discard(entry)
            opened.cancel()
        if call not in done:
            if opened in done and not opened.cancelled():
                raise StoreUnavailable(
                    f"Milvus at {self.uri} stopped answering (circuit opened during the call)",
                    retry_after=max(1.0, self.breaker.retry_after()),
                )
            raise self._timed_out(deadline, True)
        exc = call.exception()
        self._settle(exc, True)
        if exc is not None:
            raise exc
        return call.result()

    def raise_if_open(self) -> None:
        """StoreUnavailable at once while the breaker is open: a caller can skip the work it
        would do before its Milvus call (embedding the query) when that call would be refused."""
        if self.breaker.state == "open":
            wait = self.breaker.retry_after()
            raise StoreUnavailable(
                f"Milvus at {self.uri} kept failing: calls refused for {wait:.1f}s more "
                "(circuit open)",
                retry_after=max(1.0, wait),
            )

    def _wake_waiters(self) -> None:
        """The breaker just opened: end every :meth:`arun` wait now."""
        with self._slot_lock:
            waiters = list(self._waiters)
        for loop, opened in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
                loop.call_soon_threadsafe(_resolve, opened)

    def _start_probe(self) -> None:
        """One background prober while the breaker is not closed."""
        with self._state_lock:
            if self._probe is not None and self._probe.is_alive():
                return
            self._stop.clear()
            self._probe = threading.Thread(
                target=self._probe_loop, name="milvus-probe", daemon=True
            )
            self._probe.start()
        log.warning(
            "Milvus at %s kept failing: circuit open, calls fail fast; probing every %.1fs",
            self.uri,
            self.breaker.cooldown,
        )

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            state = self.breaker.state
            if state == "closed":
                return
            if state == "open":
                self._stop.wait(max(0.05, self.breaker.retry_after()))
                continue
            if not self.breaker.allow():  # another caller holds the trial
                self._stop.wait(0.1)
                continue
            if self._probe_once():
                self.breaker.success()
                log.info("Milvus at %s answers again: circuit closed", self.uri)
                return
            self.breaker.failure()

    def _probe_once(self) -> bool:
        """One ``has_collection`` on a thread of its own, waited for until its deadline only; a
        probe thread still stuck from last time counts as a failure (never two at once)."""
        if self._probe_call is not None and self._probe_call.is_alive():
            return False
        ok: list[bool] = []
        deadline = _Deadline(self.timeout, self.uri)

        def work() -> None:
            with contextlib.suppress(Exception):
                self._attempts(
                    lambda c, t: c.has_collection(self.collection, timeout=t()), deadline
                )
                ok.append(True)

        self._probe_call = threading.Thread(target=work, name="milvus-probe-call", daemon=True)
        self._probe_call.start()
        self._probe_call.join(self.timeout + GRACE_S)
        return bool(ok)

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: the breaker's and the call slots in use."""
        return {
            **self.breaker.stats(),
            "milvus_inflight": self._inflight,
        }

    def _attempts(
        self, fn: Callable[[MilvusClient, Callable[[], float]], T], deadline: _Deadline
    ) -> T:
        """Run ``fn(client, left)`` under one deadline; pass ``timeout=left()`` to every RPC.

        A timed-out call keeps the connection (Milvus is slow or hung, the channel is fine and
        gRPC keepalive notices a dead peer); any other connection failure drops it, so the
        next call reconnects. Both become StoreUnavailable, and ``ping()`` answers False from
        then on until its cache expires: with Milvus hung, probes need no RPC of their own.

        A connection reset under the call (gRPC UNAVAILABLE: a GOAWAY, a restarted proxy) gets
        one new connection within the same deadline: every ``fn`` here is idempotent, and
        pymilvus retries its RPCs but not its connect handshake, which is where milvus-lite's
        server resets clients for pinging too often (``too_many_pings``).
        """
        for attempt in (1, 2):
            client: MilvusClient | None = None
            try:
                client = self._get_client(deadline)
                return fn(client, deadline.left)
            except StoreUnavailable:
                self._note_health(False)
                raise
            except StoreError:
                raise
            except Exception as exc:
                if _is_deadline(exc):
                    self._note_health(False)
                    raise StoreUnavailable(
                        f"Milvus at {self.uri} did not answer within {deadline.seconds:g}s"
                    ) from exc
                if not _is_unavailable(exc):
                    raise
                if client is not None:
                    self._discard(client)
                if attempt == 1 and _is_reset(exc):
                    log.info("Milvus at %s reset the connection; reconnecting once", self.uri)
                    continue
                self._note_health(False)
                raise StoreUnavailable(f"Milvus at {self.uri} is not reachable") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _note_health(self, ok: bool) -> None:
        self._ping_ok, self._ping_at = ok, time.monotonic()

    def _discard(self, client: MilvusClient) -> None:
        """Forget a broken client (unless another thread already replaced it); close it aside."""
        with self._state_lock:
            if self._client is not client:
                return
            self._client, self._loaded = None, False
        # closing takes pymilvus' process-wide connection lock, which a concurrent connect may
        # hold for its whole timeout: never make the failing caller wait for that
        threading.Thread(target=_close_quietly, args=(client,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with self._state_lock:
            client, self._client, self._loaded = self._client, None, False
            pool, self._ping_pool = self._ping_pool, None
            io, self._pool = self._pool, None
        for p in (pool, io):
            if p is not None:
                p.shutdown(wait=False)
        if client is not None:
            _close_quietly(client)

    def ping(self) -> bool:
        """True when Milvus answers within PING_TIMEOUT (used by /ready).

        Never waits behind other calls: probes are single-flight, a caller arriving while one
        runs gets its answer, and an answer (or any call's failure) is reused for PING_CACHE_S.
        """
        budget = min(PING_TIMEOUT, self.timeout)
        start = time.monotonic()
        if start - self._ping_at < PING_CACHE_S:
            return self._ping_ok
        if self.breaker.state != "closed":  # failing: the background probe says when it is back
            return False
        if not self._ping_lock.acquire(timeout=budget):
            return False
        try:
            if time.monotonic() - self._ping_at < PING_CACHE_S:
                return self._ping_ok
            left = budget - (time.monotonic() - start)
            if left <= 0:
                return False
            try:
                self._call(
                    lambda c, t: c.has_collection(self.collection, timeout=t()),
                    timeout=left,
                    record=False,
                )
            except StoreError:
                return False
            return True
        finally:
            self._ping_lock.release()

    async def aping(self) -> bool:
        """``ping()`` for an event loop, on the store's own thread.

        ``asyncio.to_thread(store.ping)`` needs a slot in the loop's default executor, which
        calls stuck on a hung Milvus can fill for a whole timeout each: /ready must not queue
        behind them. A fresh answer costs no thread hop at all.
        """
        if time.monotonic() - self._ping_at < PING_CACHE_S:
            return self._ping_ok
        with self._state_lock:
            if self._ping_pool is None:
                self._ping_pool = ThreadPoolExecutor(1, thread_name_prefix="milvus-ping")
            pool = self._ping_pool
        return await asyncio.wrap_future(pool.submit(self.ping))

    # --- schema ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self._call(lambda c, t: c.has_collection(self.collection, timeout=t())))

    def _schema(self, dim: int) -> Any:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_LEN)
        s.add_field("doc_id", DataType.VARCHAR, max_length=MAX_DOC_ID_BYTES)
        s.add_field("chunk", DataType.INT64)
        s.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE_BYTES)
        s.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        s.add_field(
            "search_text",
            DataType.VARCHAR,
            max_length=MAX_TEXT_BYTES,
            enable_analyzer=True,
            analyzer_params=ANALYZERS[self.analyzer],
        )
        s.add_field("metadata", DataType.JSON)
        s.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        s.add_function(
            Function(
                name="text_bm25",
                function_type=FunctionType.BM25,
                input_field_names=["search_text"],
                output_field_names=["sparse"],
            )
        )
        return s

    def ensure_collection(self, dim: int, model: str) -> None:
        """Create the collection, or open it after checking it was built by the same model."""

        def run(c: MilvusClient, t: Callable[[], float]) -> None:
            if c.has_collection(self.collection, timeout=t()):
                props = (
                    c.describe_collection(self.collection, timeout=t()).get("properties", {}) or {}
                )
                have_dim = props.get(PROP_DIM)
                self.check_model(
                    props.get(PROP_MODEL), int(have_dim) if have_dim else None, model, dim
                )
            else:
                idx = c.prepare_index_params()
                idx.add_index(
                    "dense",
                    index_type="HNSW",
                    metric_type="COSINE",
                    params={"M": self.hnsw_m, "efConstruction": self.hnsw_ef_construction},
                )
                idx.add_index(
                    "sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25", params={}
                )
                c.create_collection(
                    self.collection,
                    schema=self._schema(dim),
                    index_params=idx,
                    properties={PROP_MODEL: model, PROP_DIM: str(dim)},
                    timeout=t(),
                )
                log.info("created collection %s (dim %d, model %s)", self.collection, dim, model)
            c.load_collection(self.collection, timeout=t())
            self._loaded = True
            self.model, self.dim = model, dim

        self._call(run, timeout=self.slow_timeout)

    def check_model(
        self, have_model: str | None, have_dim: int | None, model: str, dim: int
    ) -> None:
        """The one mismatch rule: a collection is only used with the embedder that built it."""
        if have_model is not None and (have_model != model or have_dim != dim):
            raise SchemaMismatch(
                f"collection {self.collection!r} was built with embedding model "
                f"{have_model!r} (dim {have_dim}); this run uses {model!r} (dim {dim}). "
                "Use the same WINNOW_EMBED_MODEL, or another WINNOW_COLLECTION "
                "(or drop the collection and re-ingest)."
            )

    def open(self) -> tuple[str | None, int | None]:
        """Open an existing collection for search; returns the (model, dim) it was built with."""

        def run(c: MilvusClient, t: Callable[[], float]) -> tuple[str | None, int | None]:
            if not c.has_collection(self.collection, timeout=t()):
                return None, None
            props = c.describe_collection(self.collection, timeout=t()).get("properties", {}) or {}
            c.load_collection(self.collection, timeout=t())
            self._loaded = True
            dim = props.get(PROP_DIM)
            self.model, self.dim = props.get(PROP_MODEL), int(dim) if dim else None
            return self.model, self.dim

        return self._call(run)

    def _ensure_loaded(self, c: MilvusClient, t: Callable[[], float]) -> None:
        if not self._loaded:
            c.load_collection(self.collection, timeout=t())
            self._loaded = True

    def drop(self) -> None:
        self._call(
            lambda c, t: c.drop_collection(self.collection, timeout=t()), timeout=self.slow_timeout
        )

    # --- writes ----------------------------------------------------------------------------
    def upsert(self, passages: Sequence[Passage], vectors: np.ndarray) -> int:
        if len(passages) != len(vectors):
            raise ValueError(f"{len(passages)} passages but {len(vectors)} vectors")
        if not passages:
            return 0
        rows = [
            {
                "id": p.id,
                "doc_id": p.doc_id,
                "chunk": p.chunk,
                "title": clip_utf8(p.title, MAX_TITLE_BYTES),
                "text": clip_utf8(p.text, MAX_TEXT_BYTES),
                "search_text": clip_utf8(p.search_text, MAX_TEXT_BYTES),
                "metadata": p.metadata,
                "dense": v.tolist(),
            }
            for p, v in zip(passages, np.asarray(vectors, dtype=np.float32), strict=True)
        ]
        res = self._call(lambda c, t: c.upsert(self.collection, rows, timeout=t()))
        return int(res.get("upsert_count", len(rows)) if isinstance(res, dict) else len(rows))

    def ids_by_doc(self, doc_ids: Sequence[str]) -> dict[str, set[str]]:
        """Stored passage ids of these documents (what resume and change detection compare)."""
        out: dict[str, set[str]] = {d: set() for d in doc_ids}
        if not doc_ids:
            return out

        def run(c: MilvusClient, t: Callable[[], float]) -> list[dict[str, Any]]:
            self._ensure_loaded(c, t)
            return list(
                c.query(
                    self.collection,
                    filter=in_list("doc_id", doc_ids),
                    output_fields=["doc_id"],
                    consistency_level="Strong",  # a plan must see every write before it
                    timeout=t(),
                )
            )

        for row in self._call(run):
            out.setdefault(row["doc_id"], set()).add(row["id"])
        return out

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self._call(
                lambda c, t: c.delete(self.collection, filter=in_list("id", ids), timeout=t())
            )

    def delete_docs(self, doc_ids: Sequence[str]) -> None:
        if doc_ids:
            flt = in_list("doc_id", doc_ids)
            self._call(lambda c, t: c.delete(self.collection, filter=flt, timeout=t()))

    def flush(self) -> None:
        self._call(lambda c, t: c.flush(self.collection, timeout=t()), timeout=self.slow_timeout)

    def count(self, filter: str = "") -> int:
        """Passages stored (``filter``: those matching it; ``chunk == 0`` counts documents)."""

        def run(c: MilvusClient, t: Callable[[], float]) -> int:
            self._ensure_loaded(c, t)
            res = c.query(
                self.collection,
                filter=filter,
                output_fields=["count(*)"],
                consistency_level=self.consistency,
                timeout=t(),
            )
            return int(res[0]["count(*)"])

        return self._call(run)

    def count_documents(self) -> int:
        """Documents stored: each has exactly one first passage (during a change of its first
        passage's text, old and new are both stored for a moment and it counts twice)."""
        return self.count("chunk == 0")

    def passages_of(self, doc_id: str, limit: int) -> list[Hit]:
        """A document's stored passages in chunk order (score 0), at most ``limit``."""

        def run(c: MilvusClient, t: Callable[[], float]) -> list[dict[str, Any]]:
            self._ensure_loaded(c, t)
            return list(
                c.query(
                    self.collection,
                    filter=f"doc_id == {quote(doc_id)}",
                    output_fields=OUTPUT_FIELDS,
                    limit=limit,
                    consistency_level=self.consistency,
                    timeout=t(),
                )
            )

        rows = self._call(run)
        hits = [
            Hit(
                id=str(r["id"]),
                doc_id=r["doc_id"],
                chunk=int(r["chunk"]),
                title=r.get("title", ""),
                text=r.get("text", ""),
                metadata=r.get("metadata") or {},
                score=0.0,
            )
            for r in rows
        ]
        return sorted(hits, key=lambda h: (h.chunk, h.id))

    # --- reads -----------------------------------------------------------------------------
    @staticmethod
    def _hits(raw: Any, *, bm25: bool = False) -> list[Hit]:
        hits: list[Hit] = []
        for h in raw[0] if raw else []:
            e = h.get("entity", {})
            score = float(h["distance"])
            hits.append(
                Hit(
                    id=str(h["id"]),
                    doc_id=e.get("doc_id", ""),
                    chunk=int(e.get("chunk", 0)),
                    title=e.get("title", ""),
                    text=e.get("text", ""),
                    metadata=e.get("metadata") or {},
                    # Milvus Lite returns BM25 as a negative distance, a server as a positive score
                    score=abs(score) if bm25 else score,
                )
            )
        return hits

    def _guard_filter(
        self, fn: Callable[[MilvusClient, Callable[[], float]], Any], filter: str
    ) -> Any:
        from pymilvus.exceptions import MilvusException

        try:
            return self._call(fn)
        except MilvusException as exc:
            if filter:
                msg = getattr(exc, "message", None) or str(exc)
                raise InvalidFilter(f"invalid filter expression: {msg}", filter) from exc
            raise StoreError("Milvus rejected the search") from exc

    def _dense_params(self, k: int) -> dict[str, Any]:
        return {"metric_type": "COSINE", "params": {"ef": max(self.hnsw_ef, k)}}

    def dense(self, vector: np.ndarray, k: int, filter: str = "") -> list[Hit]:
        def run(c: MilvusClient, t: Callable[[], float]) -> Any:
            self._ensure_loaded(c, t)
            return c.search(
                self.collection,
                data=[np.asarray(vector, dtype=np.float32).tolist()],
                anns_field="dense",
                limit=k,
                filter=filter,
                output_fields=OUTPUT_FIELDS,
                search_params=self._dense_params(k),
                consistency_level=self.consistency,
                timeout=t(),
            )

        return self._hits(self._guard_filter(run, filter))

    def bm25(self, text: str, k: int, filter: str = "") -> list[Hit]:
        def run(c: MilvusClient, t: Callable[[], float]) -> Any:
            self._ensure_loaded(c, t)
            return c.search(
                self.collection,
                data=[text],
                anns_field="sparse",
                limit=k,
                filter=filter,
                output_fields=OUTPUT_FIELDS,
                search_params={"metric_type": "BM25"},
                consistency_level=self.consistency,
                timeout=t(),
            )

        return self._hits(self._guard_filter(run, filter), bm25=True)

    def ranker(self) -> Any:
        """The Milvus ranker of ``hybrid_search`` for this store's fusion setting.

        ``weighted`` keeps Milvus's own score normalisation (``norm_score=True``): COSINE as
        ``(1 + s) / 2``, BM25 as ``2·atan(s)/π``, identical in Milvus Lite (which turns its
        negative BM25 distances positive before fusing) and a Milvus server.
        """
        from pymilvus import RRFRanker, WeightedRanker

        if self.fusion == "rrf":
            return RRFRanker(self.rrf_k)
        if self.fusion == "weighted":
            return WeightedRanker(*self.fusion_weights, norm_score=True)
        raise ValueError(f"fusion {self.fusion!r} is not done by a Milvus ranker")

    def hybrid(self, vector: np.ndarray, text: str, k: int, filter: str = "") -> list[Hit]:
        """Dense + BM25 fused by ``fusion``: Milvus's ranker, or min-max fusion of both lists here.

        ``normalized`` needs each list's own minimum and maximum, which no Milvus ranker has
        (see :mod:`pipeline.fusion`): it runs the two searches and fuses their hits.
        """
        if not text.strip():
            return self.dense(vector, k, filter)
        if self.fusion == "normalized":
            from pipeline.fusion import normalized_fusion

            w_dense, w_bm25 = self.fusion_weights
            return normalized_fusion(
                self.dense(vector, k, filter), self.bm25(text, k, filter), w_dense, w_bm25, k
            )
        from pymilvus import AnnSearchRequest

        ranker = self.ranker()

        def run(c: MilvusClient, t: Callable[[], float]) -> Any:
            self._ensure_loaded(c, t)
            reqs = [
                AnnSearchRequest(
                    data=[np.asarray(vector, dtype=np.float32).tolist()],
                    anns_field="dense",
                    param=self._dense_params(k),
                    limit=k,
                    expr=filter or None,
                ),
                AnnSearchRequest(
                    data=[text],
                    anns_field="sparse",
                    param={"metric_type": "BM25"},
                    limit=k,
                    expr=filter or None,
                ),
            ]
            return c.hybrid_search(
                self.collection,
                reqs,
                ranker=ranker,
                limit=k,
                output_fields=OUTPUT_FIELDS,
                consistency_level=self.consistency,
                timeout=t(),
            )

        return self._hits(self._guard_filter(run, filter))
