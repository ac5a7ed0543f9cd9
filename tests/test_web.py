"""The search page (GET /) in headless Chromium against the real app: real MiniLM, Milvus Lite.

Needs Debian's Chromium (``apt-get install chromium``, see .ci/install-browser.sh) and the
``playwright`` package; ``playwright install`` is never needed (the system browser is used).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LiveServer, corpus_records, wait_healthy, write_jsonl

from pipeline.config import Settings


def find_chromium() -> str | None:
    env = os.environ.get("WINNOW_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


CHROMIUM = find_chromium()
HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAVE_PLAYWRIGHT, reason="playwright is not installed (pip install -e '.[dev]')"
    ),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium at /usr/bin/chromium or on PATH (apt-get install chromium, "
        "or .ci/install-browser.sh; WINNOW_CHROMIUM=/path overrides)",
    ),
]

API_KEY = "web-test-key"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# a document whose title and text are markup: the page must show it as text, never run it
HOSTILE_TITLE = '<img src=x onerror="window.__xss=1">Tags & <b>markup</b>'
HOSTILE_TEXT = (
    "A page about HTML tags <script>window.__xss=2</script> and angle brackets like <i> and "
    "&amp; entities."
)
SCORE = r"\d\.\d{4}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[LiveServer]:
    from ingest.job import IngestJob
    from pipeline.api import create_app

    tmp = tmp_path_factory.mktemp("web")
    records = [
        *corpus_records(),
        {"_id": "markup", "title": HOSTILE_TITLE, "text": HOSTILE_TEXT, "metadata": {}},
    ]
    path = write_jsonl(tmp / "corpus.jsonl", records)
    settings = Settings(
        milvus_uri=str(tmp / "w.db"), embed_device="cpu", rerank=False, api_key=API_KEY
    )
    job = IngestJob(settings, embedder=embedder)
    job.run([path], progress=False)
    job.store.close()
    with LiveServer(create_app(settings, embedder=embedder)) as server:
        wait_healthy(server.url)
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """One browser context + page; records page errors and every URL the page requests."""

    def __init__(self, browser, live: LiveServer, key: str | None = API_KEY) -> None:
        self.ctx = browser.new_context(viewport={"width": 1100, "height": 900})
        if key is not None:  # what a previous visit leaves in localStorage
            self.ctx.add_init_script(f"localStorage.setItem('winnow.apiKey', {key!r})")
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(live.url + "/")
        # /ready has answered once the status pill leaves "checking"
        self.page.wait_for_function(
            "!document.querySelector('[data-testid=server-status]')"
            ".textContent.startsWith('checking')"
        )

    def tid(self, name: str):
        return self.page.get_by_test_id(name)

    def search(self, query: str | None = None, *, enter: bool = False) -> None:
        if query is not None:
            self.tid("query").fill(query)
        done = int(self.page.evaluate("document.body.dataset.searches"))
        if enter:
            self.tid("query").press("Enter")
        else:
            self.tid("search").click()
        self.page.wait_for_function(f"Number(document.body.dataset.searches) > {done}")

    def close(self, live: LiveServer) -> None:
        offsite = [u for u in self.requests if not u.startswith(live.url + "/")]
        self.ctx.close()
        assert not offsite, f"page requested other origins (must work offline): {offsite}"
        assert not self.errors, f"JavaScript errors: {self.errors}"


@pytest.fixture
def page(browser, live: LiveServer) -> Iterator[Page]:
    pg = Page(browser, live)
    yield pg
    pg.close(live)


def test_search_shows_ranked_results_scores_and_timings(
    page: Page, live: LiveServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    expect(page.page).to_have_title(re.compile("Winnow"))
    expect(page.tid("server-status")).to_have_text("ready · recall only")
    # this server has no reranker: the toggle is off and disabled, with a note
    expect(page.tid("rerank")).to_be_disabled()
    expect(page.tid("rerank")).not_to_be_checked()
    expect(page.tid("rerank-note")).to_be_visible()
    expect(page.tid("hybrid")).to_be_checked()
    expect(page.tid("top-n")).to_have_value("10")
    expect(page.tid("instruction")).to_be_hidden()  # inside the collapsed "Advanced"

    page.search("why does the sea level rise and fall")
    expect(page.tid("error")).to_be_hidden()
    results = page.tid("result")
    expect(results).to_have_count(7)  # every document of the corpus, best first
    first = results.first
    expect(first.get_by_test_id("rank")).to_have_text("1")
    expect(first.get_by_test_id("title")).to_have_text("Ocean tides")
    expect(first.get_by_test_id("doc-id")).to_have_text("tides")
    expect(first.get_by_test_id("snippet")).to_contain_text("gravitational pull of the moon")
    expect(first.get_by_test_id("rerank-score")).to_have_text("rerank —")
    expect(first.get_by_test_id("recall-score")).to_have_text(
        re.compile(rf"^recall \(RRF\) {SCORE}$")
    )
    expect(results.nth(1).get_by_test_id("rank")).to_have_text("2")
    expect(page.tid("timings")).to_have_text(
        re.compile(
            r"embed [\d.]+ ms · recall [\d.]+ ms · rerank off · total [\d.]+ ms"
            r".*7 of \d+ candidates, hybrid, not reranked"
        )
    )
    page.page.screenshot(path=str(tmp_path / "web-results.png"), full_page=True)

    # Enter submits; dense recall and top_n reach the API
    page.tid("hybrid").uncheck()
    page.tid("top-n").fill("2")
    page.search("a drink made from roasted beans", enter=True)
    expect(results).to_have_count(2)
    expect(first.get_by_test_id("title")).to_have_text("Coffee")
    recall = first.get_by_test_id("recall-score").text_content() or ""
    assert re.fullmatch(rf"recall {SCORE}", recall), recall
    assert 0.0 < float(recall.split()[-1]) <= 1.0  # a cosine, not an RRF score
    expect(page.tid("timings")).to_contain_text("dense, not reranked")
    assert "q=a+drink" in page.page.url  # the query is in the address bar (shareable)


def test_errors_show_the_server_message(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.search("   ")  # nothing to search: said on the page, no request made
    expect(page.tid("error")).to_have_text(re.compile("Type something"))
    assert not any(u.endswith("/v1/search") for u in page.requests)

    page.tid("top-n").fill("0")
    page.search("volcano eruption")
    error = page.tid("error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("422")
    expect(error).to_contain_text("top_n")
    expect(error).to_contain_text("greater than or equal to 1")
    expect(page.tid("result")).to_have_count(0)
    expect(page.tid("timings")).to_be_hidden()

    page.tid("top-n").fill("3")
    page.tid("advanced").locator("summary").click()
    page.tid("filter").fill("doc_id ===")
    page.search()
    expect(error).to_contain_text("invalid_filter")
    expect(error).to_contain_text("is not a valid expression")
    page.page.screenshot(path=str(tmp_path / "web-error.png"), full_page=True)

    page.tid("filter").fill('doc_id == "volcano"')
    page.search()
    expect(error).to_be_hidden()
    expect(page.tid("result")).to_have_count(1)
    expect(page.tid("result").first.get_by_test_id("doc-id")).to_have_text("volcano")


def test_api_key_prompt_and_document_text_is_not_html(
    browser, live: LiveServer, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    pg = Page(browser, live, key=None)  # first visit: no key stored
    try:
        pg.search("how do plants make oxygen")
        error = pg.tid("error")
        expect(error).to_contain_text("401")
        expect(error).to_contain_text("missing or wrong API key")
        expect(pg.tid("api-key")).to_be_visible()  # "Advanced" opened to ask for it
        expect(pg.tid("api-key")).to_be_focused()

        pg.tid("api-key").fill(API_KEY)
        pg.search(enter=True)
        expect(error).to_be_hidden()
        expect(pg.tid("result").first.get_by_test_id("title")).to_have_text("Photosynthesis")
        assert pg.page.evaluate("localStorage.getItem('winnow.apiKey')") == API_KEY

        # markup in documents shows as text: no element is created and no script runs
        pg.search("HTML tags and angle brackets")
        first = pg.tid("result").first
        expect(first.get_by_test_id("title")).to_have_text(HOSTILE_TITLE)
        expect(first.get_by_test_id("snippet")).to_have_text(HOSTILE_TEXT)
        assert first.locator("[data-testid=title] *, [data-testid=snippet] *").count() == 0
        assert pg.page.evaluate("window.__xss") is None
        pg.page.screenshot(path=str(tmp_path / "web-markup.png"), full_page=True)

        pg.tid("forget-key").click()
        assert pg.page.evaluate("localStorage.getItem('winnow.apiKey')") is None
    finally:
        pg.close(live)


def test_search_from_the_url_waits_for_ready_on_a_recall_only_server(
    browser, live: LiveServer
) -> None:
    """``/?q=…`` is the first thing a new user opens: it must not ask a recall-only server to rerank."""
    from playwright.sync_api import expect

    ctx = browser.new_context()
    ctx.add_init_script(f"localStorage.setItem('winnow.apiKey', {API_KEY!r})")
    page = ctx.new_page()
    page.goto(live.url + "/?q=why+does+the+sea+level+rise+and+fall")
    page.wait_for_function("Number(document.body.dataset.searches || 0) > 0")
    expect(page.get_by_test_id("error")).to_be_hidden()
    expect(page.get_by_test_id("result").first.get_by_test_id("doc-id")).to_have_text("tides")
    expect(page.get_by_test_id("rerank")).to_be_disabled()
    ctx.close()


MARKDOWN_DOC = (
    "# Watering guide\n"
    "\n"
    "Water the plants early in the\n"
    "morning, so that the leaves\n"
    "dry before noon.\n"
    "\n"
    "\n"
    "In hot weather, water them\n"
    "twice a day.\n"
)


def test_snippets_flow_as_paragraphs(browser, embedder, tmp_path: Path) -> None:
    """A hard-wrapped Markdown file reads as paragraphs: a blank line breaks, a single newline does not."""
    from playwright.sync_api import expect

    from ingest.job import IngestJob
    from pipeline.api import create_app

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "watering.md").write_text(MARKDOWN_DOC, encoding="utf-8")
    settings = Settings(milvus_uri=str(tmp_path / "md.db"), embed_device="cpu", rerank=False)
    job = IngestJob(settings, embedder=embedder)
    job.run([docs], progress=False)
    job.store.close()
    with LiveServer(create_app(settings, embedder=embedder)) as server:
        wait_healthy(server.url)
        pg = Page(browser, server, key=None)
        try:
            pg.search("when should I water the plants")
            snippet = pg.tid("result").first.get_by_test_id("snippet")
            expect(snippet).to_be_visible()
            shown = snippet.evaluate("el => el.innerText")  # as rendered: breaks the reader sees
            assert shown == (  # the heading became the title
                "Water the plants early in the morning, so that the leaves dry before noon.\n\n"
                "In hot weather, water them twice a day."
            ), shown
            # at this width each paragraph is one line: no line holds a lone word from the source
            lines = snippet.evaluate(
                "el => { const r = document.createRange(); r.selectNodeContents(el);"
                " return new Set([...r.getClientRects()].map(b => Math.round(b.top))).size; }"
            )
            assert lines <= 3, lines  # 2 paragraphs + the blank line between them
            pg.page.screenshot(path=str(tmp_path / "web-markdown.png"), full_page=True)
        finally:
            pg.close(server)


def test_api_docs_render_offline(browser, live: LiveServer, tmp_path: Path) -> None:
    """/docs loads only from this server (no CDN) and shows the API's routes."""
    path = "/docs"
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    page = ctx.new_page()
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    # nothing off this server may load: other origins are refused as they would be offline
    page.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith(live.url + "/") else route.abort()
        ),
    )
    try:
        page.goto(live.url + path)
        page.get_by_text("/v1/search").first.wait_for(timeout=30_000)
        assert page.get_by_text("/v1/rerank").count() > 0
        page.screenshot(path=str(tmp_path / "docs.png"))
        offsite = [u for u in requested if not u.startswith(live.url + "/")]
        assert not offsite, f"/docs requested other origins: {offsite}"
        assert not errors, errors
    finally:
        ctx.close()


