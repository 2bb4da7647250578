"""A change as the worker sees it: the desired entries of one change id (one `set`, of one
or several parameters); why one was missed; and a replay's schedule and its recorded
changes, made into such entries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from loomrun import builtin_params as BP
from loomrun import fields
from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.subjects import PAUSE

if TYPE_CHECKING:
    from loomrun.runtime.target import Target


def entries(desired: pb.DesiredState) -> dict[str, pb.DesiredParam]:
    """A desired state's changes by name, the pause flag's too."""
    found = dict(desired.params)
    if desired.HasField("pause"):
        found[PAUSE] = desired.pause
    return found


def by_change(found: dict[str, pb.DesiredParam]) -> dict[str, dict[str, pb.DesiredParam]]:
    """Entries by change: id -> {name: entry}; one `set` of several keys is one change.
    In the order they were made (their revision in the bucket): a restarted worker
    applies a field (`sched/warmup`), the whole value and an unset as they came."""
    changes: dict[str, dict[str, pb.DesiredParam]] = {}
    for name, want in sorted(found.items(), key=lambda item: (item[1].revision, item[0])):
        changes.setdefault(want.change_id, {})[name] = want
    return changes


def lead(parts: dict[str, pb.DesiredParam]) -> tuple[str, pb.DesiredParam]:
    """A change's first parameter by name, and its entry: what the change's answer is
    named by, and where its step, kind and flags are read (one `set` gives every key
    the same)."""
    name = min(parts)
    return name, parts[name]


def whole(parts: dict[str, pb.DesiredParam]) -> bool:
    """Every key of the change holds it (a later change to one of them replaces it all)."""
    _, want = lead(parts)
    return not want.together or set(want.together) == set(parts)


def composed(parts: dict[str, pb.DesiredParam], targets: dict[str, Target]) -> tuple[dict, dict]:
    """What each target of a change is given: a part naming a whole parameter, its
    entry; the fields of a structured one (`sched/warmup`), one new value of it, made
    from the value in effect now with each field changed (two clients that change
    different fields do not undo each other). Also, by parameter, each field's old and
    new value, for the answer. ParamError when a field or the result is refused."""
    if overlap := fields.overlapping(parts):
        raise P.ParamError(overlap)
    wants = {name: want for name, want in parts.items() if "/" not in name}
    fielded: dict[str, dict[str, tuple]] = {}
    for name in sorted(n for n in parts if "/" in n):
        base, keys = fields.split(name)
        target, want = targets.get(base), parts[name]
        if target is None:
            raise P.ParamError(f"{name}: this replica has no parameter {base!r}")
        spec = target.spec
        current = P.from_pb(wants[base].value) if base in fielded else target.get()
        if want.kind == pb.UNSET:
            new = fields.value_at(spec.default, keys)
            if new is None:
                raise P.ParamError(f"{name} has no value of the script's own to go back to")
        else:
            new = P.check(fields.field_spec(spec, keys), P.from_pb(want.value), name)
        value = P.check(spec, fields.patched(spec, current, keys, new))
        fielded.setdefault(base, {})[name] = (fields.value_at(current, keys), new)
        wants[base] = pb.DesiredParam(value=P.to_pb(value), kind=pb.SET, change_id=want.change_id)
    return wants, fielded


ARITHMETIC = {pb.SCALE: "*", pb.SHIFT: "+"}


def worked_out(parts: dict[str, pb.DesiredParam], targets: dict[str, Target]) -> dict:
    """A change's arithmetic (a rule's `set lr=lr*0.5`: SCALE, SHIFT) worked out on the
    value in effect now, at the step it lands, made the SET of its result; the other parts
    as they are. ParamError when a part's parameter holds no number, or the result does
    not fit it (an int that comes out with a fraction)."""
    if not any(want.kind in ARITHMETIC for want in parts.values()):
        return parts
    out = dict(parts)
    for name, want in parts.items():
        if want.kind not in ARITHMETIC:
            continue
        target = targets.get(name)
        spec = target.spec if target is not None else None
        if spec is None or spec.kind not in ("float", "int") or spec.is_list or "/" in name:
            raise P.ParamError(f"{name}: arithmetic works on a parameter that is one number")
        if want.value.WhichOneof("kind") != "f":
            raise P.ParamError(f"{name}: the change's {ARITHMETIC[want.kind]} has no number")
        current, by = target.get(), want.value.f
        shown = f"{name}={current!r}{ARITHMETIC[want.kind]}{by:g}"
        try:
            new = current * by if want.kind == pb.SCALE else current + by
        except (TypeError, ArithmeticError):  # an optional parameter's None, say
            raise P.ParamError(f"{shown}: no number to work on") from None
        if not math.isfinite(new):
            raise P.ParamError(f"{shown} is {new}, not a finite number")
        if spec.kind == "int":
            if new != round(new):
                raise P.ParamError(f"{shown} is {new:g}, not a whole number")
            new = int(round(new))
        done = pb.DesiredParam()
        done.CopyFrom(want)
        done.kind = pb.SET
        done.value.CopyFrom(P.to_pb(P.check(spec, new, name)))
        out[name] = done
    return out


def reshaped(
    parts: dict[str, pb.DesiredParam], targets: dict[str, Target]
) -> tuple[set[str], set[str]]:
    """The parameters a change brings, and those it takes away (the optimizer's kind)."""
    coming, going = set(), set()
    for name, want in parts.items():
        target = targets.get(name)
        if target is None or target.reshapes is None:
            continue
        value = target.spec.default if want.kind == pb.UNSET else P.from_pb(want.value)
        try:
            added, removed = target.reshapes(value)
        except Exception:  # noqa: BLE001 - a value it refuses: apply says why
            continue
        coming, going = coming | added, going | removed
    return coming, going


def refusal(parts: dict[str, pb.DesiredParam], targets: dict[str, Target]) -> str:
    """Why one of a change's values is refused, before any is applied ("" if none)."""
    for name, want in sorted(parts.items()):
        if want.kind == pb.UNSET:
            continue
        target = targets.get(name)
        spec = target.spec if target is not None else BP.BUILTINS.get(name)
        if spec is None:
            continue
        try:
            value = P.check(spec, P.from_pb(want.value))
            if target is not None and target.precheck is not None:
                target.precheck(value, want.kind == pb.HOLD)
        except P.ParamError as error:
            return str(error)  # it names the parameter
    return ""


def fill(outcome: pb.Outcome, name: str, said: pb.Outcome) -> None:
    """A part's old and new value, as applying it said, into the change's answer."""
    places = [p for p in outcome.parts if p.name == name]
    if name == outcome.name:
        places.append(outcome)
    for place in places:
        if said.HasField("old"):
            place.old.CopyFrom(said.old)
        if said.HasField("new"):
            place.new.CopyFrom(said.new)


def recorded_change(recorded: dict) -> dict[str, pb.DesiredParam]:
    """The change of a replayed record (loomrun.replay), due at its step: name -> entry,
    each parameter of it when it changed several together."""
    values = recorded.get("parts") or {recorded["name"]: recorded.get("value")}
    kind = {"hold": pb.HOLD, "unset": pb.UNSET}.get(recorded.get("kind"), pb.SET)
    parts = {}
    for name, value in values.items():
        want = pb.DesiredParam(
            at_step=recorded["step"], origin="replay", kind=kind,
            change_id=str(recorded.get("change_id", "")),
            together=sorted(values) if len(values) > 1 else [],
        )  # fmt: skip
        if kind != pb.UNSET:
            try:
                want.value.CopyFrom(P.to_pb(value))
            except (P.ParamError, TypeError, ValueError):
                want.value.CopyFrom(P.to_pb(str(value)))
        parts[name] = want
    return parts


def missed(at_step: int, step: int, agreed: bool) -> str:
    """Why a change due at `at_step` was applied nowhere, read (or agreed on) at `step`."""
    if agreed:
        return (
            f"the ranks agreed on it at step {step}, after its step {at_step}: no rank applied it"
        )
    return f"it arrived at step {step}, after its step {at_step}"


def read_plan(path: str) -> list[dict]:
    """This replica's replay schedule (loomrun.replay), as the supervisor wrote it: JSON,
    checked again here (a file can be anything)."""
    plan = json.loads(Path(path).read_text())
    if not isinstance(plan, list):
        raise ValueError("not a list of changes")
    keys = {"step": int, "name": str}

    def fits(change) -> bool:
        if not isinstance(change, dict) or not all(
            isinstance(change.get(k), t) for k, t in keys.items()
        ):
            return False
        parts = change.get("parts")
        return parts is None or (
            isinstance(parts, dict) and bool(parts) and all(isinstance(n, str) for n in parts)
        )

    return [change for change in plan if fits(change)]
