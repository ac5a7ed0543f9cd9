"""Rules the suite keeps so it passes on any machine, checked by reading the tests themselves."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTTPX_CALLS = {
    "get",
    "post",
    "put",
    "patch",
    "delete",
    "request",
    "stream",
    "Client",
    "AsyncClient",
}


def _httpx_calls_without_timeout(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "httpx"):
            continue
        if node.func.attr not in HTTPX_CALLS:
            continue
        kwargs = {k.arg for k in node.keywords}
        if "timeout" not in kwargs and None not in kwargs:  # None: **kwargs may carry it
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno} httpx.{node.func.attr}(…)")
    return bad


def test_no_http_call_relies_on_a_default_client_timeout() -> None:
    """httpx's default 5 s timeout fails a slow call on a loaded 2-core machine: each test says how
    long its call may take (a client built with ``timeout=`` covers the calls made through it)."""
    bad = [
        where
        for folder in ("tests", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for where in _httpx_calls_without_timeout(path)
    ]
    assert not bad, "give these calls an explicit timeout=:\n" + "\n".join(bad)
