"""The reranker's layout, read from the source: the factory is imported by the composition root only,
nothing below the factory imports a backend, no two rerank files import each other, and importing
the contract loads no heavy library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module → the pipeline modules it imports (anywhere in the file, TYPE_CHECKING included)."""
    modules = {module_name(p): p for p in PIPELINE.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[name] = {m for m in found if m in modules and m != name}
    return out


def test_only_the_composition_root_imports_the_factory() -> None:
    users = {m for m, deps in imports().items() if "pipeline.rerank.factory" in deps}
    assert users == {"pipeline.runtime"}


def test_no_upward_imports_into_backends_and_no_circles() -> None:
    graph = imports()
    backends = "pipeline.rerank.backends"
    for module, deps in graph.items():
        if module.startswith("pipeline.rerank") and not module.startswith(backends):
            if module == "pipeline.rerank.factory":
                continue
            assert not {d for d in deps if d.startswith(backends)}, module
        for dep in deps:
            if dep.startswith("pipeline.rerank") or module.startswith("pipeline.rerank"):
                assert module not in graph.get(dep, set()), f"{module} <-> {dep}"


def test_the_contract_loads_no_heavy_library() -> None:
    code = (
        "import sys, pipeline, pipeline.rerank, pipeline.rerank.base, pipeline.rerank.factory, "
        "pipeline.rerank.batcher, pipeline.rerank.cache, pipeline.rerank.backends.hf.engine, "
        "pipeline.rerank.backends.vllm, pipeline.devices; "
        "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
