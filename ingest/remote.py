"""``python -m ingest PATH --server URL``: the same job through a running service's write API.

Reading, duplicate and problem handling are the job's own (:func:`ingest.job.read_documents`); the
server chunks, plans and writes with the same rules (:mod:`pipeline.documents`). What makes it safe
to kill at any point and rerun: the server skips a document whose stored passages equal its new
ones without embedding, so a rerun re-sends everything and only redoes what was not finished.
The one place Lite users need it: a Milvus Lite file is held by the running server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.domain import Document

from .job import IngestStats, read_documents
from .sources import FieldMap, Problem

log = logging.getLogger(__name__)

BATCH_DOCUMENTS = 64  # documents per request (the server's WINNOW_MAX_WRITE_DOCUMENTS caps it)
BATCH_CHARS = 2_000_000  # characters per request: well under the server's body and queue limits
RETRY_FOR_S = 600.0  # keep retrying 429 / 503 / connection errors this long per request


class RemoteError(RuntimeError):
    """The server refused the job for a reason a retry cannot fix (auth, limits, bad input)."""


class TooLargeForServer(RuntimeError):
    """413: this batch is over one of the server's limits; smaller ones may pass."""


def batches(
    docs: Iterable[Document], max_docs: Callable[[], int], max_chars: int
) -> Iterator[list[Document]]:
    """Batches of at most ``max_docs()`` documents (asked per batch: it shrinks after a 413)."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        size = len(doc.text) + len(doc.title)
        if batch and (len(batch) >= max_docs() or chars + size > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += size
    if batch:
        yield batch


class RemoteIngest:
    """Streams documents to ``POST {url}/v1/documents`` in batches, one request at a time."""

    engine = "server"

    def __init__(
        self,
        url: str,
        key: str | None,
        *,
        timeout: float = 300.0,
        batch_documents: int = BATCH_DOCUMENTS,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self.batch_documents = batch_documents

    def ready(self) -> dict[str, Any]:
        r = self.client.get(f"{self.url}/ready")
        return r.json()

    def documents_stored(self) -> int | None:
        try:
            return self.ready().get("documents")
        except Exception:  # the summary does without it
            return None

    def _send(self, batch: list[Document]) -> list[dict[str, Any]]:
        """POST a batch; one the server finds too large (413) goes in halves, and later batches
        are no larger than what it took."""
        try:
            return self._post(batch)
        except TooLargeForServer:
            if len(batch) == 1:
                raise RemoteError(
                    f"{self.url} refused document {batch[0].id!r} as too large "
                    "(WINNOW_MAX_BODY_BYTES / WINNOW_WRITE_QUEUE_CHARS there)"
                ) from None
            half = len(batch) // 2
            self.batch_documents = max(1, min(self.batch_documents, half))
            return self._send(batch[:half]) + self._send(batch[half:])

    def _post(self, batch: list[Document]) -> list[dict[str, Any]]:
        """POST one batch; retries what a retry can fix (resending a batch is always safe)."""
        import httpx

        body = {
            "documents": [
                {"id": d.id, "text": d.text, "title": d.title, "metadata": d.metadata}
                for d in batch
            ]
        }
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 1.0
        while True:
            try:
                r = self.client.post(f"{self.url}/v1/documents", json=body)
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code == 200:
                    return r.json()["results"]
                why = f"{r.status_code} {_message(r)}"
                if r.status_code == 413:
                    raise TooLargeForServer(why)
                if r.status_code not in (429, 502, 503, 504):
                    raise RemoteError(f"{self.url} refused the batch: {why}")
                retry_after = r.headers.get("retry-after", "")
                if retry_after.isdigit():
                    delay = float(retry_after)
            if time.monotonic() + delay > deadline:
                raise RemoteError(f"{self.url} kept failing for {RETRY_FOR_S:g} s: {why}")
            log.info("retrying in %.0f s: %s", delay, why)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def run(
        self, paths: Iterable[str | Path], *, fields: FieldMap | None = None, progress: bool = True
    ) -> IngestStats:
        from tqdm import tqdm

        t0 = time.perf_counter()
        stats = IngestStats()
        bar = tqdm(desc="ingest", unit=" doc", disable=not progress, dynamic_ncols=True)
        try:
            docs = read_documents(paths, fields, stats)
            for batch in batches(docs, lambda: self.batch_documents, BATCH_CHARS):
                t = time.perf_counter()
                results = self._send(batch)
                stats.write_s += time.perf_counter() - t
                for doc, res in zip(batch, results, strict=True):
                    self._count(stats, doc, res)
                bar.set_postfix(passages=stats.passages, unchanged=stats.unchanged, refresh=False)
                bar.update(len(batch))
        finally:
            bar.close()
        stats.seconds = time.perf_counter() - t0
        return stats

    @staticmethod
    def _count(stats: IngestStats, doc: Document, res: dict[str, Any]) -> None:
        status = res.get("status")
        if status == "rejected":
            stats.documents -= 1
            stats.skipped += 1
            stats.problems.append(Problem(doc.source, None, res.get("reason", "rejected")))
            return
        stats.passages += int(res.get("passages", 0))
        stats.embedded += int(res.get("embedded", 0))
        stats.deleted += int(res.get("deleted", 0))
        if status == "unchanged":
            stats.unchanged += 1

    def close(self) -> None:
        self.client.close()


def _message(r: Any) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:  # not our JSON (a proxy page): its first line
        return r.text.strip().splitlines()[0][:200] if r.text.strip() else ""
