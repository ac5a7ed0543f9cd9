"""schemathesis hooks: the fields whose rules JSON Schema cannot express.

- ``filter`` is a Milvus boolean expression. A random string is schema-valid but almost never a valid
  expression, and the server rightly answers 422 (tests/test_hardening.py covers those errors), so
  schemathesis would count every such case as "valid data rejected".
- vLLM's /score pairs N queries with N documents or one query with any number: the two lengths'
  relation is not JSON Schema. The first field is narrowed to one query (1:N, always valid);
  N:N and the 422 for other lengths are tested in tests/test_dialects_http.py.

Narrowed in the copy of the schema schemathesis loads; every other field stays fuzzed.
"""

from __future__ import annotations

from typing import Any

import schemathesis

VALID_FILTERS = ["", "chunk >= 0", 'doc_id != "none"', 'doc_id in ["tides", "volcano"]']


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    schemas = raw_schema["components"]["schemas"]
    schemas["SearchBody"]["properties"]["filter"] = {"type": "string", "enum": VALID_FILTERS}
    for name, first in {
        "ScoreTextBody": "text_1",
        "ScoreQueriesBody": "queries",
        "ScoreItemsBody": "queries",
        "ScoreDataBody": "data_1",
    }.items():
        prop = schemas[name]["properties"][first]
        schemas[name]["properties"][first] = next(
            b for b in prop["anyOf"] if b.get("type") == "string"
        )
