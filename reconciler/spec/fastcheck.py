"""A fast, exact yes/no for the schema of one mailbox entry, so 100,000 of them load quickly.

Why: jsonschema walks every keyword of every entry through its generic machinery (about
40 µs an entry here); a placement file of 100,000 mailboxes spent seconds in validation
alone, and `reconcile --plan` must stay well under 10 s at that size. Yet the item schema
of `spec.mailboxes` is simple: an object with known string and string-array properties,
each with a pattern. `compile_object` turns exactly that kind of schema into a predicate
using the schema's own regular expressions; any keyword it does not know makes it give up
(None), so it can never be more lenient than the schema.

It only answers yes or no. When any entry says no, the loader validates the whole
document with jsonschema as before, so every message (with its line) is exactly the one
the slow path gives; bad specs are rare and small.

PURE: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]
_NOTES = {"description", "errorMessage", "title", "$comment", "examples"}


def _string(schema: dict[str, Any]) -> Check | None:
    if set(schema) - _NOTES - {"type", "pattern", "maxLength", "minLength"} \
            or schema.get("type") != "string":
        return None
    pattern = re.compile(schema["pattern"]) if "pattern" in schema else None
    longest, shortest = schema.get("maxLength"), schema.get("minLength", 0)
    if pattern is not None and longest is None and not shortest:
        search = pattern.search  # the usual item (an address): one test less, one call less

        def matches(value: Any) -> bool:
            return isinstance(value, str) and search(value) is not None
        return matches

    def check(value: Any) -> bool:
        return (isinstance(value, str) and len(value) >= shortest
                and (longest is None or len(value) <= longest)
                and (pattern is None or pattern.search(value) is not None))
    return check


def _array(schema: dict[str, Any]) -> Check | None:
    if set(schema) - _NOTES - {"type", "items"} or schema.get("type") != "array" \
            or not isinstance(schema.get("items"), dict):
        return None
    item = _string(schema["items"])
    if item is None:
        return None

    return lambda value: isinstance(value, list) and all(map(item, value))  # no generator


def compile_object(schema: dict[str, Any]) -> Check | None:
    """A predicate exactly as strict as `schema`, or None when the schema is not simple."""
    if set(schema) - _NOTES - {"type", "additionalProperties", "required", "properties"}:
        return None
    if schema.get("type") != "object" or schema.get("additionalProperties") is not False:
        return None
    checks: dict[str, Check] = {}
    for name, sub in schema.get("properties", {}).items():
        check = _string(sub) if sub.get("type") == "string" else _array(sub)
        if check is None:
            return None
        checks[name] = check
    required = tuple(schema.get("required", ()))

    def check_object(value: Any) -> bool:
        if not isinstance(value, dict):
            return False
        for r in required:
            if r not in value:
                return False
        for key, item in value.items():
            check = checks.get(key)
            if check is None or not check(item):
                return False
        return True
    return check_object
