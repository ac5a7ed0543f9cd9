"""Static checks of the split topology: docker-compose.yml + docker-compose.remote.yml + deploy/nginx.conf.

No Docker: the files are parsed and merged the way compose merges them, and the wiring (reranker
service ↔ api settings ↔ load balancer) is checked against each other and against ``Settings``.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from stack_files import (
    COMPOSE,
    INTERPOLATION,
    ROOT,
    SETTINGS_ENV,
    env_example,
    env_of,
    interpolate,
    load_compose,
    merge,
)

from pipeline.config import Settings
from pipeline.rerank.backends.remote.reranker import RemoteReranker
from pipeline.rerank.backends.vllm import HF_OVERRIDES
from pipeline.rerank.cache import unwrap
from pipeline.rerank.factory import build_reranker

REMOTE = ROOT / "docker-compose.remote.yml"
NGINX = ROOT / "deploy" / "nginx.conf"


def flag(command: list[str], name: str) -> str:
    args = [interpolate(a) for a in command]
    assert name in args, f"{name} missing from the reranker command"
    return args[args.index(name) + 1]


def gpu_reserved(service: dict[str, Any]) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        for d in devices.get("devices", [])
    )


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return merge(load_compose(COMPOSE), load_compose(REMOTE))


@pytest.fixture(scope="module")
def services(stack: dict[str, Any]) -> dict[str, Any]:
    return stack["services"]


def test_single_container_topology_is_still_the_default() -> None:
    base = load_compose(COMPOSE)["services"]
    assert "reranker" not in base and "lb" not in base
    assert env_of(base["api"])["WINNOW_RERANK_BACKEND"] in ("vllm", "hf", "auto")
    assert gpu_reserved(base["api"])


def test_reranker_is_vllm_serve_with_the_qwen3_overrides(services: dict[str, Any]) -> None:
    rr = services["reranker"]
    image, _, tag = interpolate(rr["image"]).partition(":")
    assert image == "vllm/vllm-openai"
    pin = re.search(r'"vllm==([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pin and tag == f"v{pin.group(1)}", "the image runs the vLLM version pyproject pins"
    cmd = rr["command"]
    assert interpolate(cmd[0]) == Settings().rerank_model  # positional model of `vllm serve`
    assert flag(cmd, "--runner") == "pooling"
    assert json.loads(flag(cmd, "--hf_overrides")) == HF_OVERRIDES
    assert "--enable-prefix-caching" in cmd
    # no server-side template: the api sends pre-formatted sides (qwen3-formatted) instead
    assert not any("chat-template" in str(a) or "chat_template" in str(a) for a in cmd)
    assert int(flag(cmd, "--max-model-len")) == Settings().rerank_max_length
    assert float(flag(cmd, "--gpu-memory-utilization")) == Settings().vllm_gpu_memory_utilization
    assert flag(cmd, "--host") == "0.0.0.0"
    assert gpu_reserved(rr)
    check = " ".join(rr["healthcheck"]["test"])
    assert f"127.0.0.1:{flag(cmd, '--port')}/health" in check
    assert rr["healthcheck"]["start_period"]  # the first start downloads the model
    assert "reranker-cache:/root/.cache/huggingface" in rr["volumes"]


def test_api_reranks_through_the_reranker_service(services: dict[str, Any]) -> None:
    api, rr = services["api"], services["reranker"]
    assert not gpu_reserved(api) and "deploy" not in api
    env = env_of(api)
    assert env["WINNOW_RERANK_BACKEND"] == "remote"
    assert env["WINNOW_RERANK_REMOTE_FORMAT"] == "qwen3-formatted"
    url = urlsplit(env["WINNOW_RERANK_URL"])
    assert url.hostname == "reranker" and url.hostname in services
    assert url.port == int(flag(rr["command"], "--port"))
    assert url.path == "/v1/rerank"  # the path vLLM guards with --api-key
    # the `model` field sent is the name vllm serve serves (else it answers 404)
    assert env["WINNOW_RERANK_REMOTE_MODEL"] == interpolate(rr["command"][0])
    # one key for both sides
    assert api["environment"]["WINNOW_RERANK_API_KEY"] == rr["environment"]["VLLM_API_KEY"]
    assert "reranker" in api["depends_on"]
    # the values the stack sets build the remote backend
    settings = Settings(
        **{k.removeprefix("WINNOW_").lower(): v for k, v in env.items() if k in SETTINGS_ENV}
    )
    reranker = unwrap(build_reranker(settings.reranker))
    assert isinstance(reranker, RemoteReranker)
    assert reranker.urls == ["http://reranker:8000/v1/rerank"]
    assert reranker.remote_model == "Qwen/Qwen3-Reranker-0.6B"


def test_api_scales_behind_the_load_balancer(services: dict[str, Any]) -> None:
    api, lb = services["api"], services["lb"]
    # `--scale api=N`: no fixed host port and no container_name on the replicated service
    assert "ports" not in api and "container_name" not in api
    assert "lb" in services and lb["image"].startswith("nginx:")
    published = [interpolate(p) for p in lb["ports"]]
    assert published == ["8000:8000"]
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in lb["volumes"]
    assert "api" in lb["depends_on"]
    conf = NGINX.read_text(encoding="utf-8")
    assert re.search(r"^\s*listen 8000;", conf, re.M)
    assert "resolver 127.0.0.11" in conf  # Docker's DNS: every replica, re-resolved
    api_port = env_of(api)["WINNOW_PORT"]
    assert re.search(rf"set \$winnow_api http://api:{api_port};", conf)
    assert "proxy_pass $winnow_api;" in conf


def test_ingest_still_matches_the_api(services: dict[str, Any]) -> None:
    api, ingest = env_of(services["api"]), env_of(services["ingest"])
    for key in ("WINNOW_MILVUS_URI", "WINNOW_COLLECTION", "WINNOW_EMBED_MODEL"):
        assert api[key] == ingest[key], key
    assert services["api"]["image"] == services["ingest"]["image"]


def test_volumes_declared(stack: dict[str, Any]) -> None:
    declared = set(stack["volumes"])
    for name, service in stack["services"].items():
        for entry in service.get("volumes", []):
            source = interpolate(entry).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source!r} is not declared"
            elif source.startswith("./deploy/"):
                assert (ROOT / source).is_file(), f"{name}: {source} missing"


def test_variables_known_and_documented() -> None:
    text = REMOTE.read_text(encoding="utf-8")
    used = {m.group(1) for m in INTERPOLATION.finditer(text) if m.group(1)}
    documented = {name: active for name, _, active in env_example()}
    assert not used - set(documented), f"not in .env.example: {sorted(used - set(documented))}"
    assert not {v for v in used if documented[v]}, "an active .env line would shadow a default"
    winnow = set(re.findall(r"\bWINNOW_[A-Z0-9_]+\b", text))
    assert not winnow - SETTINGS_ENV, sorted(winnow - SETTINGS_ENV)


def test_readme_documents_the_topology() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "-f docker-compose.yml -f docker-compose.remote.yml" in readme
    assert "--scale api=" in readme
    assert "WINNOW_RERANK_REMOTE_FORMAT" in readme
