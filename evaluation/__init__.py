"""BEIR-format evaluation of the search service: nDCG@10, Recall@10/@100 and MRR@10 per retrieval mode.

It lives beside ``pipeline`` and ``ingest`` rather than inside the query package because it uses both:
the corpus goes into its own collection (``eval_<dataset>_<hash8 of the embed model>``) through the
ordinary ``IngestJob`` (a rerun skips unchanged documents without embedding), and every query goes
through ``SearchService``. Measures come from ``ranx``; nothing here computes a metric by hand.

- ``data``: reading BEIR queries and qrels;  ``report``: measures, tables, run files;
- ``run``: :func:`evaluate`;  ``cli``: ``python -m pipeline eval`` (also ``python -m evaluation``).
"""

from evaluation.data import Dataset, DatasetError, default_collection, load_dataset
from evaluation.report import METRICS, MODES, EvalReport, ModeResult, measure, render
from evaluation.run import EvalError, evaluate

__all__ = [
    "METRICS",
    "MODES",
    "Dataset",
    "DatasetError",
    "EvalError",
    "EvalReport",
    "ModeResult",
    "default_collection",
    "evaluate",
    "load_dataset",
    "measure",
    "render",
]
