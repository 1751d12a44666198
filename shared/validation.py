"""Small helpers for handlers that validate JSON event data and list every problem."""

from __future__ import annotations

from typing import Any

_JSON_KINDS = {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


def json_kind(value: Any) -> str:
    """A JSON name for the type of `value` (null, boolean, number, string, array, object)."""
    if isinstance(value, str):
        return "string"
    return _JSON_KINDS.get(type(value), type(value).__name__)
