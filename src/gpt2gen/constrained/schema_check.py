"""Which JSON Schemas the regex route can keep its promise for, checked before any regex is built.

The promise: every text the constraint lets the model finish validates under `jsonschema`. The
regex comes from outlines-core, which ignores some keywords and writes some others unsoundly, so a
schema is accepted only if it uses the keywords below, in the ways below; anything else is refused
with one line naming the keyword and where it is. The property tests (tests/test_schema_soundness.py)
generate schemas from this list and check the texts against `jsonschema`.

On purpose, the texts are a subset of the valid ones: properties come in the schema's order,
whitespace between tokens is at most what the whitespace pattern allows (one space by default),
objects are closed to their listed properties (`additionalProperties` is read as false), strings
use only the escapes \\" \\\\ \\/ \\b \\f \\n \\r \\t, and a `format` is written by its regex but,
as `jsonschema` does by default, not validated as an assertion.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from .automaton import char_automaton

MAX_SCHEMA_CHARS = 200_000
MAX_DEPTH = 32

ANNOTATIONS = {"title", "description", "$comment", "examples", "default", "$schema", "$id", "deprecated", "readOnly",
               "writeOnly", "contentEncoding", "contentMediaType"}
SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
             "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "pattern", "format", "$defs", "definitions"}
# Formats whose outlines-core regex writes valid JSON strings (others can write a bare quote or backslash).
SAFE_FORMATS = {"date-time", "date", "uuid"}
REASONS = {
    "not": "a regular expression cannot exclude a subschema here",
    "if": "conditional subschemas are not converted", "then": "conditional subschemas are not converted",
    "else": "conditional subschemas are not converted",
    "dependentRequired": "dependencies between properties are not converted",
    "dependentSchemas": "dependencies between properties are not converted",
    "dependencies": "dependencies between properties are not converted",
    "propertyNames": "objects are closed to their listed properties: list the names in 'properties'",
    "patternProperties": "objects are closed to their listed properties: list the names in 'properties'",
    "prefixItems": "tuples are not converted; the regex would allow any length",
    "minimum": "numeric bounds are not converted; use an enum", "maximum": "numeric bounds are not converted; use an enum",
    "exclusiveMinimum": "numeric bounds are not converted; use an enum",
    "exclusiveMaximum": "numeric bounds are not converted; use an enum",
    "multipleOf": "numeric bounds are not converted; use an enum",
    "uniqueItems": "a regular expression cannot compare items", "contains": "'contains' is not converted",
    "minProperties": "property counts are not converted: use 'required'",
    "maxProperties": "property counts are not converted: use 'required'",
}
_TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}
_UNSAFE_IN_STRINGS = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # written escaped in JSON


class UnsupportedSchema(ValueError):
    """A JSON Schema (or part of one) whose texts the regex route could not keep valid."""


def check_schema(schema) -> None:
    """Raise `UnsupportedSchema` (one line: what, where, what to do) unless every finished text will validate."""
    _Checker(schema).check(schema, "", 0, ())


def _json_types(value) -> set[str]:
    """The JSON Schema types of a value (an integral float is both a number and an integer)."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    return {"string" if isinstance(value, str) else "array" if isinstance(value, list) else "object"}


