"""The checks a change passes before anything is written: every replica has every
parameter and takes its value, and a process group is changed whole (or with --force)."""

from __future__ import annotations

from typing import Any

from loomrun import builtin_params as BP
from loomrun import fields
from loomrun import params as P
from loomrun.client.model import Job, ReplicaSchema, SteerError, suggest
from loomrun.desired import MOST_TOGETHER


def check(
    schemas: dict[str, ReplicaSchema], job: str, replicas: list[str], changes: dict[str, Any],
    convert: bool = True,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every change converted and validated for every replica against the schema it
    published; nothing is written. With `convert=False`, only that every replica has every
    parameter."""
    if len(changes) > MOST_TOGETHER:
        raise SteerError(
            f"one change sets {MOST_TOGETHER} parameters at most, not {len(changes)}: "
            "split it into several"
        )
    if overlap := fields.overlapping(changes):
        raise SteerError(overlap)
    checked: dict[str, dict[str, Any]] = {}
    for replica in replicas:
        if replica not in schemas:
            raise SteerError(f"{replica} of {job} has not published its parameters yet")
        specs = after_switch(schemas[replica].specs, changes, convert)
        checked[replica] = {}
        for name, text in changes.items():
            if "/" in name:
                spec = _field(specs, name, replica, unset=not convert)
                if convert:
                    checked[replica][name] = _value(spec, text)
                continue
            spec = specs.get(name)
            if spec is None and name in BP.BUILTINS and not BP.BUILTINS.keys() & set(specs):
                raise SteerError(
                    f"{replica} has no optimizer yet: {name} appears with its first "
                    "optimizer step; try again in a moment"
                )
            if spec is None:
                known = sorted(specs)
                raise SteerError(
                    f"{replica} has no parameter {name!r}{suggest(name, known)}; "
                    f"it has: {', '.join(known) or 'none'}"
                )
            if not convert:
                continue
            checked[replica][name] = _value(spec, text)
    return checked


def _value(spec: P.ParamSpec, text: Any) -> Any:
    try:
        return P.parse(spec, text) if isinstance(text, str) else P.check(spec, text)
    except P.ParamError as error:
        raise SteerError(str(error)) from None


def _field(specs: dict[str, P.ParamSpec], name: str, replica: str, unset: bool) -> P.ParamSpec:
    """The spec of a field named by its path (`sched/warmup`); for an unset, the field
    must have a value of the script's own (in its parameter's default)."""
    base, keys = fields.split(name)
    spec = specs.get(base)
    if spec is None:
        known = sorted(specs)
        raise SteerError(
            f"{replica} has no parameter {base!r}{suggest(base, known)}; "
            f"it has: {', '.join(known) or 'none'}"
        )
    try:
        found = fields.field_spec(spec, keys)
    except P.ParamError as error:
        raise SteerError(f"{replica}: {error}") from None
    if unset and fields.value_at(spec.default, keys) is None:
        raise SteerError(f"{name} of {replica} has no value of the script's own")
    return found


def after_switch(specs: dict[str, P.ParamSpec], changes: dict[str, Any], convert: bool):
    """The schema a change is checked against: the one it produces. `optimizer=KIND`
    (or unset: the script's own kind) brings the new kind's built-ins and takes away those
    it lacks, in the same change."""
    spec = specs.get("optimizer")
    if spec is None or "optimizer" not in changes:
        return specs
    kind = changes["optimizer"] if convert else spec.default  # unset: the script's own
    try:
        kind = P.parse(spec, kind) if isinstance(kind, str) else P.check(spec, kind)
    except P.ParamError as error:
        raise SteerError(str(error)) from None
    if kind not in BP.OPTIMIZER_BUILTINS:
        return specs
    has = BP.OPTIMIZER_BUILTINS[kind]
    after = {n: s for n, s in specs.items() if n not in BP.BUILTINS or n in has}
    after.update({n: BP.BUILTINS[n] for n in has if n not in after})
    for name in changes:
        if name in BP.BUILTINS and name not in has:
            raise SteerError(f"{kind} has no {name}: it goes with the switch to {kind}")
    return after


async def whole_process_groups(
    job: Job, targets: list[str], force: bool, schemas: dict[str, ReplicaSchema], fresh
) -> bool:
    """True when the change may go to each target at once; refuse part of a group.

    Ranks that train together take a change together (the workers agree in band on the
    step); a change to only some of them would make them differ, or hang a collective.
    `schemas` are the ones read last; `fresh()` reads them again (a cached one may be an
    earlier run's, or predate the group).
    """
    left_out = [r for r in job.replicas if r not in targets]
    if not left_out:  # every rank the broker knows; the schemas tell the group's size

        def size(found) -> int:
            return max((found[r].group_size for r in targets if r in found), default=1)

        if size(schemas) <= len(job.replicas):
            return False
        schemas = await fresh()  # a cached one may be an earlier run's
        if size(schemas) <= len(job.replicas):
            return False
        if not force:  # a node's record is not on the broker (yet)
            raise SteerError(
                f"{', '.join(targets)} train in one process group of {size(schemas)} ranks, "
                f"of which only {len(job.replicas)} are registered on the broker (a node "
                "not connected yet?): the change would wait for ranks it cannot reach; "
                "try again, or --force"
            )
        return True
    if not any(s.group_size > 1 for s in schemas.values()):
        schemas = await fresh()  # a cached schema may predate the group
    grouped = [r for r in targets if schemas.get(r) and schemas[r].group_size > 1]
    if not grouped:
        return False
    size = schemas[grouped[0]].group_size
    if not force:
        verb = "trains" if len(grouped) == 1 else "train"
        raise SteerError(
            f"{', '.join(grouped)} {verb} in one process group of {size} ranks with "
            f"{', '.join(left_out)}: changing only some ranks would make them differ "
            "(or hang their collectives); target all of them, or pass --force"
        )
    return True


def check_hold(changes: dict[str, Any]) -> None:
    """`--hold` keeps lr (lr.N) off the script's schedule; the other values are held
    exactly without it."""
    not_lr = [name for name in changes if name != "lr" and not name.startswith("lr.")]
    if not_lr:
        raise SteerError(
            f"--hold is for lr and lr.N (it keeps lr off the script's schedule); "
            f"{not_lr[0]} keeps exactly the value set without it"
        )
