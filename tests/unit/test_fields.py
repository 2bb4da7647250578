"""Structured parameters, in process: declarations from dataclasses, TypedDicts and
dict[str, T] (per-field bounds through Annotated), checks with paths in every message,
field paths and their bucket keys, patches, and the script's new instances."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, NotRequired, TypedDict

import pytest

from loomrun import fields
from loomrun import params as P
from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.fields import Field
from loomrun.runtime.change import composed


@dataclasses.dataclass
class Warmup:
    steps: Annotated[int, Field(min=0, doc="steps of warm-up")] = 100
    start: Annotated[float, Field(min=0.0, max=1.0)] = 0.1


@dataclasses.dataclass
class Sched:
    warmup: Warmup = dataclasses.field(default_factory=Warmup)
    peak: float = 3e-3
    name: str = "cosine"


@dataclasses.dataclass
class Leaf:
    child: Leaf | None = None


@dataclasses.dataclass
class Node:
    children: list[Node] = dataclasses.field(default_factory=list)


class Mix(TypedDict):
    alpha: float
    note: NotRequired[str]


def test_a_nested_dataclass_gives_a_spec_with_its_defaults_bounds_and_docs():
    spec = fields.spec_of("sched", Sched, doc="the schedule")
    assert spec.kind == "struct" and [f.name for f in spec.fields] == ["warmup", "peak", "name"]
    assert spec.default == {"warmup": {"steps": 100, "start": 0.1}, "peak": 3e-3, "name": "cosine"}
    steps = fields.field_spec(spec, ["warmup", "steps"])
    assert (steps.name, steps.kind, steps.min, steps.doc) == (
        "sched/warmup/steps",
        "int",
        0,
        "steps of warm-up",
    )
    assert P.spec_from_pb(P.spec_to_pb(spec)) == spec, "the wire keeps every field"


def test_a_typeddict_a_dict_and_a_list_of_dataclasses():
    mix = fields.spec_of("mix", Mix)
    assert [(f.name, f.optional) for f in mix.fields] == [("alpha", False), ("note", True)]
    assert P.check(mix, {"alpha": 1}) == {"alpha": 1.0}, "an optional key may be left out"
    aug = fields.spec_of("aug", dict[str, Annotated[float, Field(min=0.0)]])
    assert aug.kind == "map" and aug.item.min == 0.0
    assert aug.type_name == "an object whose values are floats"
    blocks = fields.spec_of("blocks", list[Warmup], default=[Warmup(5)])
    assert blocks.is_list and blocks.default == [{"steps": 5, "start": 0.1}]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"warmpu": {}}', "invalid value for sched: no field 'warmpu' (did you mean 'warmup'?)"),
        ('{"warmup": {"steps": -1}}', "for sched/warmup/steps: -1 is below the minimum 0"),
        ('{"peak": "high"}', "invalid value for sched/peak: expected a float, got 'high'"),
        ("[1, 2]", "invalid value for sched: expected an object with fields warmup, peak, name"),
        ("{", "as JSON, got '{'"),
    ],
)  # fmt: skip
def test_a_bad_value_names_its_path_and_what_was_expected(text, message):
    spec = fields.spec_of("sched", Sched)
    with pytest.raises(P.ParamError) as error:
        P.parse(spec, text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_whole_value_takes_the_fields_defaults_for_those_left_out():
    spec = fields.spec_of("sched", Sched)
    assert P.parse(spec, '{"peak": 0.01}') == {
        "warmup": {"steps": 100, "start": 0.1}, "peak": 0.01, "name": "cosine"
    }  # fmt: skip
    mix = fields.spec_of("mix", Mix)
    with pytest.raises(P.ParamError, match="field 'alpha' is missing"):
        P.check(mix, {})


def test_a_value_over_16_kib_is_refused_whole():
    aug = fields.spec_of("aug", dict[str, float])
    P.check(aug, {f"k{i}": 0.5 for i in range(700)})  # about 13 KiB
    with pytest.raises(P.ParamError, match="over the 16 KiB a value may take"):
        P.check(aug, {f"k{i}": 0.5 for i in range(2000)})


def test_paths_split_escape_and_never_read_as_a_param_groups_lr():
    assert fields.split("sched/warmup/steps") == ("sched", ["warmup", "steps"])
    assert fields.split("aug/a~1b/c~0d") == ("aug", ["a/b", "c~d"])
    assert fields.join("aug", "a/b") == "aug/a~1b"
    assert fields.split("aug/p.x") == ("aug", ["p.x"]), "a dot in a key is a dot"
    assert fields.split("lr.0") == ("lr.0", [])
    for name in ("sched/warmup", "aug/p.x", "aug/é x", "aug/a~1b", "lr.0", "lr"):
        token = S.key_token(name)
        assert S.key_name(token) == name and " " not in token and token.count(".") <= 1
        assert S.split_desired(S.desired_param("job", "r0", name)) == ("r0", "param", name)
    for bad in ("sched.warmup", "a//b", "a/", "/a", "x" * 300):
        assert not S.is_key(bad)
    assert S.key_name("a/=FF") is None, "not UTF-8: not a name"


def test_a_field_path_that_does_not_fit_says_why():
    spec = fields.spec_of("sched", Sched)
    for keys, message in [
        (["warmup", "stps"], "no field 'sched/warmup/stps' (did you mean 'sched/warmup/steps'?)"),
        (["peak", "x"], "no field 'sched/peak/x': sched/peak is a float"),
    ]:  # fmt: skip
        with pytest.raises(P.ParamError, match=re.escape(message)):
            fields.field_spec(spec, keys)
    blocks = fields.spec_of("blocks", list[Warmup])
    with pytest.raises(P.ParamError, match="is a list"):
        fields.field_spec(blocks, ["first"])
    assert fields.field_spec(blocks, ["1", "steps"]).name == "blocks/1/steps"
    for index in ("\u00b2", "01", "\u0661", "-1", " 1"):  # one item, one name: ASCII digits
        with pytest.raises(P.ParamError, match="is a list"):
            fields.field_spec(blocks, [index, "steps"])
        with pytest.raises(P.ParamError, match="items in effect"):
            fields.patched(blocks, [{"steps": 1, "start": 0.1}], [index, "steps"], 2)
        assert fields.value_at([{"steps": 1}], [index, "steps"]) is None
    betas = P.ParamSpec("betas", "float", is_list=True, length=2)
    with pytest.raises(P.ParamError, match="no field 'betas/0': betas is a list of 2 floats"):
        fields.field_spec(betas, ["0"])


def test_a_field_of_a_parameter_the_replica_lacks_is_refused_not_raised():
    parts = {"betas/0": pb.DesiredParam(value=P.to_pb(0.9), kind=pb.SET, change_id="c")}
    with pytest.raises(P.ParamError, match="this replica has no parameter 'betas'"):
        composed(parts, {})


def test_a_patch_is_made_on_a_copy_of_the_value_in_effect():
    spec = fields.spec_of("sched", Sched)
    current = P.check(spec, spec.default)
    new = fields.patched(spec, current, ["warmup", "steps"], 7)
    assert new["warmup"]["steps"] == 7 and current["warmup"]["steps"] == 100
    blocks = fields.spec_of("blocks", list[Warmup])
    with pytest.raises(P.ParamError, match="blocks has 1 items in effect"):
        fields.patched(blocks, [{"steps": 1, "start": 0.1}], ["3", "steps"], 2)
    assert fields.overlapping(["sched", "sched/peak"]) and fields.overlapping(["a/b", "a/b/c"])
    assert not fields.overlapping(["sched/peak", "sched/warmup", "schedule"])


def test_the_script_gets_a_new_instance_of_its_own_types_each_time():
    spec = fields.spec_of("sched", Sched)
    plain = P.check(spec, spec.default)
    one, two = P.to_python(spec, plain), P.to_python(spec, plain)
    assert one == Sched() and one is not two and one.warmup is not two.warmup
    assert isinstance(one.warmup, Warmup)
    one.warmup.steps = 5
    assert plain["warmup"]["steps"] == 100, "never loomrun's own copy"
    assert fields.to_wire(one) == {
        "warmup": {"steps": 5, "start": 0.1},
        "peak": 3e-3,
        "name": "cosine",
    }


def test_declarations_that_cannot_be_steered_are_refused_with_their_path():
    with pytest.raises(TypeError, match="tree/child: .*cannot steer a parameter of type"):
        fields.spec_of("tree", Leaf)
    with pytest.raises(TypeError, match=r"nested deeper than 8 \(a cycle\?\)"):
        fields.spec_of("tree", Node)
    with pytest.raises(TypeError, match="a dict parameter has str keys"):
        fields.spec_of("bad", dict[int, float])
    with pytest.raises(TypeError, match="min= is for numbers; give it to a field"):
        fields.spec_of("sched", Sched, min=0.0)
