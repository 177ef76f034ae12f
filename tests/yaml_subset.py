"""A strict reader for the plain YAML subset the deployment and monitoring files keep to.

PyYAML is not a project dependency, and these files (docker-compose.yml, the Prometheus
config and rules, Grafana's provisioning) are wiring the tests must read offline. The
subset: block mappings, block lists of scalars or of mappings, JSON-style flow lists,
quoted and plain scalars, and literal blocks (`|`, `|-`). Anything else raises ValueError
rather than being guessed at, so a file that leaves the subset fails its tests loudly.
"""

from __future__ import annotations

import json
import re
from typing import Any

Line = tuple[int, int, str]  # (line number, indentation, content without the indentation)

_KEY = re.compile(r"([A-Za-z0-9_.\-]+):(?:\s+(.*))?")
_LITERAL = re.compile(r"^(?P<head>\s*(?:- )?[A-Za-z0-9_.\-]+:)\s+\|(?P<chomp>-?)$")


def read_simple_yaml(text: str) -> Any:
    """Parse the subset; every scalar comes back as a string (compose wants strings in `environment` anyway).

    Anchors, folded scalars, flow mappings, trailing comments, tabs and duplicate keys raise ValueError.
    """
    lines: list[Line] = []
    raw_lines = text.splitlines()
    index = 0
    while index < len(raw_lines):
        number, raw = index + 1, raw_lines[index]
        index += 1
        if "\t" in raw:
            raise ValueError(f"line {number}: tab character")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        literal = _LITERAL.match(raw)
        if literal:
            body: list[str] = []
            while index < len(raw_lines) and (not raw_lines[index].strip()
                                              or len(raw_lines[index]) - len(raw_lines[index].lstrip(" ")) > indent):
                body.append(raw_lines[index])
                index += 1
            if not any(line.strip() for line in body):
                raise ValueError(f"line {number}: empty literal block")
            margin = min(len(line) - len(line.lstrip(" ")) for line in body if line.strip())
            value = "\n".join(line[margin:] for line in body).rstrip("\n")
            stripped = literal["head"].strip() + " " + json.dumps(value if literal["chomp"] else value + "\n")
        lines.append((number, indent, stripped))
    if not lines:
        return None
    node, end = _yaml_block(lines, 0, lines[0][1])
    if end != len(lines):
        raise ValueError(f"line {lines[end][0]}: unexpected indentation")
    return node


def _yaml_block(lines: list[Line], index: int, indent: int) -> tuple[Any, int]:
    if lines[index][2].startswith("- ") or lines[index][2] == "-":
        items: list[Any] = []
        while index < len(lines) and lines[index][1] == indent and lines[index][2].startswith("- "):
            number, _, content = lines[index]
            item = content[2:].strip()
            if _KEY.fullmatch(item) and not item.startswith(('"', "'", "[")):
                # "- key: value" opens a mapping whose keys line up after the dash.
                lines[index] = (number, indent + 2, item)
                mapping, index = _yaml_block(lines, index, indent + 2)
                items.append(mapping)
            else:
                items.append(_yaml_scalar(item, number))
                index += 1
        return items, index
    mapping: dict[str, Any] = {}
    while index < len(lines) and lines[index][1] == indent:
        number, _, content = lines[index]
        match = _KEY.fullmatch(content)
        if not match:
            raise ValueError(f"line {number}: expected 'key: value', got {content!r}")
        key, rest = match.group(1), match.group(2)
        if key in mapping:
            raise ValueError(f"line {number}: duplicate key {key!r}")
        index += 1
        if rest:
            mapping[key] = _yaml_scalar(rest, number)
        elif index < len(lines) and lines[index][1] > indent:
            mapping[key], index = _yaml_block(lines, index, lines[index][1])
        else:
            mapping[key] = None
    if index < len(lines) and lines[index][1] > indent:
        raise ValueError(f"line {lines[index][0]}: unexpected indentation")
    return mapping, index


def _yaml_scalar(text: str, number: int) -> Any:
    if text.startswith('"') or text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not a JSON-compatible scalar or list: {text!r} ({exc})") from None
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise ValueError(f"line {number}: flow lists must hold double-quoted strings")
            return value
        return value
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'") or "'" in text[1:-1].replace("''", ""):
            raise ValueError(f"line {number}: bad single-quoted scalar {text!r}")
        return text[1:-1].replace("''", "'")
    if text[0] in "{&*!|>%@`" or ": " in text or " #" in text or text.endswith(":"):
        raise ValueError(f"line {number}: unsupported YAML in {text!r}")
    return text
