"""The Ray engine: the same job, with embedding (and, on a Milvus server, writing) in a Ray Data pool.

Shape (``python -m ingest PATH --engine ray``)::

    driver:  read → chunk → plan (IngestJob, the one copy)  ──ray.put──► queue ──► Ray Data read task
    Ray:     map_batches(EmbedWriter, concurrency=N actors, num_gpus=G)  one Embedder per actor
             Milvus server URI: the actor upserts its batch (bounded slices) and returns only positions
             Milvus Lite URI:   the actor returns vectors; the driver upserts (one process per Lite file)
    driver:  a batch is complete when all its rows came back → its stale passages are deleted

Why the driver keeps reading, chunking and planning: duplicate ids across files, problems with file
and line, and the skip-unchanged plan are exactly the single-process code, and they cost a small
fraction of embedding (see docs/benchmarks.md). Every guarantee of the single job carries over:
ids are content hashes (a replayed upsert is a no-op), a document is skipped when its stored ids
equal its computed ids, and stale passages are deleted only once the batch's new ones are written.

Ray is optional (``pip install 'winnow[ray]'``) and imported only when this engine runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.domain import Passage

from .job import IngestJob, IngestStats, Plan, Progress, upsert_bounded

if TYPE_CHECKING:
    from pipeline.config import Settings

log = logging.getLogger(__name__)
LOCAL_START_TRIES = 2  # a local Ray whose node timed out during startup is started once more

INSTALL_HINT = (
    "the Ray ingest engine needs Ray Data: pip install 'winnow[ray]' "
    "(or pip install 'ray[data]>=2.50,<3'); or use --engine single"
)
SENTINEL = None
LOCAL_OBJECT_STORE_BYTES = 1 << 30  # in-flight batches are ~1 MB each; Ray spills past this
BLOCK_BYTES = 1 << 20  # the dataset's target block size (see to_blocks)
PIECE_BYTES = BLOCK_BYTES // 2  # real data per block; the rest is padding
PIECE_ROWS = 4096


class RayMissing(RuntimeError):
    """Ray (with Ray Data) is not installed."""


def import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayMissing(INSTALL_HINT) from exc
    return ray


def start_ray(settings: Settings) -> bool:
    """Join ``ray_address``, or start a small local Ray; True when this call started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    # no usage-stats upload, and no dashboard: nothing leaves the machine for a local run
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.getLogger().level > logging.DEBUG
    if settings.ray_address is not None:
        ray.init(address=settings.ray_address, log_to_driver=not quiet, configure_logging=False)
    else:
        for attempt in range(1, LOCAL_START_TRIES + 1):
            try:
                ray.init(
                    num_cpus=local_cpus(),
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                    log_to_driver=not quiet,
                    configure_logging=False,
                )
                break
            except Exception as exc:
                # Ray gives its local node 30 s to come up; on a loaded 2-core host its raylet
                # sometimes never reports (seen once in CI, no raylet log): start it once more
                if attempt == LOCAL_START_TRIES or "timed out during startup" not in str(exc):
                    raise
                log.warning("the local Ray did not start (%s); starting it once more", exc)
                ray.shutdown()
    return True


def local_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() if os.cpu_count() is not None else 1)


