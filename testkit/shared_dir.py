"""Where the tests look for ``../shared`` (the real Qwen3 tokenizer, SciFact): one place.

A user's clone has no ``../shared``; CI has it and also runs the suite with
``WINNOW_SHARED_DIR`` pointing at an empty folder, so every test that needs it must skip (or build
its data) without it.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("WINNOW_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
QWEN3_TOKENIZER = SHARED / "models" / "qwen3-tokenizer"
SCIFACT = SHARED / "data" / "scifact"
