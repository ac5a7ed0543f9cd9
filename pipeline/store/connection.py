"""The Milvus connection: one deadline per call that holds at the caller, reconnects, a breaker.

Every call runs under one deadline (WINNOW_MILVUS_TIMEOUT) that covers the (re)connect and each
RPC it makes, on one of at most ``max_inflight`` threads of its own; the caller stops waiting
``GRACE_S`` after the deadline whatever that thread does (pymilvus' ``_recover`` reconnect holds a
process-wide lock for its own connect timeout). Failures are classified by
:mod:`pipeline.store.failures` (deadline, reset, unreachable, or an answer). No collection
logic: :class:`pipeline.store.milvus.MilvusStore` runs its RPCs through :meth:`call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.breaker import Breaker
from pipeline.store import failures, lite
from pipeline.store.errors import StoreBusy, StoreError, StoreInUse, StoreUnavailable

if TYPE_CHECKING:
    from pymilvus import MilvusClient

log = logging.getLogger(__name__)

T = TypeVar("T")
# what a call runs: ``fn(client, left)``, passing ``timeout=left()`` to every RPC
Work = Callable[["MilvusClient", Callable[[], float]], T]

PING_TIMEOUT = 1.0  # seconds: /ready must answer quickly whatever Milvus does
PING_CACHE_S = 0.5  # a health answer is reused this long (many probes, one RPC)
# a caller stops waiting this long after its call's deadline, whatever the call's thread still does
# (pymilvus' reconnect holds a process-wide lock for its own connect timeout, ignoring ours)
GRACE_S = 0.25
MAX_INFLIGHT = 64  # Milvus calls running at once; more are refused (StoreBusy), never queued


def _close_quietly(client: MilvusClient) -> None:
    with contextlib.suppress(Exception):  # a broken connection has nothing to release
        client.close()


def _one_line_rpc_errors(record: logging.LogRecord) -> bool:
    """pymilvus logs every failed RPC with a ~40-line traceback in the message; keep line one.

    With Milvus hung, every request fails: one line each is news, forty is a flood. The store
    turns the error into StoreUnavailable, which says the rest.
    """
    if isinstance(record.msg, str) and "\nTraceback:" in record.msg:
        record.msg = record.msg.split("\nTraceback:", 1)[0]
    return True


_log_filters = threading.Lock()
_log_filtered = False


def _install_log_filters() -> None:
    """Once per process, on the first connect (not on import): pymilvus' RPC tracebacks → line one."""
    global _log_filtered
    with _log_filters:
        if not _log_filtered:
            logging.getLogger("pymilvus.decorators").addFilter(_one_line_rpc_errors)
            _log_filtered = True


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


class MilvusConnection:
    """Thread-safe ``MilvusClient`` holder; reconnects by itself after Milvus comes back.

    Calls run concurrently on one gRPC channel (the client is thread-safe); only a (re)connect is
    serialised, and waiting for it counts against the caller's own deadline. A call finding every
    thread busy is refused at once (:class:`StoreBusy`), never queued. A circuit breaker
    (:class:`pipeline.breaker.Breaker`) opens after ``breaker_failures`` failed calls in a row;
    while open, calls fail in microseconds and a background probe (one thread, its own deadline,
    one ``has_collection(probe_collection)``) closes it once Milvus answers again.
    """

    def __init__(
        self,
        uri: str,
        *,
        probe_collection: str,
        token: str | None = None,
        timeout: float = 10.0,
        max_inflight: int = MAX_INFLIGHT,
        breaker_failures: int = 3,
        breaker_cooldown: float = 2.0,
    ) -> None:
        self.uri = uri
        self.probe_collection = probe_collection
        self.token = token
        self.timeout = timeout
        self.is_lite = lite.is_lite(uri)
        # the collection is loaded on the current client (the store sets it; a new client clears it)
        self.loaded = False
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

    # --- connection ------------------------------------------------------------------------
    def _connect(self, timeout: float) -> MilvusClient:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        _install_log_filters()
        # dedicated: our own channel, closed with the client (a shared one outlives close())
        kwargs: dict[str, Any] = {"uri": self.uri, "timeout": timeout, "dedicated": True}
        if self.is_lite:
            kwargs.update(lite.connect_kwargs(self.uri))
        if self.token:
            kwargs["token"] = self.token
        try:
            return MilvusClient(**kwargs)
        except MilvusException:
            if self.is_lite and lite.was_locked():
                raise StoreInUse(lite.lite_path(self.uri)) from None
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
                    self._client, self.loaded = client, False
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

    def call(
        self,
        fn: Work[T],
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
                    lambda c, t: c.has_collection(self.probe_collection, timeout=t()), deadline
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

    def _attempts(self, fn: Work[T], deadline: _Deadline) -> T:
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
                if failures.is_deadline(exc):
                    self._note_health(False)
                    raise StoreUnavailable(
                        f"Milvus at {self.uri} did not answer within {deadline.seconds:g}s"
                    ) from exc
                if not failures.is_unavailable(exc):
                    raise
                if client is not None:
                    self._discard(client)
                if attempt == 1 and failures.is_reset(exc):
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
            self._client, self.loaded = None, False
        # closing takes pymilvus' process-wide connection lock, which a concurrent connect may
        # hold for its whole timeout: never make the failing caller wait for that
        threading.Thread(target=_close_quietly, args=(client,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with self._state_lock:
            client, self._client, self.loaded = self._client, None, False
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
                self.call(
                    lambda c, t: c.has_collection(self.probe_collection, timeout=t()),
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