WRITE_KEY = "web-write-key"


@pytest.fixture(scope="module")
def empty_live(tmp_path_factory: pytest.TempPathFactory, embedder) -> Iterator[LiveServer]:
    """A server on an empty store, with a read key and a write key."""
    from pipeline.api import create_app

    tmp = tmp_path_factory.mktemp("web-empty")
    settings = Settings(
        milvus_uri=str(tmp / "w.db"),
        embed_device="cpu",
        rerank=False,
        api_key=API_KEY,
        write_api_key=WRITE_KEY,
    )
    with LiveServer(create_app(settings, embedder=embedder)) as server:
        wait_healthy(server.url)
        yield server


def test_the_page_adds_and_deletes_documents_with_a_write_key(
    browser, empty_live: LiveServer, tmp_path: Path
) -> None:
    """Empty store → count 0 and the hint; a read key cannot write; with the write key: paste a
    document, upload a .md and a .jsonl, find them, delete one; the count follows."""
    from playwright.sync_api import expect

    pg = Page(browser, empty_live)
    page = pg.page

    def act(button: str) -> None:
        done = int(page.evaluate("document.body.dataset.writes || 0"))
        pg.tid(button).click()
        page.wait_for_function(f"Number(document.body.dataset.writes || 0) > {done}")

    try:
        expect(pg.tid("doc-count")).to_have_text("0 documents")
        expect(pg.tid("add-hint")).to_contain_text("POST /v1/documents")
        pg.search("anything")
        expect(pg.tid("result")).to_have_count(0)
        expect(pg.tid("empty")).to_be_visible()

        pg.tid("manage").locator("summary").click()
        pg.tid("doc-id-input").fill("pasted")
        pg.tid("doc-title-input").fill("Glaciers")
        pg.tid("doc-text-input").fill("Glaciers are slow rivers of ice that carve valleys.")
        act("add-doc")  # no write key yet: the read key is refused, and the page says why
        expect(pg.tid("write-status")).to_contain_text("403")
        expect(pg.tid("write-status")).to_contain_text("WINNOW_WRITE_API_KEY")

        pg.tid("write-key").fill(WRITE_KEY)
        act("add-doc")
        expect(pg.tid("write-status")).to_have_text("pasted: created · 1 passage")
        expect(pg.tid("doc-count")).to_have_text("1 document")
        expect(pg.tid("add-hint")).to_be_hidden()

        md = tmp_path / "volcano.md"
        md.write_text("Volcanoes erupt molten lava and ash from magma chambers.")
        pg.tid("doc-id-input").fill("")
        pg.tid("doc-title-input").fill("")
        pg.tid("doc-file").set_input_files(str(md))
        act("add-doc")
        expect(pg.tid("write-status")).to_have_text("volcano.md: created · 1 passage")
        jsonl = tmp_path / "more.jsonl"
        write_jsonl(
            jsonl,
            [
                {"_id": "tea", "title": "Tea", "text": "Tea is brewed from Camellia leaves."},
                {"id": "blank", "text": "  "},
            ],
        )
        pg.tid("doc-file").set_input_files(str(jsonl))
        act("add-doc")
        expect(pg.tid("write-status")).to_have_text(
            "tea: created · 1 passage; blank: rejected (text is empty)"
        )
        expect(pg.tid("doc-count")).to_have_text("3 documents")

        pg.search("rivers of ice carving valleys")
        expect(pg.tid("result").first.get_by_test_id("doc-id")).to_have_text("pasted")
        expect(pg.tid("result").first.get_by_test_id("title")).to_have_text("Glaciers")

        pg.tid("delete-id").fill("pasted")
        act("delete-doc")
        expect(pg.tid("write-status")).to_have_text("pasted: deleted")
        expect(pg.tid("doc-count")).to_have_text("2 documents")
        pg.search("rivers of ice carving valleys")
        expect(pg.tid("result").first.get_by_test_id("doc-id")).not_to_have_text("pasted")
        act("delete-doc")
        expect(pg.tid("write-status")).to_have_text("pasted: not_found")
        page.screenshot(path=str(tmp_path / "web-documents.png"), full_page=True)
    finally:
        pg.close(empty_live)
