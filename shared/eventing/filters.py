"""Trigger filters: `spec.filter.attributes` (exact, AND, "" = any) and the `spec.filters` dialects.

Dialects (CloudEvents Subscriptions API, as the Kafka broker implements them): `exact`, `prefix`,
`suffix` (each a map attribute -> value, all must hold), `all` and `any` (lists of filters) and `not`
(one filter). A missing attribute never matches a dialect condition. `cesql` is not supported.

Each filter also answers `may_match_type(t)`: could an event of type `t` pass, whatever its other
attributes? Loading uses that to find a function whose result would be routed back to itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Attributes = Mapping[str, Any]


class FilterError(ValueError):
    """A filter in a Trigger that cannot be used."""


def _value(attributes: Attributes, name: str) -> str | None:
    value = attributes.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Filter(ABC):
    """A predicate over an event's context attributes."""

    @abstractmethod
    def match(self, attributes: Attributes) -> bool:
        """True when the event with these attributes passes."""

    @abstractmethod
    def may_match_type(self, event_type: str) -> bool:
        """False when no event of this type can pass (for the loop check)."""


@dataclass(frozen=True)
class _Compare(Filter):
    """exact / prefix / suffix over several attributes (AND)."""

    conditions: tuple[tuple[str, str], ...]
    test: Callable[[str, str], bool]
    # "" in `spec.filter.attributes` means any value, even a missing attribute.
    empty_is_any: bool = False

    def match(self, attributes: Attributes) -> bool:
        for name, expected in self.conditions:
            if self.empty_is_any and expected == "":
                continue
            actual = _value(attributes, name)
            if actual is None or not self.test(actual, expected):
                return False
        return True

    def may_match_type(self, event_type: str) -> bool:
        return all(
            (self.empty_is_any and expected == "") or self.test(event_type, expected)
            for name, expected in self.conditions
            if name == "type"
        )


@dataclass(frozen=True)
class _All(Filter):
    parts: tuple[Filter, ...]

    def match(self, attributes: Attributes) -> bool:
        return all(part.match(attributes) for part in self.parts)

    def may_match_type(self, event_type: str) -> bool:
        return all(part.may_match_type(event_type) for part in self.parts)


@dataclass(frozen=True)
class _Any(Filter):
    parts: tuple[Filter, ...]

    def match(self, attributes: Attributes) -> bool:
        return any(part.match(attributes) for part in self.parts)

    def may_match_type(self, event_type: str) -> bool:
        return any(part.may_match_type(event_type) for part in self.parts)


@dataclass(frozen=True)
class _Not(Filter):
    inner: Filter

    def match(self, attributes: Attributes) -> bool:
        return not self.inner.match(attributes)

    def may_match_type(self, event_type: str) -> bool:
        # Conservative: `not` can only rule a type out when the inner filter is about `type` alone.
        if isinstance(self.inner, _Compare) and all(n == "type" for n, _ in self.inner.conditions):
            return not self.inner.match({"type": event_type})
        return True


MATCH_ALL: Filter = _All(())

_TESTS: dict[str, Callable[[str, str], bool]] = {
    "exact": lambda actual, expected: actual == expected,
    "prefix": lambda actual, expected: actual.startswith(expected),
    "suffix": lambda actual, expected: actual.endswith(expected),
}
DIALECTS = (*_TESTS, "all", "any", "not", "cesql")


def _string_map(value: Any, where: str, allow_empty: bool) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise FilterError(f"{where}: expected a non-empty map of attribute -> value")
    pairs = []
    for name, expected in value.items():
        if not isinstance(name, str) or not name:
            raise FilterError(f"{where}: attribute names must be non-empty strings")
        if not isinstance(expected, str) or (not expected and not allow_empty):
            raise FilterError(f"{where}.{name}: value must be a non-empty string")
        pairs.append((name, expected))
    return tuple(pairs)


def parse_dialect(node: Any, where: str) -> Filter:
    """One element of `spec.filters` (exactly one dialect) -> Filter."""
    if not isinstance(node, dict) or not node:
        raise FilterError(f"{where}: expected an object with one of {', '.join(DIALECTS)}")
    if len(node) > 1:
        raise FilterError(f"{where}: multiple dialects found ({', '.join(sorted(node))}); use one per filter")
    ((dialect, value),) = node.items()
    here = f"{where}.{dialect}"
    if dialect in _TESTS:
        return _Compare(_string_map(value, here, allow_empty=False), _TESTS[dialect])
    if dialect in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise FilterError(f"{here}: expected a non-empty list of filters")
        parts = tuple(parse_dialect(item, f"{here}[{i}]") for i, item in enumerate(value))
        return _All(parts) if dialect == "all" else _Any(parts)
    if dialect == "not":
        return _Not(parse_dialect(value, here))
    if dialect == "cesql":
        raise FilterError(f"{here}: CESQL filters are not supported by the embedded event plane")
    raise FilterError(f"{where}: unknown filter dialect {dialect!r} (expected one of {', '.join(DIALECTS)})")


def compile_trigger_filter(filter_spec: Any, filters_spec: Any, where: str) -> Filter:
    """`spec.filter` and `spec.filters` of a Trigger -> one Filter (`filters` wins when set)."""
    if filters_spec:
        if not isinstance(filters_spec, list):
            raise FilterError(f"{where}.filters: expected a list")
        return _All(tuple(parse_dialect(item, f"{where}.filters[{i}]") for i, item in enumerate(filters_spec)))
    if filter_spec is None:
        return MATCH_ALL
    if not isinstance(filter_spec, dict) or set(filter_spec) - {"attributes"}:
        raise FilterError(f"{where}.filter: only 'attributes' is allowed")
    attributes = filter_spec.get("attributes") or {}
    if not attributes:
        return MATCH_ALL
    pairs = _string_map(attributes, f"{where}.filter.attributes", allow_empty=True)
    return _Compare(pairs, _TESTS["exact"], empty_is_any=True)
