"""Conversion and validation of parameter values: pure functions, no processes."""

from __future__ import annotations

import enum
from typing import Literal

import pytest

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb

LR = P.ParamSpec("lr", "float", min=0.0, max=1.0)
BATCH = P.ParamSpec("batch", "int", min=1)
FLAG = P.ParamSpec("flag", "bool")
BETAS = P.ParamSpec("betas", "float", is_list=True, length=2, min=0.0, max=1.0)
MODE = P.ParamSpec("mode", "str", choices=("adam", "sgd"))


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@pytest.mark.parametrize(
    "spec, text, value",
    [
        (LR, "1e-3", 0.001),
        (LR, "0.001", 0.001),
        (LR, " 0.5 ", 0.5),
        (LR, "1", 1.0),
        (BATCH, "64", 64),
        (FLAG, "true", True), (FLAG, "FALSE", False), (FLAG, "yes", True), (FLAG, "no", False),
        (FLAG, "on", True), (FLAG, "off", False), (FLAG, "1", True), (FLAG, "0", False),
        (BETAS, "0.9,0.999", [0.9, 0.999]),
        (BETAS, "[0.9, 0.999]", [0.9, 0.999]),
        (MODE, "sgd", "sgd"),
        (P.ParamSpec("ids", "int", is_list=True), "1,2,3", [1, 2, 3]),
        (P.ParamSpec("ids", "int", is_list=True), "", []),
        (P.ParamSpec("flags", "bool", is_list=True), "[true, false]", [True, False]),
    ],
)  # fmt: skip
def test_parse_converts_text(spec, text, value):
    assert P.parse(spec, text) == value
    assert type(P.parse(spec, text)) is type(value)


@pytest.mark.parametrize(
    "spec, text, message",
    [
        (LR, "abc", "invalid value for lr: expected a float (like 0.001 or 1e-3), got 'abc'"),
        (LR, "nan", "invalid value for lr: expected a finite float, got 'nan'"),
        (LR, "2", "invalid value for lr: 2.0 is above the maximum 1"),
        (LR, "-1", "invalid value for lr: -1.0 is below the minimum 0"),
        (BATCH, "64.5", "invalid value for batch: expected an integer (like 64), got '64.5'"),
        (BATCH, "0", "invalid value for batch: 0 is below the minimum 1"),
        (FLAG, "maybe", "expected a boolean (true/false, yes/no, on/off, 1/0), got 'maybe'"),
        (BETAS, "0.9", "expected a list of 2 floats, got [0.9]"),
        (BETAS, "[0.9, 1.5]", "1.5 is above the maximum 1"),
        (BETAS, "[0.9", "as a JSON list or comma list"),
        (MODE, "rmsprop", "invalid value for mode: expected one of 'adam', 'sgd', got 'rmsprop'"),
        (BATCH, "99999999999999999999999", "expected an integer of 64 bits"),
        (BATCH, "\u0663", "expected an integer (like 64)"),  # int() takes an Arabic-Indic 3
        (BATCH, "1_000", "expected an integer (like 64)"),
        (LR, "1_0.5", "expected a float"),
        (LR, "\u0661.\u0665", "expected a float"),
        (BETAS, "[" * 50_000, "... (50002 characters)"),  # json.loads: RecursionError
    ],
)
def test_parse_names_parameter_expectation_and_value(spec, text, message):
    with pytest.raises(P.ParamError) as caught:
        P.parse(spec, text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


@pytest.mark.parametrize(
    "spec, value, ok",
    [
        (LR, 1, 1.0), (LR, True, None), (LR, "0.1", None), (LR, [0.1], None),
        (BATCH, 3.0, 3), (BATCH, 3.5, None), (BATCH, True, None), (BATCH, 1e20, None),
        (BATCH, 2**63, None), (BATCH, 2**63 - 1, 2**63 - 1),
        (FLAG, 1, None), (FLAG, False, False),
        (BETAS, (0.5, 0.6), [0.5, 0.6]), (BETAS, 0.5, None),
        (MODE, "adam", "adam"), (MODE, 3, None),
    ],
)  # fmt: skip
def test_check_typed_values_from_the_wire(spec, value, ok):
    if ok is None:
        with pytest.raises(P.ParamError):
            P.check(spec, value)
    else:
        assert P.check(spec, value) == ok


def test_specs_from_annotations():
    assert P.spec_from_annotation("lr", float).kind == "float"
    literal = P.spec_from_annotation("opt", Literal["adam", "sgd"])
    assert (literal.kind, literal.choices) == ("str", ("adam", "sgd"))
    colors = P.spec_from_annotation("color", Color, default=Color.RED)
    assert (colors.choices, colors.default) == (("RED", "BLUE"), "RED")
    assert P.to_python(colors, "BLUE") is Color.BLUE
    pair = P.spec_from_annotation("betas", tuple[float, float])
    assert (pair.is_list, pair.length, pair.kind) == (True, 2, "float")
    many = P.spec_from_annotation("ids", list[int])
    assert (many.is_list, many.length, many.kind) == (True, 0, "int")
    with pytest.raises(TypeError, match="cannot steer"):
        P.spec_from_annotation("x", dict)


@pytest.mark.parametrize("value", [0.5, -3, True, "text", [1.0, 2.0], [[1], ["a"]], []])
def test_values_round_trip_through_protobuf(value):
    wire = pb.Value.FromString(P.to_pb(value).SerializeToString())
    assert P.from_pb(wire) == value
    assert type(P.from_pb(wire)) is type(value)


def test_specs_round_trip_through_protobuf():
    for spec in (LR, BATCH, FLAG, BETAS, MODE, P.ParamSpec("k", "int", choices=(1, 2), default=1)):
        wire = pb.ParamSpec.FromString(P.spec_to_pb(spec).SerializeToString())
        assert P.spec_from_pb(wire) == spec


def test_malformed_spec_is_a_param_error():
    with pytest.raises(P.ParamError):
        P.spec_from_pb(pb.ParamSpec(name="x", kind=99))
    with pytest.raises(P.ParamError):
        P.spec_from_pb(pb.ParamSpec(name="x", kind=pb.STR, choices=["{not json"]))
