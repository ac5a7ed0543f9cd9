"""The embedder's gate: a write's background slices yield to searches, but not for ever.

Fast: a fake encoder records the order of the calls (no timing); the rule is about order.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from pipeline.embedding import FOREGROUND_TURNS, Embedder


class FakeEncoder:
    """Background calls block until released; every call is logged as it starts."""

    def __init__(self, emb: Embedder) -> None:
        self.prompts: dict[str, str] = {}
        self.emb = emb
        self.log: list[str] = []
        self.release = threading.Event()

    def encode(self, texts: list[str], **_: object) -> np.ndarray:
        kind = texts[0]
        self.log.append(kind)
        if kind == "bg" and len(self.log) == 1:
            assert self.release.wait(10)
        if kind == "fg":  # hold the gate until the writer waits again (it always does here)
            wait_for(lambda: self.emb._bg_waiting == 1 or self.log.count("bg") >= self.total_bg)
        return np.zeros((len(texts), 4), dtype=np.float32)

    total_bg = 0


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def run(searches: int, slices: int) -> list[str]:
    emb = Embedder("fake")
    fake = FakeEncoder(emb)
    fake.total_bg = slices
    emb._model = fake  # type: ignore[assignment]

    def writer() -> None:
        for _ in range(slices):
            emb.embed(["bg"], query=False, background=True)

    w = threading.Thread(target=writer)
    w.start()
    wait_for(lambda: fake.log == ["bg"])  # the first slice runs (and blocks)
    threads = [
        threading.Thread(target=emb.embed, args=(["fg"],), kwargs={"query": True})
        for _ in range(searches)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: emb._waiting == searches)  # every search waits behind the slice
    fake.release.set()
    for t in [w, *threads]:
        t.join(10)
    return fake.log


def test_a_waiting_search_goes_before_the_next_slice() -> None:
    assert run(searches=1, slices=3) == ["bg", "fg", "bg", "bg"]


def test_a_steady_search_load_lets_a_slice_through_every_few_searches() -> None:
    log = run(searches=FOREGROUND_TURNS + 2, slices=3)
    assert log == ["bg", *["fg"] * FOREGROUND_TURNS, "bg", "fg", "fg", "bg"], log
