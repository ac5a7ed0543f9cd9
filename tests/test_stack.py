"""Static checks of the container stack: Dockerfile, docker-compose*.yml, .env.example, docs/stack.md.

No Docker, no subprocesses, no models: the files are parsed (``stack_files``) and their wiring is checked
against each other and against ``pipeline.config.Settings``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from stack_files import (
    API_PORT,
    COMPOSE,
    COMPOSE_CPU,
    COMPOSE_ONLY_WINNOW,
    DOCKERFILE,
    INTERPOLATION,
    MILVUS_URI_IN_STACK,
    RESET,
    ROOT,
    SETTINGS_ENV,
    STACK_DOC,
    WINNOW_VAR,
    ComposeLoader,
    container_ports,
    depends_on,
    dockerfile_env,
    dockerfile_instructions,
    env_example,
    env_of,
    healthcheck_test,
    interpolate,
    load_compose,
    merge,
    mounts,
    only,
)

from pipeline.config import DEFAULT_EMBED_MODEL, FIELDS, Settings


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def cpu_services(compose: dict[str, Any]) -> dict[str, Any]:
    return merge(compose, load_compose(COMPOSE_CPU))["services"]


def test_services_exist(services: dict[str, Any]) -> None:
    assert {"etcd", "minio", "milvus", "api", "ingest"} <= set(services)


def test_milvus_standalone_wiring(services: dict[str, Any]) -> None:
    etcd, minio, milvus = services["etcd"], services["minio"], services["milvus"]
    assert interpolate(etcd["image"]).startswith("quay.io/coreos/etcd:v3.5.")
    assert re.fullmatch(r"milvusdb/milvus:v2\.[56]\.\d+", interpolate(milvus["image"]))
    assert milvus["command"] == ["milvus", "run", "standalone"]
    env = env_of(milvus)
    etcd_host, etcd_port = env["ETCD_ENDPOINTS"].split(":")
    minio_host, minio_port = env["MINIO_ADDRESS"].split(":")
    assert (etcd_host, minio_host) == ("etcd", "minio")
    command = etcd["command"]
    assert f"0.0.0.0:{etcd_port}" in command and f"http://etcd:{etcd_port}" in command
    assert "--data-dir /etcd" in command
    assert any(target == "/etcd" for _, target, _ in mounts(etcd))
    assert "minio server /minio_data" in minio["command"]
    assert any(target == "/minio_data" for _, target, _ in mounts(minio))
    assert any(target == "/var/lib/milvus" for _, target, _ in mounts(milvus))
    assert minio_port == "9000"


def test_healthchecks(services: dict[str, Any]) -> None:
    assert "localhost:9091/healthz" in healthcheck_test(services["milvus"])
    assert "etcdctl endpoint health" in healthcheck_test(services["etcd"])
    assert "localhost:9000/minio/health/live" in healthcheck_test(services["minio"])
    # the api uses the image's HEALTHCHECK: it must not be switched off in compose
    assert not services["api"].get("healthcheck", {}).get("disable", False)


def test_depends_on_health(services: dict[str, Any]) -> None:
    milvus_deps = depends_on(services["milvus"])
    assert {"etcd", "minio"} <= set(milvus_deps)
    assert milvus_deps["etcd"] == milvus_deps["minio"] == "service_healthy"
    for name in ("api", "ingest"):
        assert depends_on(services[name]).get("milvus") == "service_healthy", name


def test_api_talks_to_milvus_service(services: dict[str, Any]) -> None:
    env = env_of(services["api"])
    assert env["WINNOW_MILVUS_URI"] == MILVUS_URI_IN_STACK
    host, port = MILVUS_URI_IN_STACK.removeprefix("http://").split(":")
    assert host in services
    assert int(port) in container_ports(services[host])
    assert not Settings(milvus_uri=env["WINNOW_MILVUS_URI"]).is_milvus_lite


def test_api_binds_published_port(services: dict[str, Any]) -> None:
    env = env_of(services["api"])
    assert env["WINNOW_HOST"] == "0.0.0.0"
    assert int(env["WINNOW_PORT"]) == API_PORT
    assert API_PORT in container_ports(services["api"])


def test_gpu_profile_defaults(services: dict[str, Any]) -> None:
    env = env_of(services["api"])
    assert env["WINNOW_EMBED_MODEL"] == "Qwen/Qwen3-Embedding-0.6B"
    assert env["WINNOW_RERANK_MODEL"] == "Qwen/Qwen3-Reranker-0.6B"
    assert env["WINNOW_RERANK_BACKEND"] == "vllm"
    # every value the stack sets must be accepted by Settings
    Settings(**{k.removeprefix("WINNOW_").lower(): v for k, v in env.items() if k in SETTINGS_ENV})


def test_api_and_ingest_agree(services: dict[str, Any]) -> None:
    api, ingest = env_of(services["api"]), env_of(services["ingest"])
    for key in ("WINNOW_MILVUS_URI", "WINNOW_COLLECTION", "WINNOW_EMBED_MODEL"):
        assert api[key] == ingest[key], key
    assert services["api"]["image"] == services["ingest"]["image"]


def test_gpu_reservation(services: dict[str, Any]) -> None:
    devices = services["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
        for d in devices
    )


def test_ingest_profile(services: dict[str, Any]) -> None:
    ingest = services["ingest"]
    assert ingest["profiles"] == ["ingest"]
    assert ingest["command"] == ["python", "-m", "ingest", "/data"]
    assert ("./corpus", "/data", "ro") in mounts(ingest)
    assert "${WINNOW_DATA_DIR:-./corpus}:/data:ro" in ingest["volumes"]
    assert ingest.get("restart", "no") == "no"
    assert ingest.get("healthcheck", {}).get("disable") is True  # no server in the job
    for name in ("etcd", "minio", "milvus", "api"):  # the stack itself starts without a profile
        assert "profiles" not in services[name], name


def test_ports(services: dict[str, Any]) -> None:
    assert container_ports(services["api"]) == {API_PORT}
    assert {19530, 9091} <= container_ports(services["milvus"])


def test_named_volumes(compose: dict[str, Any], cpu_services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    assert {"etcd-data", "minio-data", "milvus-data", "hf-cache"} <= declared
    for services in (compose["services"], cpu_services):
        for name, service in services.items():
            for source, _, _ in mounts(service):
                if not source.startswith((".", "/", "~")):
                    assert source in declared, f"{name}: volume {source!r} is not declared"
    hf_home = dockerfile_env()["HF_HOME"]
    for name in ("api", "ingest"):
        assert ("hf-cache", hf_home, "rw") in mounts(compose["services"][name]), name


def test_cpu_override(compose: dict[str, Any], cpu_services: dict[str, Any]) -> None:
    raw = load_compose(COMPOSE_CPU)["services"]
    for name in ("api", "ingest"):
        assert raw[name]["deploy"] is RESET, f"{name}: the GPU reservation must be reset"
        merged = cpu_services[name]
        assert "deploy" not in merged, name
        assert merged["build"]["args"]["VARIANT"] == "cpu"
        assert merged["build"]["context"] == compose["services"][name]["build"]["context"]
        assert merged["image"] != compose["services"][name]["image"]
        env = env_of(merged)
        assert env["WINNOW_RERANK_BACKEND"] == "hf"
        assert env["WINNOW_EMBED_MODEL"] == DEFAULT_EMBED_MODEL
        assert env["WINNOW_MILVUS_URI"] == MILVUS_URI_IN_STACK
        Settings(
            **{k.removeprefix("WINNOW_").lower(): v for k, v in env.items() if k in SETTINGS_ENV}
        )
    assert depends_on(cpu_services["api"])["milvus"] == "service_healthy"


def test_compose_loader_tolerates_tags() -> None:
    doc = "a: !reset null\nb: !override [1, 2]\nc: !override {x: 1}\nd: !reset []\n"
    assert yaml.load(doc, Loader=ComposeLoader) == {
        "a": RESET,
        "b": [1, 2],
        "c": {"x": 1},
        "d": RESET,
    }
    assert interpolate("${A:-x}/${B-y}/${C}/$$", {"A": "", "B": ""}) == "x///$"


# ================================================================================================
# Variables: compose files, Dockerfile and docs only use WINNOW_* names that Settings knows
# ================================================================================================

STACK_FILES = [*sorted(ROOT.glob("docker-compose*.yml")), DOCKERFILE, STACK_DOC]


def test_stack_files_found() -> None:
    assert COMPOSE in STACK_FILES and COMPOSE_CPU in STACK_FILES
    assert all(p.is_file() for p in STACK_FILES)


@pytest.mark.parametrize("path", STACK_FILES, ids=lambda p: p.name)
def test_winnow_variables_exist_in_settings(path: Path) -> None:
    used = set(WINNOW_VAR.findall(path.read_text(encoding="utf-8")))
    unknown = used - SETTINGS_ENV - COMPOSE_ONLY_WINNOW
    assert not unknown, f"{path.name} uses WINNOW_ variables that Settings lacks: {sorted(unknown)}"


def test_compose_variables_documented() -> None:
    documented = {name for name, _, _ in env_example()}
    for path in (COMPOSE, COMPOSE_CPU):
        used = {m.group(1) for m in INTERPOLATION.finditer(path.read_text(encoding="utf-8"))}
        missing = {v for v in used if v} - documented
        assert not missing, f"{path.name}: not in .env.example: {sorted(missing)}"


# ================================================================================================
# .env.example
# ================================================================================================


def test_env_example_covers_settings() -> None:
    names = [name for name, _, _ in env_example()]
    assert len(names) == len(set(names)), "duplicate entries"
    assert set(names) >= SETTINGS_ENV, f"missing: {sorted(SETTINGS_ENV - set(names))}"
    stray = {n for n in names if n.startswith("WINNOW_")} - SETTINGS_ENV - COMPOSE_ONLY_WINNOW
    assert not stray, f"not Settings fields: {sorted(stray)}"
    assert {"WINNOW_DATA_DIR", "HF_TOKEN", "API_PORT"} <= set(names)


def test_env_example_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("WINNOW_"):
            monkeypatch.delenv(key)
    values = {n: v for n, v, _ in env_example() if n in SETTINGS_ENV}
    for name, value in values.items():
        field = FIELDS[name.removeprefix("WINNOW_").lower()]
        if value == "":
            assert field.default is None, f"{name} is blank but has a default"
            continue
        monkeypatch.setenv(name, value)
    settings = Settings()  # parsed the way the service parses its environment
    for name, field in FIELDS.items():
        assert getattr(settings, name) == field.default, f"WINNOW_{name.upper()}"


def test_env_example_secrets_blank() -> None:
    values = {n: v for n, v, _ in env_example()}
    for name in ("WINNOW_MILVUS_TOKEN", "WINNOW_API_KEY", "HF_TOKEN"):
        assert values[name] == "", name


def test_env_example_does_not_shadow_stack_defaults() -> None:
    """compose reads .env for interpolation: an active line would replace the stack's defaults."""
    interpolated = {
        m.group(1)
        for path in (COMPOSE, COMPOSE_CPU)
        for m in INTERPOLATION.finditer(path.read_text(encoding="utf-8"))
        if m.group(1)
    }
    active = {n for n, _, is_active in env_example() if is_active}
    assert not active & interpolated, sorted(active & interpolated)


