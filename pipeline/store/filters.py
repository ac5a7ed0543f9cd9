"""Milvus filter literals: the store contract's ``filter`` arguments are Milvus boolean expressions."""

from __future__ import annotations

from collections.abc import Iterable

_LITERAL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def quote(value: str) -> str:
    r"""A Milvus string literal (Milvus Lite has no filter templating).

    Not JSON: Milvus' parser knows the escapes \\ \" \n \r \t but not \uXXXX, which
    ``json.dumps`` writes for other control characters (an id holding one made every query on it
    fail); those go in raw, and Milvus reads them as themselves.
    """
    return '"' + value.translate(_LITERAL_ESCAPES) + '"'


def in_list(field_name: str, values: Iterable[str]) -> str:
    return f"{field_name} in [{','.join(quote(v) for v in values)}]"
