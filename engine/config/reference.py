"""The configuration reference, generated from the pydantic models so it cannot drift.

``python -m engine.config.reference`` prints it as Markdown; README.md holds a copy between two
markers, and a test fails when the copy and the models differ.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from engine.config import Config

START = "<!-- config-reference:start (python -m engine.config.reference) -->"
END = "<!-- config-reference:end -->"


@dataclass(frozen=True, slots=True)
class Entry:
    """One key of the reference: its section, name, the values it takes, default, meaning."""

    section: str  # e.g. "limits", "generation.key_facts_to_qa"
    key: str
    kind: str  # what values it takes
    default: str
    description: str


def entries(model: type[BaseModel] = Config, section: str = "") -> Iterator[Entry]:
    """Every key of ``model``, depth first; sub-sections follow their parent's own keys."""
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((f"{section}.{name}" if section else name, annotation))
            continue
        yield Entry(
            section=section,
            key=name,
            kind=_kind(annotation, field),
            default=_default(field),
            description=" ".join((field.description or "").split()),
        )
    for sub_section, sub_model in nested:
        yield from entries(sub_model, sub_section)


def markdown() -> str:
    """The reference as Markdown: a table per section."""
    lines: list[str] = []
    section: str | None = None
    for entry in entries():
        if entry.section != section:
            section = entry.section
            lines += ["", f"**`[{section}]`**", "", "| key | values | default | meaning |"]
            lines.append("| --- | --- | --- | --- |")
        cells = (f"`{entry.key}`", entry.kind, entry.default, entry.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines).strip() + "\n"


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell: no column breaks, no stray HTML tags."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def readme_block(readme: Path) -> str:
    """The reference as README.md holds it (between the markers); "" when absent."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return ""
    return text[start + len(START) : end].strip() + "\n"


def _kind(annotation: Any, field: FieldInfo) -> str:
    base = _type_name(annotation)
    bounds = [_bound(item) for item in field.metadata]
    return ", ".join([base, *(b for b in bounds if b)])


_NAMES: dict[Any, str] = {
    int: "integer",
    float: "number",
    bool: "`true`/`false`",
    str: "string",
    Path: "path",
    SecretStr: "string (secret)",
}


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(f'`"{arg}"`' for arg in get_args(annotation))
    if origin in (Union, types.UnionType):
        parts = [_type_name(arg) for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(parts)
    if origin is list:
        (item,) = get_args(annotation)
        return f"list of {_type_name(item)}"
    return _NAMES.get(annotation, str(annotation))


def _bound(item: Any) -> str:
    """A pydantic constraint (``annotated_types.Ge`` and friends) as text."""
    for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        value = getattr(item, attr, None)
        if value is not None:
            return f"{sign} {_number(value)}"
    min_length = getattr(item, "min_length", None)
    return f"at least {min_length} item(s)" if min_length else ""


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    return f"`{_toml(value)}`"


def _toml(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def main() -> None:
    """``python -m engine.config.reference``: print the reference as Markdown."""
    print(markdown(), end="")


if __name__ == "__main__":
    main()
