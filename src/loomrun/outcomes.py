"""The protocol's answers: their words, how one is made, and how one reads.

Every answer to a change is made by `answer` (the worker's, the relay's refusal, the pump's
and the client's "superseded"), so that it always carries its change's id, origin, revision
and kind. `sentence` is its one rendering: `set`, events, `watch` and the page all show it."""

from __future__ import annotations

import time
from typing import Any

from loomrun._proto import loomrun_pb2 as pb
from loomrun.subjects import PAUSE

STATES = {
    pb.APPLIED: "applied",
    pb.REJECTED: "rejected",
    pb.MISSED: "missed",
    pb.SUPERSEDED: "superseded",
    pb.OVERRIDDEN: "overridden",
}
KINDS = {pb.SET: "set", pb.HOLD: "hold", pb.UNSET: "unset"}
KIND_OF = {word: kind for kind, word in KINDS.items()}


def state_word(outcome: pb.Outcome) -> str:
    return STATES.get(outcome.state, "rejected")


def kind_word(kind: int) -> str:
    return KINDS.get(kind, "set")


def answer(
    want: pb.DesiredParam, name: str, state: int, step: int = 0, reason: str = "",
    replica: str = "",
) -> pb.Outcome:  # fmt: skip
    """The answer to the change `want`: its id, origin, revision, kind and asked value
    carried over, so that it can only ever be taken for that change's."""
    outcome = pb.Outcome(
        name=name,
        version=want.version,
        state=state,
        step=step,
        time=time.time(),
        change_id=want.change_id,
        origin=want.origin,
        revision=want.revision,
        kind=want.kind,
        reason=reason,
        replica=replica,
    )
    if want.HasField("value"):
        outcome.new.CopyFrom(want.value)
    return outcome


def sentence(
    name: str, state: str, *, old: Any = None, new: Any = None, step: int = 0,
    reason: str = "", kind: str = "set", replica: str = "",
) -> str:  # fmt: skip
    """One answer in words, as every view shows it: `lr 0.1 -> 0.05 at step 12`."""
    from loomrun.params import format_value as shown

    if state == "applied" and name == PAUSE:
        return f"{'paused' if new else 'resumed'} at step {step}"
    if state == "applied":
        how = {"hold": " (held)", "unset": " (the script's)"}.get(kind, "")
        said = f"{name} {shown(old)} -> {shown(new)}{how} at step {step}"
        return f"{said} ({reason})" if reason else said  # what is in effect, when not `new`
    if state == "overridden":
        return f"{name} overridden at step {step}, not in effect: {reason}"
    if state == "rejected":
        return f"{name}={shown(new)} rejected: {reason}" + (f" (at step {step})" if step else "")
    if state == "missed":
        return f"{name}={shown(new)} not applied: {reason}"
    if state == "superseded":
        return f"{name}={shown(new)} not applied: a later change to {name} reached {replica} first"
    if state == "not running":
        return f"{name} not sent: {reason}"
    return f"{name} no answer yet: still desired, it applies when the replica gets to it"


def outcome_sentence(outcome: pb.Outcome) -> str:
    """`sentence` of an answer as it comes off the wire."""
    from loomrun.params import from_pb

    return sentence(
        outcome.name, state_word(outcome), step=outcome.step, reason=outcome.reason,
        old=from_pb(outcome.old) if outcome.HasField("old") else None, new=from_pb(outcome.new),
        kind=kind_word(outcome.kind), replica=outcome.replica,
    )  # fmt: skip
