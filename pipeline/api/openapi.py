"""The OpenAPI document of *this* server: its limits, and bearer auth only when a key is set."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pipeline.api.guard import PROTECTED
from pipeline.config import Settings


def _limits(settings: Settings) -> dict[str, dict[str, dict[str, int]]]:
    """schema name → property → JSON-schema keywords taken from Settings."""
    text = {
        "query": {"maxLength": settings.max_query_chars},
        "instruction": {"maxLength": settings.max_instruction_chars},
        "max_chunks_per_doc": {"maximum": settings.rerank_max_chunks_per_doc},
    }
    return {
        "SearchBody": {
            **text,
            "top_k": {"maximum": settings.max_top_k},
            "top_n": {"maximum": settings.max_top_n},
            "filter": {"maxLength": settings.max_filter_chars},
        },
        "RerankBody": {**text, "documents": {"maxItems": settings.max_documents}},
        "TeiRerankBody": {**text, "texts": {"maxItems": settings.max_documents}},  # text: query…
        **{
            name: {
                "instruction": text["instruction"],
                "max_chunks_per_doc": text["max_chunks_per_doc"],
                first: {"maxItems": settings.max_documents, "maxLength": settings.max_query_chars},
                second: {"maxItems": settings.max_documents},
            }
            for name, (first, second) in {
                "ScoreTextBody": ("text_1", "text_2"),
                "ScoreQueriesBody": ("queries", "documents"),
                "ScoreItemsBody": ("queries", "items"),
                "ScoreDataBody": ("data_1", "data_2"),
            }.items()
        },
        "DocumentsBody": {"documents": {"maxItems": settings.max_write_documents}},
        "DeleteBody": {"ids": {"maxItems": settings.max_write_documents}},
    }


def _apply(prop: dict[str, Any], extra: dict[str, int]) -> None:
    """Put the keywords on the property, or on each non-null branch of an ``anyOf``: ``maxItems`` on
    arrays, ``maxLength`` on strings (an array's items included), others on every branch."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    for b in branches:
        is_array = b.get("type") == "array"
        for key, value in extra.items():
            if key == "maxItems":
                if is_array:
                    b[key] = value
            elif key == "maxLength":
                (b.get("items", {}) if is_array else b)[key] = value
            else:
                b[key] = value


def _any_dialect(op: dict[str, Any]) -> None:
    """A body's dialects as ``anyOf``: extra fields are ignored, so a body may fit two of them (the
    server picks by ``texts`` / ``text_1`` …), which ``oneOf`` would call invalid."""
    content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    schema = content.get("schema", {})
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schemas = doc.get("components", {}).get("schemas", {})
        for name, props in _limits(settings).items():
            for prop, extra in props.items():
                if name in schemas and prop in schemas[name].get("properties", {}):
                    _apply(schemas[name]["properties"][prop], extra)
        keyed = settings.api_key is not None or settings.write_api_key is not None
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                _any_dialect(op)
                if not keyed or not path.startswith(PROTECTED):
                    op.get("responses", {}).pop("401", None)
                else:
                    op["security"] = [{"bearer": []}]
        if keyed:
            doc["components"].setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
            }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
