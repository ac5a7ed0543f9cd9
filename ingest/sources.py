"""Corpus readers: folders of .txt/.md, .jsonl (BEIR corpus.jsonl or any field names) and .csv.

Every reader streams: one document at a time, never the whole file. A bad file or line becomes a
``Problem`` (file and line) that the job reports and skips; it never stops the job.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.domain import Document, invalid_unicode_at

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
CSV_SUFFIXES = {".csv"}
SUPPORTED = TEXT_SUFFIXES | JSONL_SUFFIXES | CSV_SUFFIXES

ID_FIELDS = ("_id", "id", "doc_id", "docid")
TEXT_FIELDS = ("text", "content", "body", "passage", "abstract")
TITLE_FIELDS = ("title", "name", "heading")


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{printable(where)}: {self.reason}"


def printable(text: str) -> str:
    """``text`` safe to print or log: a file name's undecodable bytes (or a lone surrogate) as
    ``\\xNN`` escapes instead of an encoding error."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # how Python decodes file names
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


INVALID_UNICODE = "is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)"


@dataclass(frozen=True, slots=True)
class FieldMap:
    """Which record fields hold the id, text and title (None = try the usual names)."""

    id: str | None = None
    text: str | None = None
    title: str | None = None


Item = Document | Problem


def iter_files(paths: Iterable[str | Path]) -> Iterator[tuple[Path, Path] | Problem]:
    """(file, root) pairs in a stable order; folders are walked recursively."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                if f.suffix.lower() in SUPPORTED and not any(
                    part.startswith(".") for part in f.relative_to(path).parts
                ):
                    yield f, path
        elif path.is_file():
            if path.suffix.lower() in SUPPORTED:
                yield path, path.parent
            else:
                yield Problem(
                    str(path),
                    None,
                    f"unsupported file type {path.suffix or '(none)'!r}; "
                    f"expected one of {', '.join(sorted(SUPPORTED))}",
                )
        else:
            yield Problem(str(path), None, "no such file or directory")


def _pick(record: dict[str, Any], explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit if explicit in record else None
    return next((c for c in candidates if c in record), None)


def _as_text(value: Any) -> str | None:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def record_to_item(record: Any, fields: FieldMap, path: str, line: int) -> Item:
    """Map one JSON/CSV record to a Document, or explain why it cannot be one."""
    if not isinstance(record, dict):
        return Problem(path, line, f"expected a JSON object, got {type(record).__name__}")
    where = invalid_unicode_at(record)
    if where is not None:  # nothing downstream (hash, tokenizer, Milvus) takes it: skip the record
        return Problem(path, line, f"field {where} {INVALID_UNICODE}; record skipped")
    id_key = _pick(record, fields.id, ID_FIELDS)
    text_key = _pick(record, fields.text, TEXT_FIELDS)
    if id_key is None:
        want = fields.id or " / ".join(ID_FIELDS)
        return Problem(path, line, f"no id field ({want}); name it with --id-field")
    if text_key is None:
        want = fields.text or " / ".join(TEXT_FIELDS)
        return Problem(path, line, f"no text field ({want}); name it with --text-field")
    doc_id = _as_text(record[id_key])
    text = _as_text(record[text_key])
    if not doc_id:
        return Problem(path, line, f"empty or non-scalar id in field {id_key!r}")
    if text is None:
        return Problem(path, line, f"field {text_key!r} is not a string")
    title_key = _pick(record, fields.title, TITLE_FIELDS)
    title = _as_text(record[title_key]) if title_key else ""
    used = {id_key, text_key, title_key}
    metadata: dict[str, Any] = {}
    for k, v in record.items():
        if k in used:
            continue
        if k == "metadata" and isinstance(v, dict):
            metadata.update(v)
        elif v not in (None, "", {}, []):
            metadata[k] = v
    return Document(
        id=doc_id, text=text, title=title or "", metadata=metadata, source=f"{path}:{line}"
    )


def read_jsonl(path: Path, fields: FieldMap) -> Iterator[Item]:
    name = str(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield Problem(name, lineno, "not valid UTF-8")
                continue
            except json.JSONDecodeError as exc:
                yield Problem(name, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            yield record_to_item(record, fields, name, lineno)


def read_csv(path: Path, fields: FieldMap) -> Iterator[Item]:
    name = str(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                yield Problem(name, 1, "empty CSV file (no header row)")
                return
            line = 1
            for row in reader:
                line = reader.line_num
                if None in row:
                    yield Problem(name, line, "more cells than header columns")
                    continue
                yield record_to_item(row, fields, name, line)
    except UnicodeDecodeError as exc:
        yield Problem(name, None, f"not valid UTF-8 (byte {exc.start}); file skipped from there")
    except csv.Error as exc:
        yield Problem(name, None, f"malformed CSV: {exc}")


def _markdown_title(text: str) -> tuple[str, str]:
    """The first level-1 heading (near the top) as title, and the text without that line."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:20]):
        s = line.strip()
        if s.startswith("# "):
            return s[2:].strip(), "\n".join(lines[:i] + lines[i + 1 :])
    return "", text


def read_text_file(path: Path, root: Path) -> Iterator[Item]:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        yield Problem(name, None, f"not valid UTF-8 (byte {exc.start})")
        return
    except OSError as exc:
        yield Problem(name, None, f"cannot read: {exc.strerror or exc}")
        return
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    if invalid_unicode_at(rel) is not None:  # the id would be the name: it must be text
        yield Problem(
            name, None, "the file name is not valid UTF-8 (it is the document id): rename it"
        )
        return
    title = ""
    if path.suffix.lower() != ".txt":
        title, text = _markdown_title(text)
    yield Document(id=rel, text=text, title=title or path.stem, metadata={"path": rel}, source=name)


def read_file(path: Path, root: Path, fields: FieldMap) -> Iterator[Item]:
    suffix = path.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:
            yield from read_jsonl(path, fields)
        elif suffix in CSV_SUFFIXES:
            yield from read_csv(path, fields)
        else:
            yield from read_text_file(path, root)
    except OSError as exc:
        yield Problem(str(path), None, f"cannot read: {exc.strerror or exc}")


def read_corpus(
    paths: Iterable[str | Path], fields: FieldMap | None = None
) -> Iterator[tuple[Path | None, Item]]:
    """All documents and problems of all paths, with the file each came from."""
    fields = fields if fields is not None else FieldMap()
    for entry in iter_files(paths):
        if isinstance(entry, Problem):
            yield None, entry
            continue
        path, root = entry
        for item in read_file(path, root, fields):
            yield path, item