def actor_cpus(ray: Any, actors: int, gpus: float) -> int:
    """CPU actors share the cluster's cores (torch threads = cores); GPU actors take one core."""
    if gpus > 0:
        return 1
    alive = [n for n in ray.nodes() if n.get("Alive")]
    per_node = max((int(n["Resources"].get("CPU", 0)) for n in alive), default=1)
    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(total // actors, per_node))


def to_blocks(batch: int, todo: list[Passage]) -> Iterator[Any]:
    """The planned batch as Arrow blocks of at most ``PIECE_BYTES`` real data each, padded to just
    over ``BLOCK_BYTES``.

    Why the padding: Ray Data's read operator buffers what a read task yields until the buffer
    exceeds the dataset's target block size, and slices blocks above 1.5× that size. A block of
    (target, 1.5×target] bytes therefore leaves at once, whole: the actors get each batch as soon
    as the driver planned it, and nothing waits for a later batch to push it out.
    """
    import pyarrow as pa

    start = 0
    while start < len(todo):
        piece = todo[start : start + max(1, PIECE_ROWS)]
        table = _table(batch, start, piece)
        while table.nbytes > PIECE_BYTES and len(piece) > 1:
            piece = piece[: len(piece) // 2]
            table = _table(batch, start, piece)
        pad = max(0, BLOCK_BYTES + 1 - table.nbytes)
        yield table.append_column(
            "pad", pa.array([b"\0" * pad] + [b""] * (len(piece) - 1), pa.binary())
        )
        start += len(piece)


def _table(batch: int, start: int, todo: list[Passage]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "batch": pa.array([batch] * len(todo), pa.int64()),
            "pos": pa.array(range(start, start + len(todo)), pa.int64()),
            "id": [p.id for p in todo],
            "doc_id": [p.doc_id for p in todo],
            "chunk": pa.array([p.chunk for p in todo], pa.int64()),
            "title": [p.title for p in todo],
            "text": [p.text for p in todo],
            "metadata": [json.dumps(p.metadata, ensure_ascii=False) for p in todo],
        }
    )


def _queue_source(queue: Any) -> Any:
    """A Ray Data datasource whose one read task relays the driver's planned batches."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlannedBatches(Datasource):
        def get_name(self) -> str:
            return "WinnowPlannedBatches"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            def relay() -> Iterator[Any]:
                import ray

                while True:
                    item = queue.get()
                    if item is SENTINEL:
                        return
                    yield ray.get(item[0])

            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(relay, meta)]

    return PlannedBatches()


class EmbedWriter:
    """One Ray actor: loads the Embedder once; embeds each batch; writes it to a Milvus server."""

    def __init__(self, settings: Settings, write: bool, threads: int) -> None:
        import torch

        from pipeline.runtime import build_embedder, open_store

        torch.set_num_threads(max(1, threads))
        self.settings = settings
        device = settings.embed_device
        if device == "auto" and not _assigned_gpus():
            device = "cpu"  # a GPU is used only when the actor reserved one (--gpus-per-actor)
        self.embedder = build_embedder(settings.model_copy(update={"embed_device": device})).load()
        self.store = open_store(settings) if write else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        passages = [
            Passage(doc_id=str(d), chunk=int(c), text=str(x), title=str(t), metadata=json.loads(m))
            for d, c, x, t, m in zip(
                batch["doc_id"],
                batch["chunk"],
                batch["text"],
                batch["title"],
                batch["metadata"],
                strict=True,
            )
        ]
        for p, want in zip(passages, batch["id"], strict=True):
            if p.id != want:  # the row did not survive the trip unchanged: never store it
                raise ValueError(f"passage {want} of {p.doc_id!r} changed in transit")
        n = len(passages)
        t = time.perf_counter()
        vectors = self.embedder.embed([p.search_text for p in passages], query=False)
        embed_s = time.perf_counter() - t
        out: dict[str, np.ndarray] = {
            "batch": np.asarray(batch["batch"]),
            "pos": np.asarray(batch["pos"]),
            "embed_s": np.full(n, embed_s / max(n, 1)),
        }
        write_s = 0.0
        if self.store is not None:
            t = time.perf_counter()
            upsert_bounded(self.store, passages, vectors, self.settings.ingest_batch_size)
            write_s = time.perf_counter() - t
        else:
            out["dense"] = vectors
        out["write_s"] = np.full(n, write_s / max(n, 1))
        return out


def _assigned_gpus() -> bool:
    import ray

    return bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))


class RayIngestJob(IngestJob):
    """``IngestJob`` whose embedding (and server writes) run in a Ray Data actor pool."""

    engine = "ray"

    def __init__(self, settings: Settings, **kw: Any) -> None:
        import_ray()  # fail with the install hint before loading anything
        if kw.get("embedder") is None:
            from pipeline.runtime import build_embedder

            # the driver needs the tokenizer and the dimension only: keep it off the GPU
            kw["embedder"] = build_embedder(settings.model_copy(update={"embed_device": "cpu"}))
        super().__init__(settings, **kw)
        self.ray_started = False

    def _execute(self, plans: Iterator[Plan], stats: IngestStats, bar: Progress) -> None:
        ray = import_ray()
        started = start_ray(self.settings)
        self.ray_started = True
        try:
            self._run_pool(ray, plans, stats, bar)
        finally:
            if started:
                ray.shutdown()

    def _run_pool(self, ray: Any, plans: Iterator[Plan], stats: IngestStats, bar: Progress) -> None:
        from ray.util.queue import Queue

        s = self.settings
        actors, gpus = s.ray_actors, s.ray_gpus_per_actor
        in_workers = not self.store.is_lite
        max_inflight = 2 * actors + 2
        queue = Queue()  # unbounded: ``slots`` bounds the batches in flight, so put never blocks
        slots = threading.BoundedSemaphore(max_inflight)
        stop = threading.Event()
        lock = threading.Lock()
        inflight: dict[int, list[Any]] = {}  # batch -> [plan, rows not yet back]
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                for k, plan in enumerate(plans):
                    if stop.is_set():  # the consumer failed: stop reading
                        return
                    if not plan.todo:  # nothing to write first: the stale ones can go now
                        with lock:
                            self.delete_stale(plan, stats)
                        continue
                    while not slots.acquire(timeout=0.5):
                        if stop.is_set():
                            return
                    with lock:
                        inflight[k] = [plan, len(plan.todo)]
                    for block in to_blocks(k, plan.todo):
                        # in a list: a bare ObjectRef argument is resolved into the queue actor
                        queue.put([ray.put(block)])
            except BaseException as exc:
                failure.append(exc)
            finally:
                queue.put(SENTINEL)

        cpus = actor_cpus(ray, actors, gpus)
        log.info(
            "ray engine: %d actor(s) × (%d CPU, %g GPU); writes from %s",
            actors,
            cpus,
            gpus,
            "the actors" if in_workers else "the driver (Milvus Lite is one process per file)",
        )
        ctx = ray.data.DataContext.get_current()
        saved = ctx.target_max_block_size, ctx.enable_progress_bars
        ctx.target_max_block_size = BLOCK_BYTES
        ctx.enable_progress_bars = False  # the driver's own bar counts passages
        producer = threading.Thread(target=produce, name="winnow-plan", daemon=True)
        try:
            ds = ray.data.read_datasource(
                _queue_source(queue), override_num_blocks=1, num_cpus=0
            ).map_batches(
                EmbedWriter,
                fn_constructor_kwargs={"settings": s, "write": in_workers, "threads": cpus},
                batch_size=None,  # one block = one call; blocks never mix planned batches
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus,
                num_gpus=gpus if gpus > 0 else None,
            )
            producer.start()
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                self._collect(out, inflight, lock, slots, stats, bar, in_workers)
        finally:
            stop.set()
            if producer.is_alive():
                producer.join()
            ctx.target_max_block_size, ctx.enable_progress_bars = saved
        if failure:
            raise failure[0]
        if inflight:
            raise RuntimeError(f"{len(inflight)} batch(es) never came back from the Ray workers")

    def _collect(
        self,
        out: dict[str, np.ndarray],
        inflight: dict[int, list[Any]],
        lock: threading.Lock,
        slots: threading.BoundedSemaphore,
        stats: IngestStats,
        bar: Progress,
        in_workers: bool,
    ) -> None:
        """Take back one output block; write it (Lite), finish the batches it completes."""
        stats.embed_s += float(out["embed_s"].sum())
        stats.write_s += float(out["write_s"].sum())
        for k in np.unique(out["batch"]):
            rows = np.flatnonzero(out["batch"] == k)
            with lock:
                entry = inflight[int(k)]
            plan: Plan = entry[0]
            if not in_workers:
                t = time.perf_counter()
                todo = [plan.todo[int(i)] for i in out["pos"][rows]]
                upsert_bounded(
                    self.store, todo, out["dense"][rows], self.settings.ingest_batch_size
                )
                stats.write_s += time.perf_counter() - t
            stats.embedded += len(rows)
            entry[1] -= len(rows)
            bar.embedded(len(rows))
            if entry[1] == 0:  # all new passages of the batch are stored: now the stale ones
                t = time.perf_counter()
                with lock:
                    self.delete_stale(plan, stats)
                    del inflight[int(k)]
                stats.write_s += time.perf_counter() - t
                slots.release()
                log.debug("wrote %d passages, deleted %d", len(plan.todo), len(plan.stale))
