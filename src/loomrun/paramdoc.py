"""Generated parameter docs (`loomrun schema`): a job's parameters, merged over its
replicas, as one JSON Schema document (draft 2020-12) and as a Markdown table.

The JSON Schema describes the value of each parameter with the standard keywords (type,
minimum/maximum, enum, properties, items, default, description); what only loomrun knows
rides along as annotations under `x-loomrun`: the value in effect, which replicas have the
parameter, whether it is the optimizer's. A validator ignores those; the page and the
Markdown read them. Pure functions: the CLI and the supervisor (which keeps the document of
a finished job next to its ledger) both call them.
"""

from __future__ import annotations

import json
from typing import Any

from loomrun import fields
from loomrun import params as P
from loomrun.subjects import replica_order

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_TYPES = {"float": "number", "int": "integer", "bool": "boolean", "str": "string"}


def entries(
    specs: dict[str, dict[str, P.ParamSpec]], values: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per parameter name over every replica: its spec (the first replica's,
    in replica order), the replicas that have it, and the value in effect on each."""
    merged: dict[str, dict[str, Any]] = {}
    for replica in sorted(specs, key=replica_order):
        for name, spec in specs[replica].items():
            entry = merged.setdefault(name, {"spec": spec, "replicas": [], "values": {}})
            entry["replicas"].append(replica)
            value = values.get(replica, {}).get(name, spec.default)
            entry["values"][replica] = value
    order = sorted(merged, key=lambda name: (not merged[name]["spec"].builtin, name))
    return [merged[name] for name in order]


def value_schema(spec: P.ParamSpec) -> dict[str, Any]:
    """What a value of the spec is, in JSON Schema's words (no loomrun annotations)."""
    if spec.is_list:
        one = P._replace(spec, is_list=False, length=0, default=None, doc="")
        out: dict[str, Any] = {"type": "array", "items": value_schema(one)}
        if spec.length:
            out["minItems"] = out["maxItems"] = spec.length
    elif spec.kind == "struct":
        out = {
            "type": "object",
            "properties": {f.name: value_schema(f) for f in spec.fields},
            "required": [f.name for f in spec.fields if not f.optional and f.default is None],
            "additionalProperties": False,
        }
    elif spec.kind == "map":
        out = {"type": "object", "additionalProperties": value_schema(spec.item)}
    elif spec.choices:
        out = {"enum": list(spec.choices)}
    else:
        out = {"type": _TYPES[spec.kind]}
        if spec.min is not None:
            out["minimum"] = spec.min
        if spec.max is not None:
            out["maximum"] = spec.max
    if spec.doc:
        out["description"] = spec.doc
    if spec.default is not None:
        out["default"] = spec.default
    return out


def document(job: str, found: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's parameters as one JSON Schema document: an object with a property per
    parameter, each with its `x-loomrun` annotations."""
    properties = {}
    for entry in found:
        spec, values = entry["spec"], entry["values"]
        shown = list(values.values())
        same = all(v == shown[0] for v in shown)
        properties[spec.name] = {
            **value_schema(spec),
            "x-loomrun": {
                "replicas": entry["replicas"],
                "builtin": spec.builtin,
                "value": shown[0] if same else None,
                **({} if same else {"values": values}),
            },
        }
    return {
        "$schema": DRAFT,
        "$id": f"urn:loomrun:job:{job}",
        "title": f"The parameters of loomrun job {job}",
        "description": "Set each with `loomrun set NAME=VALUE`; a field of a structured one "
        "by its path, `NAME/FIELD=VALUE`.",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }


def from_document(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a document written earlier (a finished job's), for the Markdown."""
    rows = []
    for name, prop in document.get("properties", {}).items():
        extra = prop.get("x-loomrun", {})
        rows.append({"name": name, "schema": prop, **extra})
    return rows


def markdown(document: dict[str, Any]) -> str:
    """A table fit to paste into a README: a row per parameter, and one per field of a
    structured one (its path), each with its type, bounds or choices, default, the value
    in effect, the replicas that have it, and its doc."""
    lines = [
        "| parameter | type | bounds or choices | default | in effect | replicas | doc |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in from_document(document):
        replicas = _replicas(row.get("replicas", []))
        differs = "values" in row  # the replicas' values are not one
        top = _differs(row["values"]) if differs else _shown(row.get("value"))
        value = None if differs else row.get("value")
        own = row["schema"].get("default")
        for path, prop, got, default in _rows(row["name"], row["schema"], value, own):
            first = path == row["name"]
            cells = [
                f"`{path}`", _type(prop), _bounds(prop), _shown(default),
                top if first else _shown(got), replicas if first else "",
                prop.get("description", ""),
            ]  # fmt: skip
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _rows(path: str, prop: dict, value: Any, default: Any):
    """The parameter's row, then one per field of an object with properties; each with
    the value in effect and the script's own (the field of the parameter's default)."""
    yield path, prop, value, default
    for key, sub in prop.get("properties", {}).items():
        got = value.get(key) if isinstance(value, dict) else None
        own = default.get(key) if isinstance(default, dict) else None
        yield from _rows(fields.join(path, key), sub, got, own)


def _type(prop: dict) -> str:
    if "enum" in prop:
        return "choice"
    kind = prop.get("type", "")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and "properties" not in prop:
        return f"dict of {_type(prop.get('additionalProperties', {}))}"
    return {"number": "float", "integer": "int", "boolean": "bool", "string": "str"}.get(kind, kind)


def _bounds(prop: dict) -> str:
    if "enum" in prop:
        return ", ".join(_shown(c) for c in prop["enum"])
    found = [f"min {prop['minimum']:g}" if "minimum" in prop else "",
             f"max {prop['maximum']:g}" if "maximum" in prop else "",
             f"{prop['minItems']} items" if "minItems" in prop else ""]  # fmt: skip
    return ", ".join(f for f in found if f)


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return f"`{json.dumps(value, separators=(', ', ': '))}`"
    return P.format_value(value)


def _differs(values: dict[str, Any]) -> str:
    return "; ".join(f"{r}: {P.format_value(v)}" for r, v in values.items())


def _replicas(names: list[str]) -> str:
    """r0-r3 for a run of consecutive replicas, else the names."""
    numbers = [int(n[1:]) for n in names if n[1:].isdigit()]
    if len(numbers) == len(names) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{names[0]}-{names[-1]}"
    return ", ".join(names)


def _cell(text: str) -> str:
    """A table cell: one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")