class _Checker:
    def __init__(self, root) -> None:
        self.root = root

    def fail(self, path: str, what: str) -> UnsupportedSchema:
        return UnsupportedSchema(f"at {path or 'the top'} of the schema, {what}")

    def resolve(self, ref, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.fail(path, f"the $ref {ref!r} is not supported: only references inside the schema (#/...)")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise self.fail(path, f"the $ref {ref!r} points nowhere")
            node = node[part]
        return node

    def check(self, node, path: str, depth: int, refs: tuple) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"the schema nests deeper than {MAX_DEPTH} levels (the limit)")
        if isinstance(node, bool):
            if not node:
                raise self.fail(path, "the schema false (nothing is valid) is not supported")
            return
        if not isinstance(node, dict):
            raise self.fail(path, f"a schema must be an object or a boolean, not {type(node).__name__}")
        for key in node:
            if key in REASONS:
                raise self.fail(path, f"the keyword {key!r} is not enforced ({REASONS[key]}): remove it")
            if key not in SUPPORTED and key not in ANNOTATIONS:
                raise self.fail(path, f"the keyword {key!r} is not supported: remove it")
        constraints = set(node) & (SUPPORTED - {"$defs", "definitions"})
        for combinator in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const"):
            if combinator in node and (others := sorted(constraints - {combinator, "type"} if combinator in ("enum", "const")
                                                         else constraints - {combinator})):
                raise self.fail(path, f"{combinator!r} beside {', '.join(map(repr, others))} is not supported "
                                      f"(outlines-core would ignore one of them): move them into one schema")
        types = node.get("type")
        if types is not None:
            names = types if isinstance(types, list) else [types]
            if not names or any(t not in _TYPES for t in names):
                raise self.fail(path, f"the type {types!r} is not one of {', '.join(sorted(_TYPES))}")
        for keyword in ("enum", "const"):
            if keyword in node:
                values = node["enum"] if keyword == "enum" else [node["const"]]
                if not isinstance(values, list) or not values:
                    raise self.fail(path, "an enum must be a non-empty list")
                if types is not None and (bad := [v for v in values if not _json_types(v) & set(names)]):
                    raise self.fail(path, f"the {keyword} value {json.dumps(bad[0])} is not of type {types!r}")
        if "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise self.fail(path, f"the $ref {ref!r} is recursive (a regular expression cannot nest without "
                                      "bound): unroll it to a fixed depth")
            self.check(self.resolve(ref, path), f"{path}/$ref", depth + 1, refs + (ref,))
        for keyword in ("anyOf", "oneOf", "allOf"):
            if keyword in node:
                branches = node[keyword]
                if not isinstance(branches, list) or not branches:
                    raise self.fail(path, f"{keyword!r} must be a non-empty list of schemas")
                if keyword == "allOf" and len(branches) > 1:
                    raise self.fail(path, "'allOf' with more than one schema is not supported: merge them into one")
                for i, branch in enumerate(branches):
                    self.check(branch, f"{path}/{keyword}/{i}", depth + 1, refs)
                if keyword == "oneOf":
                    self.disjoint(branches, path, refs)
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise self.fail(path, "'properties' must be an object")
        for name, sub in properties.items():
            if re.search(r'["\\\x00-\x1f]', name):
                raise self.fail(path, f"the property name {name!r} contains a quote, a backslash or a control "
                                      "character, which outlines-core writes unescaped: rename it")
            self.check(sub, f"{path}/properties/{name}", depth + 1, refs)
        for name in node.get("required", []):
            if name not in properties:
                raise self.fail(path, f"'required' names {name!r}, which is not in 'properties' (objects are "
                                      "closed to their listed properties): add it to 'properties'")
        if isinstance(node.get("additionalProperties"), dict):
            self.check(node["additionalProperties"], f"{path}/additionalProperties", depth + 1, refs)
        if "items" in node:
            if isinstance(node["items"], list):
                raise self.fail(path, "'items' as a list (tuples) is not supported: give one schema")
            self.check(node["items"], f"{path}/items", depth + 1, refs)
        if "pattern" in node:
            self.pattern(node, path)
        if (fmt := node.get("format")) is not None and fmt not in SAFE_FORMATS:
            raise self.fail(path, f"the format {fmt!r} is not supported (outlines-core's regex for it can write "
                                  f"invalid JSON): use one of {', '.join(sorted(SAFE_FORMATS))} or a 'pattern'")
        for holder in ("$defs", "definitions"):
            for name, sub in node.get(holder, {}).items():
                self.check(sub, f"{path}/{holder}/{name}", depth + 1, refs)

    def pattern(self, node, path: str) -> None:
        """JSON Schema's `pattern` is a search; the regex writes the whole string by it: only ^...$ agree."""
        pattern = node["pattern"]
        if {"minLength", "maxLength", "format"} & set(node):
            raise self.fail(path, "'pattern' beside minLength, maxLength or format is not supported: put the lengths "
                                  "into the pattern")
        from .automaton import sre, sre_parser

        try:
            tree = list(sre_parser.parse(pattern))
        except (re.error, TypeError) as exc:
            raise self.fail(path, f"the pattern {pattern!r} is not a valid regular expression: {exc}") from None
        anchored = (len(tree) >= 2 and tree[0] == (sre.AT, sre.AT_BEGINNING) and tree[-1] == (sre.AT, sre.AT_END))
        if not anchored:
            raise self.fail(path, f"the pattern {pattern!r} is not anchored: JSON Schema searches a pattern anywhere "
                                  "in the string, the regex writes the whole string by it: write it as ^...$")
        try:
            inner = char_automaton(pattern)
        except ValueError as exc:
            raise self.fail(path, f"the pattern: {exc}") from None
        for moves in inner.moves:
            for lo, hi, _ in moves:
                if any(lo <= b and a <= hi for a, b in _UNSAFE_IN_STRINGS):
                    raise self.fail(path, f"the pattern {pattern!r} can match a quote, a backslash or a control "
                                          "character, which outlines-core writes unescaped: exclude them "
                                          '(e.g. [^"\\\\\\x00-\\x1f])')

    def disjoint(self, branches: list, path: str, refs: tuple) -> None:
        """`oneOf` is written as `anyOf`: sound only when no value is valid under two branches."""
        seen: list[tuple[set[str], set[str] | None]] = []  # per branch: its types, and its values if it lists them
        for branch in branches:
            while isinstance(branch, dict) and "$ref" in branch:
                branch = self.resolve(branch["$ref"], path)
            values = None
            if isinstance(branch, dict) and ("enum" in branch or "const" in branch):
                listed = branch["enum"] if "enum" in branch else [branch["const"]]
                values = {json.dumps(v, sort_keys=True) for v in listed}
                types = set().union(*(_json_types(v) for v in listed))
            elif isinstance(branch, dict) and "type" in branch:
                types = set(branch["type"] if isinstance(branch["type"], list) else [branch["type"]])
                if "number" in types:
                    types.add("integer")
            else:
                raise self.fail(path, "'oneOf' branches must each have a 'type', an 'enum' or a 'const' (to prove "
                                      "that no value is valid under two of them): use 'anyOf' if overlap is fine")
            for other_types, other_values in seen:
                overlap = (values & other_values) if values is not None and other_values is not None \
                    else types & other_types
                if overlap:
                    raise self.fail(path, "'oneOf' branches overlap (a value valid under two branches is invalid "
                                          "under oneOf): make them disjoint or use 'anyOf'")
            seen.append((types, values))