# ================================================================================================
# Dockerfile
# ================================================================================================


def test_dockerfile_cmd_runs_pipeline_serve() -> None:
    assert json.loads(only("CMD")) == ["python", "-m", "pipeline", "serve"]
    assert (ROOT / "pipeline" / "__main__.py").is_file()
    assert (ROOT / "ingest" / "__main__.py").is_file()


def test_dockerfile_binds_all_interfaces_on_exposed_port() -> None:
    env = dockerfile_env()
    assert env["WINNOW_HOST"] == "0.0.0.0"
    assert int(env["WINNOW_PORT"]) == API_PORT
    assert only("EXPOSE").split() == [str(API_PORT)]


def test_dockerfile_healthcheck_hits_health_on_app_port() -> None:
    check = only("HEALTHCHECK")
    options, _, command = check.partition(" CMD ")
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    assert "urllib.request" in code and "127.0.0.1" in code and "/health'" in code
    m = re.search(r"os\.environ\.get\('WINNOW_PORT', '(\d+)'\)", code)
    assert m, "the healthcheck must follow WINNOW_PORT"
    assert int(m.group(1)) == int(dockerfile_env()["WINNOW_PORT"]) == API_PORT
    compile(code, "<healthcheck>", "exec")


def test_dockerfile_non_root_user() -> None:
    instructions = dockerfile_instructions()
    users = [i for i, (kw, _) in enumerate(instructions) if kw == "USER"]
    assert users, "no USER"
    user = instructions[users[-1]][1].split(":")[0]
    assert user not in ("root", "0")
    cmd = max(i for i, (kw, _) in enumerate(instructions) if kw == "CMD")
    assert users[-1] < cmd


