"""JSON values that validate against a JSON schema, fully determined by a seed.

The simulated teacher answers structured requests with these; nothing here knows about HTTP.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_WORDS = (
    "the", "a", "model", "data", "river", "energy", "system", "cell", "light", "market",
    "theory", "process", "signal", "early", "small", "complex", "stable", "rapid", "local",
    "common", "changes", "explains", "depends", "on", "with", "across", "during", "between",
    "measures", "forms", "structure", "pressure", "history", "network", "protein", "climate",
    "value", "growth", "layer", "method",
)  # fmt: skip
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "12:00:00",
    "email": "teacher@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
# Recursive models ($ref cycles) would otherwise expand forever.
_MAX_DEPTH = 8


def instance_for_schema(
    schema: dict[str, Any],
    seed: str,
    *,
    array_items: int = 3,
    boolean_value: bool = True,
    min_lengths: Mapping[str, int] | None = None,
) -> Any:
    """A JSON instance that validates against ``schema``, fully determined by ``seed``.

    ``min_lengths``: the fewest characters of strings in properties of that name (a caller
    that knows what the text is for, such as a summary of a given document), within the
    schema's own ``maxLength``.
    """
    generator = _Generator(schema, seed, array_items, boolean_value, dict(min_lengths or {}))
    return generator.value(schema, "$", "", 0)


@dataclass(frozen=True)
class _Generator:
    root: dict[str, Any]
    seed: str
    array_items: int
    boolean_value: bool
    min_lengths: dict[str, int] = field(default_factory=dict)

    def value(self, schema: dict[str, Any], path: str, name: str, depth: int) -> Any:
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self._rng(path).choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                option = _pick_option(schema[key], prefer_null=depth >= _MAX_DEPTH)
                return self.value(option, path, name, depth)
        kind = _type_of(schema)
        if kind is None:
            return schema["default"] if "default" in schema else self._string({}, path, name)
        return self._typed(kind, schema, path, name, depth)

    def _typed(self, kind: str, schema: dict[str, Any], path: str, name: str, depth: int) -> Any:
        match kind:
            case "object":
                return self._object(schema, path, depth)
            case "array":
                return self._array(schema, path, name, depth)
            case "string":
                return self._string(schema, path, name)
            case "integer":
                return _integer(schema, self._rng(path))
            case "number":
                return _number(schema, self._rng(path))
            case "boolean":
                return self.boolean_value
            case _:
                return None

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            target = _pointer(self.root, schema["$ref"])
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(self._resolve(part))
            merged.update({k: v for k, v in schema.items() if k != "allOf"})
            schema = merged
        return schema

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        properties: dict[str, Any] = schema.get("properties", {})
        if properties:
            return {
                key: self.value(sub, f"{path}.{key}", key, depth + 1)
                for key, sub in properties.items()
            }
        extra = schema.get("additionalProperties")
        if not isinstance(extra, dict) or depth >= _MAX_DEPTH:
            return {}
        return {
            f"key{i}": self.value(extra, f"{path}.key{i}", f"key{i}", depth + 1)
            for i in range(self.array_items)
        }

    def _array(self, schema: dict[str, Any], path: str, name: str, depth: int) -> list[Any]:
        if "prefixItems" in schema:
            return [
                self.value(sub, f"{path}[{i}]", name, depth + 1)
                for i, sub in enumerate(schema["prefixItems"])
            ]
        if depth >= _MAX_DEPTH:
            count = int(schema.get("minItems", 0))
        else:
            count = int(schema.get("maxItems", schema.get("minItems", self.array_items)))
        items: dict[str, Any] = schema.get("items", {})
        return [self.value(items, f"{path}[{i}]", name, depth + 1) for i in range(count)]

    def _string(self, schema: dict[str, Any], path: str, name: str) -> str:
        if schema.get("format") in _FORMATS:
            return _FORMATS[schema["format"]]
        return sentence(
            self._rng(path),
            question="question" in name.lower(),
            min_length=max(int(schema.get("minLength", 0)), self.min_lengths.get(name, 0)),
            max_length=schema.get("maxLength"),
        )

    def _rng(self, path: str) -> random.Random:
        return random.Random(digest(f"{self.seed}|{path}"))


def _pointer(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref is supported, got {ref!r}")
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    if not isinstance(node, dict):
        raise ValueError(f"$ref {ref!r} does not point at a schema")
    return node


def _pick_option(options: list[dict[str, Any]], *, prefer_null: bool) -> dict[str, Any]:
    non_null = [o for o in options if o.get("type") != "null"]
    if non_null and not (prefer_null and len(non_null) < len(options)):
        return non_null[0]
    return {"type": "null"}


def _type_of(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        return next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _bounds(schema: dict[str, Any]) -> tuple[float, float]:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if lo is None:
        lo = 0 if hi is None or hi >= 0 else hi - 100
    if hi is None:
        hi = lo + 100
    return float(lo), float(hi)


def _integer(schema: dict[str, Any], rng: random.Random) -> int:
    lo, hi = _bounds(schema)
    first = math.floor(lo) + 1 if "exclusiveMinimum" in schema else math.ceil(lo)
    last = math.ceil(hi) - 1 if "exclusiveMaximum" in schema else math.floor(hi)
    return rng.randint(first, last) if first <= last else first


def _number(schema: dict[str, Any], rng: random.Random) -> float:
    lo, hi = _bounds(schema)
    # Staying inside the middle half keeps exclusive bounds satisfied even after rounding.
    value = lo + (hi - lo) * rng.uniform(0.25, 0.75)
    return round(value, 2) if hi - lo >= 1 else value


def sentence(
    rng: random.Random, *, question: bool = False, min_length: int = 0, max_length: int | None
) -> str:
    """A sentence of filler words from ``rng``, trimmed to fit the length bounds."""
    words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 20))]
    end = "?" if question else "."

    def render() -> str:
        return " ".join(words).capitalize() + end

    while len(render()) < min_length:
        words.append(rng.choice(_WORDS))
    while max_length is not None and len(render()) > max_length and len(words) > 1:
        words.pop()
    return render()[:max_length]


def digest(text: str) -> int:
    """A stable 64-bit integer for ``text``, to seed ``random.Random`` reproducibly."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
