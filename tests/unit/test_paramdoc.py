"""`loomrun schema`'s documents, in process: one JSON Schema (draft 2020-12) that a real
validator accepts, and that accepts the values in effect and refuses bad ones; the Markdown
table, a row per field; a finished job's document read back from every node's file."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import jsonschema
import pytest

from loomrun import builtin_params as BP
from loomrun import fields, paramdoc
from loomrun import params as P
from loomrun.fields import Field
from loomrun.records import read_schema, write_whole


@dataclasses.dataclass
class Warmup:
    steps: Annotated[int, Field(min=0, doc="steps of warm-up | linear")] = 100
    start: float = 0.1


@dataclasses.dataclass
class Sched:
    warmup: Warmup = dataclasses.field(default_factory=Warmup)
    kind: Annotated[str, Field(choices=("cos", "lin"))] = "cos"


def _specs() -> dict[str, P.ParamSpec]:
    return {
        "lr": BP.BUILTINS["lr"],
        "betas": BP.BUILTINS["betas"],
        "sched": fields.spec_of("sched", Sched, default=Sched(Warmup(steps=7)), doc="the schedule"),
        "aug": fields.spec_of("aug", dict[str, float], default={"p": 0.5}),
    }  # fmt: skip


def _document(values: dict[str, dict]) -> dict:
    specs = {replica: _specs() for replica in values}
    return paramdoc.document("job-1", paramdoc.entries(specs, values))


def test_the_document_is_draft_2020_12_and_accepts_the_values_in_effect():
    values = {"lr": 0.1, "betas": [0.9, 0.95], "aug": {"p": 0.1, "q": 2.0},
              "sched": {"warmup": {"steps": 3, "start": 0.2}, "kind": "lin"}}  # fmt: skip
    document = _document({"r0": values, "r1": values})
    jsonschema.Draft202012Validator.check_schema(document)
    validator = jsonschema.Draft202012Validator(document)
    validator.validate(values)
    for bad in (
        {"lr": -1.0},
        {"betas": [0.9]},
        {"sched": {"warmup": {"steps": -2}}},
        {"sched": {"warmpu": {}}},
        {"sched": {"kind": "exp"}},
        {"aug": {"p": "high"}},
        {"nothing": 1},
    ):
        assert not validator.is_valid(bad), bad
    sched = document["properties"]["sched"]
    assert sched["x-loomrun"] == {
        "replicas": ["r0", "r1"],
        "builtin": False,
        "value": values["sched"],
    }
    assert sched["default"] == {"warmup": {"steps": 7, "start": 0.1}, "kind": "cos"}
    assert sched["properties"]["warmup"]["properties"]["steps"]["minimum"] == 0


def test_values_that_differ_between_replicas_are_each_shown():
    document = _document({"r0": {"lr": 0.1}, "r1": {"lr": 0.2}})
    lr = document["properties"]["lr"]["x-loomrun"]
    assert lr["value"] is None and lr["values"] == {"r0": 0.1, "r1": 0.2}
    assert "r0: 0.1; r1: 0.2" in paramdoc.markdown(document)


def test_the_markdown_has_a_row_per_field_with_the_scripts_own_default():
    document = _document({f"r{i}": {} for i in range(4)})
    table = paramdoc.markdown(document)
    lines = table.splitlines()
    assert (
        lines[0]
        == "| parameter | type | bounds or choices | default | in effect | replicas | doc |"
    )
    rows = {line.split(" | ")[0].strip("| `"): line for line in lines[2:]}
    assert list(rows) == [
        "betas", "lr", "aug", "sched", "sched/warmup", "sched/warmup/steps",
        "sched/warmup/start", "sched/kind",
    ]  # fmt: skip
    assert rows["sched"].split(" | ")[5] == "r0-r3"
    steps = rows["sched/warmup/steps"].split(" | ")
    assert steps[1:5] == ["int", "min 0", "7", "7"], "the parameter's default, not the field's"
    assert steps[6].startswith("steps of warm-up \\| linear"), "a pipe cannot end a cell"
    assert rows["sched/kind"].split(" | ")[1:3] == ["choice", "cos, lin"]


def test_a_finished_jobs_document_is_read_back_from_every_nodes_file(tmp_path):
    first = _document({"r0": {}, "r1": {}})
    second = _document({"r2": {}})
    assert not write_whole([tmp_path], "schema.json", json.dumps(first))
    assert not write_whole([tmp_path], "schema.node1.json", json.dumps(second))
    (tmp_path / "schema.node2.json").write_text("{not json")
    found = read_schema(tmp_path)
    assert found["properties"]["lr"]["x-loomrun"]["replicas"] == ["r0", "r1", "r2"]
    assert read_schema(tmp_path / "nothing") is None


@pytest.mark.parametrize("names, shown", [(["r0", "r1", "r2"], "r0-r2"), (["r0", "r2"], "r0, r2")])
def test_replicas_read_as_a_range_when_they_are_one(names, shown):
    assert paramdoc._replicas(names) == shown