def parse_schema(text: str) -> dict | bool:
    """The schema parsed from JSON text, within the size limit; UnsupportedSchema or ValueError otherwise."""
    if len(text) > MAX_SCHEMA_CHARS:
        raise UnsupportedSchema(f"the JSON Schema is {len(text):,} characters long, above the limit of "
                                f"{MAX_SCHEMA_CHARS:,}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the JSON Schema is not valid JSON: {exc}") from None
    except RecursionError:
        raise UnsupportedSchema(f"the JSON Schema nests deeper than {MAX_DEPTH} levels (the limit)") from None


def read_schema_file(path: str | Path) -> str:
    """The text of a schema file: a regular file of at most MAX_SCHEMA_CHARS bytes (a FIFO or a device is refused)."""
    path = Path(path)
    try:
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise UnsupportedSchema(f"{str(path)!r} is not a regular file (a pipe or a device could block or "
                                        "never end): save the schema to a file")
            data = handle.read(MAX_SCHEMA_CHARS + 1)
    except OSError as exc:
        raise UnsupportedSchema(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_SCHEMA_CHARS:
        raise UnsupportedSchema(f"{str(path)!r} is over {MAX_SCHEMA_CHARS:,} bytes (the limit)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsupportedSchema(f"{str(path)!r} is not UTF-8 text: {exc}") from None


def check_whitespace(whitespace_pattern: str | None) -> None:
    """A whitespace pattern may write only JSON's whitespace (space, tab, newline, carriage return)."""
    if whitespace_pattern is None:
        return
    for moves in char_automaton(whitespace_pattern).moves:
        for lo, hi, _ in moves:
            if any(c not in (0x20, 0x09, 0x0A, 0x0D) for c in range(lo, min(hi, lo + 64) + 1)):
                raise UnsupportedSchema(f"the whitespace pattern {whitespace_pattern!r} writes characters JSON does "
                                        "not allow between tokens: use only space, \\t, \\n and \\r")


def json_schema_regex(schema: dict | str, whitespace_pattern: str | None = None) -> str:
    """The regular expression of the JSON texts valid under `schema`, by `outlines-core`.

    The schema is checked first (`schema_check.py`): what the regex could not keep valid is refused
    with one line. Whitespace between JSON tokens follows `whitespace_pattern` (outlines-core's
    default: at most one space, so the model cannot pad forever).
    """
    from outlines_core.json_schema import build_regex_from_schema

    parsed = parse_schema(schema) if isinstance(schema, str) else schema
    check_schema(parsed)
    check_whitespace(whitespace_pattern)
    try:
        return build_regex_from_schema(json.dumps(parsed), whitespace_pattern)
    except Exception as exc:  # outlines-core raises its own error types, over several lines
        raise ValueError(f"cannot turn this JSON Schema into a regular expression: {str(exc).splitlines()[0]}") from exc
