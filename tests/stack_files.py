"""Parsing helpers for the static stack tests: compose files (with !reset/!override tags and
interpolation), the Dockerfile and .env.example. No Docker needed."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import FIELDS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
STACK_DOC = ROOT / "docs" / "stack.md"

SETTINGS_ENV = {f"WINNOW_{name.upper()}" for name in FIELDS}
# WINNOW_-prefixed variables that only docker compose reads (not Settings fields).
COMPOSE_ONLY_WINNOW = {"WINNOW_DATA_DIR"}
MILVUS_URI_IN_STACK = "http://milvus:19530"
API_PORT = 8000

WINNOW_VAR = re.compile(r"\bWINNOW_[A-Z0-9_]+\b")
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- compose loading ------------------------------------------------------------------------------


class _Reset:
    """Stands for a compose ``!reset`` value: the key is removed when files are merged."""

    def __repr__(self) -> str:
        return "RESET"


RESET = _Reset()


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that understands compose's ``!reset`` / ``!override`` merge tags."""


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return RESET


def _construct_override(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    # ``!override`` replaces instead of merging; the merge below already replaces non-mappings.
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data = yaml.load(fh, Loader=ComposeLoader)
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def merge(base: Any, override: Any) -> Any:
    """Compose-style merge for what these tests read: mappings merge key by key, ``!reset`` removes
    a key, anything else is replaced by the override (compose appends some sequences; not needed)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if value is RESET:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out
    return override


def interpolate(value: str, env: Mapping[str, str] | None = None) -> str:
    """Resolve ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` as compose does (``$$`` = ``$``)."""
    env = {} if env is None else env

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?"):
            assert current, f"${{{name}}} is required"
            return current
        return current or ""

    return INTERPOLATION.sub(repl, value)


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping form required, so override files merge key by key),
    with defaults interpolated from an empty environment."""
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of `environment` so overrides merge by key"
    return {k: interpolate(str(v)) for k, v in env.items()}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def container_ports(service: Mapping[str, Any]) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(interpolate(str(entry)).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) for each short-syntax volume, sources interpolated."""
    out: list[tuple[str, str, str]] = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), "use the short volume syntax"
        parts = interpolate(entry).split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def healthcheck_test(service: Mapping[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test")
    assert test, "missing healthcheck test"
    return " ".join(test) if isinstance(test, list) else str(test)


# --- Dockerfile parsing ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "dangling line continuation in Dockerfile"
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", args):
                env[key] = value
    return env


def only(keyword: str) -> str:
    found = [args for kw, args in dockerfile_instructions() if kw == keyword]
    assert found, f"Dockerfile has no {keyword}"
    return found[-1]  # the last one wins in the final stage


# --- .env.example parsing -------------------------------------------------------------------------

ENV_LINE = re.compile(r"^(#\s?)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> Iterator[tuple[str, str, bool]]:
    """(NAME, value, active) for each ``NAME=value`` line, commented (``# NAME=value``) or not."""
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = ENV_LINE.match(line.strip())
        if m:
            value = m.group(3).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            yield m.group(2), value, m.group(1) is None


# ================================================================================================
# docker-compose.yml
# ================================================================================================
