"""The import graph of the project's own code: no two files import each other, no package cycles,
no import of an entry point, and the library (``pipeline``) imports neither ``ingest`` nor
``evaluation`` (only its CLI entry point, ``pipeline/__main__.py``, reaches the evaluator).

Read with ``ast``, every import counted (lazy ones inside functions and ``TYPE_CHECKING`` ones too).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "ingest", "evaluation", "testkit", "bench")
EXEMPT: tuple[str, ...] = ()  # nothing is exempt: a module that must break a rule moves instead


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> set[str]:
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                module = f"{anchor}.{module}" if module else anchor
            targets = [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            found = _resolve(target)
            if found is not None and found != name:
                out.add(found)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _exempt(*names: str) -> bool:
    return any(n == e or n.startswith(e + ".") for n in names for e in EXEMPT)


# Folders whose own files span layers, so each of their files is a node of its own: ``pipeline/``
# (foundation … composition, below) and ``pipeline/rerank/`` (the contract under the backends, the
# factory above them; tests/test_rerank_layout.py checks that order).
SPANNING = ("pipeline", "pipeline.rerank")


def _package(name: str) -> str:
    """The node of a module: its folder, or itself in a spanning folder."""
    folder = name.rpartition(".")[0]
    if MODULES[name].name == "__init__.py" or folder in SPANNING:
        return name
    return folder


# The layers (docs/architecture.md), lowest first: a module may import its own layer or a lower one.
LAYERS: list[tuple[str, ...]] = [
    (  # foundation: pure types, rules and settings (no Milvus, no torch at import)
        "pipeline.domain",
        "pipeline.ranking",
        "pipeline.errors",
        "pipeline.fusion",
        "pipeline.breaker",
        "pipeline.logs",
        "pipeline.model_files",
        "pipeline.devices",
        "pipeline.gpu",
        "pipeline.config",
    ),
    ("pipeline.store", "pipeline.rerank", "pipeline.embedding"),  # components, behind contracts
    # use cases over the contracts (chunking cuts by the embedder's tokenizer)
    (
        "pipeline.search",
        "pipeline.reranking",
        "pipeline.writes",
        "pipeline.documents",
        "pipeline.chunking",
    ),
    ("pipeline.runtime",),  # the composition root: builds the components from Settings
    ("pipeline.api", "pipeline.__main__", "pipeline.settings_docs", "ingest", "evaluation"),
    ("testkit", "bench"),  # test support and benchmarks, above everything they drive
]


def _layer(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in layer):
            return i
    return None


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if m != "pipeline" and _layer(m) is None]
    assert not missing, f"place these in LAYERS (and docs/architecture.md): {missing}"


def test_no_import_from_a_lower_layer_up() -> None:
    up = sorted(
        (a, b)
        for a, targets in GRAPH.items()
        for b in targets
        if b != "pipeline"
        and (la := _layer(a)) is not None
        and (lb := _layer(b)) is not None
        and lb > la
        and not _exempt(a, b)
    )
    assert not up, f"imports from a lower layer up to a higher one: {up}"


def test_graph_is_read() -> None:
    assert "pipeline.config" in GRAPH["pipeline.runtime"]
    assert "pipeline.api.connections" in GRAPH["pipeline.api.server"]  # a lazy import inside
    assert "evaluation.cli" in GRAPH["pipeline.__main__"]


def test_no_two_files_import_each_other() -> None:
    circles = sorted(
        (a, b)
        for a, targets in GRAPH.items()
        for b in targets
        if a < b and a in GRAPH.get(b, ()) and not _exempt(a, b)
    )
    assert not circles, f"files that import each other: {circles}"


def test_nothing_imports_an_entry_point() -> None:
    bad = [(a, b) for a, targets in GRAPH.items() for b in targets if b.endswith("__main__")]
    assert not bad, f"imports of a __main__ module (move the shared piece down a layer): {bad}"


def test_library_imports_neither_ingest_nor_evaluation() -> None:
    bad = [
        (a, b)
        for a, targets in GRAPH.items()
        if a.startswith("pipeline") and a != "pipeline.__main__"
        for b in targets
        if b.split(".")[0] in ("ingest", "evaluation")
    ]
    assert not bad, bad


def test_no_package_cycles() -> None:
    """Packages (folders) as nodes, an arrow where a file of one imports a module of another;
    ``__main__`` files are entry points above every package, not part of one."""
    arrows: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        if a.endswith("__main__"):
            continue
        for b in targets:
            pa, pb = _package(a), _package(b)
            if pa != pb and not _exempt(pa, pb):
                arrows.setdefault(pa, set()).add(pb)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(arrows.get(node, ()))
        return False

    cycles = sorted(
        (a, b) for a, targets in arrows.items() for b in targets if a < b and reaches(b, a)
    )
    assert not cycles, f"package cycles through: {cycles}"
