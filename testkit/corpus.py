"""The small corpus the tests and benchmarks ingest (six topics, one passage each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPUS = {
    "photosynthesis": (
        "Photosynthesis",
        "Plants use chlorophyll in their leaves to turn sunlight, water and carbon dioxide into "
        "glucose and oxygen. This process is called photosynthesis.",
    ),
    "volcano": (
        "Volcanoes",
        "A volcano is a rupture in the crust of a planet where molten lava, ash and gases escape "
        "from a magma chamber below the surface.",
    ),
    "python": (
        "Python language",
        "Python is a high-level programming language known for readable syntax; it is used for "
        "web development, data science and scripting.",
    ),
    "marathon": (
        "Marathon running",
        "The marathon is a long-distance foot race of 42.195 kilometres, commemorating the run "
        "of the Greek messenger from Marathon to Athens.",
    ),
    "coffee": (
        "Coffee",
        "Coffee is brewed from roasted coffee beans, the seeds of berries from Coffea plants; "
        "caffeine makes it a stimulant.",
    ),
    "tides": (
        "Ocean tides",
        "Tides are the rise and fall of sea levels caused by the gravitational pull of the moon "
        "and the sun on the Earth's oceans.",
    ),
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def corpus_records() -> list[dict]:
    return [{"_id": k, "title": t, "text": x, "metadata": {}} for k, (t, x) in CORPUS.items()]


def ingest_corpus(settings: Any, embedder: Any, folder: Path) -> None:
    """The sample corpus ingested into ``settings``' collection, as ``python -m ingest`` does."""
    from ingest.job import IngestJob

    job = IngestJob(settings, embedder=embedder)
    job.run([write_jsonl(folder / "corpus.jsonl", corpus_records())], progress=False)
    job.store.close()


def prose(rng: Any, chars: int, words: list[str]) -> str:
    """``chars`` characters of random ``words`` (``rng``: a ``random.Random``), for work of a known
    length."""
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(words)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]