def test_dockerfile_model_cache_volume() -> None:
    hf_home = dockerfile_env()["HF_HOME"]
    volumes = json.loads(only("VOLUME"))
    assert hf_home in volumes


def test_dockerfile_cpu_variant_compiles_the_reranker_kernels() -> None:
    """WINNOW_RERANK_COMPILE=auto builds inductor's kernels and the native attention op where a C++
    compiler is found: the CPU image ships one, and caches what it builds on the /models volume."""
    run = next(a for kw, a in dockerfile_instructions() if kw == "RUN" and "apt-get" in a)
    cpu_branch = run.split("else", 1)[1].split("fi", 1)[0]
    assert re.search(r"\bg\+\+", cpu_branch) and "python3-dev" in cpu_branch
    cache = dockerfile_env()["TORCHINDUCTOR_CACHE_DIR"]
    assert any(cache.startswith(v + "/") for v in json.loads(only("VOLUME")))


def test_dockerfile_variants() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    args = {
        name: value
        for kw, a in dockerfile_instructions()
        if kw == "ARG"
        for name, _, value in [a.partition("=")]
    }
    assert args["VARIANT"] == "gpu"
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert re.match(r"1[23]\.", args["CUDA_VERSION"])
    assert '".[gpu]"' in text
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^gpu = \["vllm==', pyproject, re.M)
    copied = " ".join(a for kw, a in dockerfile_instructions() if kw == "COPY")
    for needed in ("pyproject.toml", "pipeline", "ingest"):
        assert needed in copied, needed


def test_dockerignore_keeps_build_inputs() -> None:
    rules = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env"} <= rules
    for needed in ("pyproject.toml", "README.md", "pipeline", "ingest"):
        assert needed not in rules and f"{needed}/" not in rules, needed
