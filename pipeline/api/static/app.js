// Winnow search page. Vanilla JS, no dependencies. Document and server text is only ever
// inserted with textContent / text nodes, never as HTML.
"use strict";

(function () {
  const KEY_STORAGE = "winnow.apiKey";
  const SNIPPET_CHARS = 360;
  const $ = (id) => document.getElementById(id);

  const form = $("search-form");
  const queryEl = $("query");
  const searchBtn = $("search");
  const topNEl = $("top-n");
  const topKEl = $("top-k");
  const hybridEl = $("hybrid");
  const rerankEl = $("rerank");
  const rerankLabel = $("rerank-label");
  const rerankNote = $("rerank-note");
  const instructionEl = $("instruction");
  const filterEl = $("filter");
  const apiKeyEl = $("api-key");
  const advanced = $("advanced");
  const errorEl = $("error");
  const timingsEl = $("timings");
  const loadingEl = $("loading");
  const emptyEl = $("empty");
  const resultsEl = $("results");
  const statusEl = $("server-status");
  const template = $("result-template");

  let inflight = null; // AbortController of the running search

  // --- API key (localStorage may be unavailable: private mode, file://) -----------------------
  function loadKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ""; } catch (_) { return ""; }
  }
  function saveKey(value) {
    try {
      if (value) localStorage.setItem(KEY_STORAGE, value);
      else localStorage.removeItem(KEY_STORAGE);
    } catch (_) { /* not persisted; still sent for this page */ }
  }
  apiKeyEl.value = loadKey();
  apiKeyEl.addEventListener("change", () => saveKey(apiKeyEl.value.trim()));
  $("forget-key").addEventListener("click", () => {
    apiKeyEl.value = "";
    saveKey("");
    apiKeyEl.focus();
  });

  // --- helpers ------------------------------------------------------------------------------
  function fmtScore(x) {
    return typeof x === "number" && isFinite(x) ? x.toFixed(4) : "—";
  }
  function fmtMs(x) {
    if (typeof x !== "number" || !isFinite(x)) return "—";
    return (x >= 100 ? x.toFixed(0) : x.toFixed(1)) + " ms";
  }
  function intOrNull(el) {
    const raw = el.value.trim();
    if (raw === "") return null;
    const n = Number(raw);
    // sent as typed (0, -3 …) so the server's validation message is what the user sees
    return Number.isInteger(n) ? n : raw;
  }
  // Source files wrap lines at ~80 columns; the card wraps at its own width. So a single newline is a
  // space, and only a blank line starts a new paragraph (shown as one blank line: CSS pre-line).
  function flow(text) {
    return text
      .split(/\n[ \t]*(?:\n[ \t]*)+/)
      .map((para) => para.replace(/\s+/g, " ").trim())
      .filter((para) => para !== "")
      .join("\n\n");
  }
  function snippet(text) {
    if (text.length <= SNIPPET_CHARS) return text;
    const cut = text.slice(0, SNIPPET_CHARS);
    const space = cut.lastIndexOf(" ");
    return (space > SNIPPET_CHARS * 0.6 ? cut.slice(0, space) : cut) + "…";
  }
  function labelled(label, value) {
    // "<label> <b>value</b>" built from text nodes
    const span = document.createDocumentFragment();
    span.appendChild(document.createTextNode(label + " "));
    const b = document.createElement("b");
    b.textContent = value;
    span.appendChild(b);
    return span;
  }

  function showError(message, type) {
    errorEl.replaceChildren();
    if (type) {
      const strong = document.createElement("strong");
      strong.textContent = type;
      errorEl.appendChild(strong);
    }
    const msg = document.createElement("span");
    msg.className = "msg";
    // Milvus parse errors point at a column with a caret line: keep them aligned
    if (/\n\s*\^/.test(message)) msg.classList.add("pre");
    msg.textContent = message;
    errorEl.appendChild(msg);
    errorEl.hidden = false;
  }
  function clearError() {
    errorEl.hidden = true;
    errorEl.replaceChildren();
  }
  function setLoading(on) {
    loadingEl.hidden = !on;
    searchBtn.disabled = on;
    searchBtn.textContent = on ? "Searching…" : "Search";
    resultsEl.setAttribute("aria-busy", on ? "true" : "false");
    document.body.dataset.state = on ? "loading" : "idle";
  }

  // --- server readiness: rerank availability ---------------------------------------------------
  function setRerankAvailable(on) {
    rerankEl.disabled = !on;
    if (!on) rerankEl.checked = false;
    rerankNote.hidden = on;
    rerankLabel.classList.toggle("disabled", !on);
  }
  async function checkReady() {
    try {
      const r = await fetch("/ready", { headers: { Accept: "application/json" } });
      const body = await r.json();
      setRerankAvailable(Boolean(body.rerank));
      if (body.ready) {
        statusEl.textContent = body.rerank ? "ready · rerank on" : "ready · recall only";
        statusEl.className = "pill ok";
      } else {
        const why = !body.models_loaded ? "models loading"
          : !body.milvus ? "Milvus unreachable" : "not ready";
        statusEl.textContent = "not ready: " + why;
        statusEl.className = "pill bad";
      }
      if (body.collection && body.collection !== "ok") statusEl.title = String(body.collection);
      showCount(body);
    } catch (_) {
      statusEl.textContent = "server unreachable";
      statusEl.className = "pill bad";
    }
  }

  // --- documents: count, add, delete -----------------------------------------------------------
  const WRITE_KEY_STORAGE = "winnow.writeKey";
  const countEl = $("doc-count");
  const hintEl = $("add-hint");
  const writeKeyEl = $("write-key");
  const writeStatus = $("write-status");
  const docIdEl = $("doc-id-input");
  const docTitleEl = $("doc-title-input");
  const docTextEl = $("doc-text-input");
  const docFileEl = $("doc-file");
  const deleteIdEl = $("delete-id");
  const WRITE_BATCH = 100; // documents per request (the server's WINNOW_MAX_WRITE_DOCUMENTS may be lower)

  function showCount(body) {
    const n = body.documents;
    countEl.textContent = typeof n === "number" ? n + (n === 1 ? " document" : " documents") : "";
    hintEl.hidden = !body.hint;
    hintEl.textContent = body.hint || "";
  }
  try { writeKeyEl.value = localStorage.getItem(WRITE_KEY_STORAGE) || ""; } catch (_) { /* none */ }
  writeKeyEl.addEventListener("change", () => {
    try {
      const v = writeKeyEl.value.trim();
      if (v) localStorage.setItem(WRITE_KEY_STORAGE, v); else localStorage.removeItem(WRITE_KEY_STORAGE);
    } catch (_) { /* not persisted */ }
  });

  function writeHeaders() {
    const h = { "Content-Type": "application/json", Accept: "application/json" };
    const key = writeKeyEl.value.trim() || apiKeyEl.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }
  function say(text, bad) {
    writeStatus.textContent = text;
    writeStatus.classList.toggle("write-error", Boolean(bad));
    document.body.dataset.writes = String(Number(document.body.dataset.writes || 0) + 1);
  }
  async function send(method, path, body) {
    const r = await fetch(path, {
      method, headers: writeHeaders(), body: body ? JSON.stringify(body) : undefined,
    });
    let data = null;
    try { data = await r.json(); } catch (_) { /* not JSON */ }
    if (!r.ok && !(r.status === 404 && data && data.results)) {
      const msg = data && data.error ? data.error.message : r.statusText;
      throw new Error("Error " + r.status + ": " + msg);
    }
    return data;
  }
  function summary(results) {
    return results.map((x) => x.id + ": " + x.status
      + (x.reason ? " (" + x.reason + ")" : "")
      + (x.passages ? " · " + x.passages + (x.passages === 1 ? " passage" : " passages") : "")
    ).join("; ");
  }
  async function readFile(file) {
    const text = await file.text();
    if (file.name.toLowerCase().endsWith(".jsonl")) {
      const docs = [];
      text.split(/\r?\n/).forEach((line, i) => {
        if (!line.trim()) return;
        let rec;
        try { rec = JSON.parse(line); } catch (_) { throw new Error(file.name + ":" + (i + 1) + ": not JSON"); }
        const id = rec.id ?? rec._id ?? rec.doc_id;
        if (id === undefined || typeof rec.text !== "string") {
          throw new Error(file.name + ":" + (i + 1) + ": needs an id (or _id) and a text");
        }
        const doc = { id: String(id), text: rec.text };
        if (typeof rec.title === "string") doc.title = rec.title;
        if (rec.metadata && typeof rec.metadata === "object") doc.metadata = rec.metadata;
        docs.push(doc);
      });
      return docs;
    }
    return [{
      id: docIdEl.value.trim() || file.name,
      title: docTitleEl.value.trim() || file.name.replace(/\.(txt|md)$/i, ""),
      text,
    }];
  }
  async function addDocuments() {
    let docs;
    try {
      if (docFileEl.files && docFileEl.files.length) {
        docs = await readFile(docFileEl.files[0]);
      } else {
        if (!docIdEl.value.trim() || !docTextEl.value.trim()) {
          say("Give the document an id and a text (or choose a file).", true);
          return;
        }
        docs = [{ id: docIdEl.value.trim(), title: docTitleEl.value.trim(), text: docTextEl.value }];
      }
    } catch (err) {
      say(String(err.message || err), true);
      return;
    }
    const all = [];
    try {
      for (let i = 0; i < docs.length; i += WRITE_BATCH) {
        const out = await send("POST", "/v1/documents", { documents: docs.slice(i, i + WRITE_BATCH) });
        all.push(...out.results);
      }
      say(summary(all), all.some((x) => x.status === "rejected"));
      docTextEl.value = "";
      docFileEl.value = "";
    } catch (err) {
      say((all.length ? summary(all) + " · then " : "") + err.message, true);
    }
    checkReady();
  }
  async function deleteDocument() {
    const id = deleteIdEl.value.trim();
    if (!id) { say("Give the id of the document to delete.", true); return; }
    try {
      const out = await send("POST", "/v1/documents/delete", { ids: [id] });
      say(summary(out.results), out.results.some((x) => x.status !== "deleted"));
    } catch (err) {
      say(err.message, true);
    }
    checkReady();
  }
  $("add-doc").addEventListener("click", addDocuments);
  $("delete-doc").addEventListener("click", deleteDocument);

  // --- rendering ----------------------------------------------------------------------------
  function renderResult(hit, rank, mode) {
    const li = template.content.firstElementChild.cloneNode(true);
    li.dataset.docId = hit.doc_id;
    li.querySelector(".rank").textContent = String(rank);
    li.querySelector(".title").textContent = hit.title || hit.doc_id || "(untitled)";
    const text = flow(String(hit.text || ""));
    const p = li.querySelector(".snippet");
    const more = li.querySelector(".more");
    p.textContent = snippet(text);
    if (text.length > SNIPPET_CHARS) {
      more.hidden = false;
      more.setAttribute("aria-expanded", "false");
      more.addEventListener("click", () => {
        const open = more.getAttribute("aria-expanded") !== "true";
        p.textContent = open ? text : snippet(text);
        more.textContent = open ? "Show less" : "Show more";
        more.setAttribute("aria-expanded", String(open));
      });
    }
    const doc = li.querySelector(".doc");
    doc.textContent = hit.doc_id + (hit.chunk ? " #" + hit.chunk : "");
    li.querySelector("[data-testid=rerank-score]").appendChild(
      labelled("rerank", fmtScore(hit.rerank_score)));
    li.querySelector("[data-testid=recall-score]").appendChild(
      labelled(mode === "hybrid" ? "recall (RRF)" : "recall", fmtScore(hit.recall_score)));
    const meta = hit.metadata && typeof hit.metadata === "object" ? Object.entries(hit.metadata) : [];
    if (meta.length) {
      const extra = li.querySelector(".extra");
      extra.textContent = meta.slice(0, 6)
        .map(([k, v]) => k + ": " + (typeof v === "string" ? v : JSON.stringify(v)))
        .join(" · ");
      extra.hidden = false;
    }
    return li;
  }

  function render(body) {
    const results = Array.isArray(body.results) ? body.results : [];
    resultsEl.replaceChildren(...results.map((h, i) => renderResult(h, i + 1, body.mode)));
    emptyEl.hidden = results.length > 0;
    const t = body.timings_ms || {};
    timingsEl.textContent =
      "embed " + fmtMs(t.embed) + " · recall " + fmtMs(t.recall) +
      " · rerank " + (body.reranked ? fmtMs(t.rerank) : "off") + " · total " + fmtMs(t.total) +
      "  —  " + results.length + " of " + body.candidates + " candidates, " + body.mode +
      (!body.reranked ? ", not reranked"
        : body.reranked < body.candidates
          ? ", best " + body.reranked + " reranked (rest by recall, within the rerank budget)"
          : ", reranked");
    timingsEl.hidden = false;
  }

  // --- search -------------------------------------------------------------------------------
  async function search() {
    const query = queryEl.value.trim();
    clearError();
    if (!query) {
      showError("Type something to search for.");
      queryEl.focus();
      return;
    }
    const payload = { query, hybrid: hybridEl.checked };
    const topN = intOrNull(topNEl);
    if (topN !== null) payload.top_n = topN;
    const topK = intOrNull(topKEl);
    if (topK !== null) payload.top_k = topK;
    if (!rerankEl.disabled) payload.rerank = rerankEl.checked;
    const instruction = instructionEl.value.trim();
    if (instruction) payload.instruction = instruction;
    const filter = filterEl.value.trim();
    if (filter) payload.filter = filter;

    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const key = apiKeyEl.value.trim();
    if (key) headers.Authorization = "Bearer " + key;

    if (inflight) inflight.abort();
    const ctrl = new AbortController();
    inflight = ctrl;
    setLoading(true);
    try {
      const url = new URL(location.href);
      url.searchParams.set("q", query);
      history.replaceState(null, "", url);
    } catch (_) { /* ignore */ }

    try {
      const r = await fetch("/v1/search", {
        method: "POST", headers, body: JSON.stringify(payload), signal: ctrl.signal,
      });
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      if (!r.ok) {
        resultsEl.replaceChildren();
        timingsEl.hidden = true;
        emptyEl.hidden = true;
        const err = body && body.error ? body.error : null;
        let msg = err && err.message ? err.message : "HTTP " + r.status + " " + r.statusText;
        const retry = r.headers.get("Retry-After");
        if ((r.status === 429 || r.status === 503) && retry) msg += " (retry in " + retry + " s)";
        if (r.status === 401) {
          msg += "\nEnter the API key under Advanced.";
          advanced.open = true;
          apiKeyEl.focus();
        }
        showError(msg, "Error " + r.status + (err && err.type ? " · " + err.type : "") + ":");
        return;
      }
      if (!body) {
        showError("the server answered with something that is not JSON", "Error:");
        return;
      }
      if (key) saveKey(key);
      render(body);
    } catch (e) {
      if (e && e.name === "AbortError") return;
      showError("could not reach the server: " + (e && e.message ? e.message : e), "Network error:");
    } finally {
      if (inflight === ctrl) {
        inflight = null;
        setLoading(false);
      }
    }
  }

  // body[data-searches] counts finished searches (errors included): tests wait on it
  function finished() {
    document.body.dataset.searches = String(Number(document.body.dataset.searches || 0) + 1);
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    search().finally(finished);
  });

  // a search from the URL waits for /ready: until then the page does not know whether this server
  // reranks, and asking a recall-only server to rerank is an error
  const readyChecked = checkReady();
  const q = new URLSearchParams(location.search).get("q");
  if (q) {
    queryEl.value = q;
    readyChecked.finally(() => search().finally(finished));
  }
})();
