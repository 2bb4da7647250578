"""The protocol's answers: their words, how one is made, and how one reads.

Every answer to a change is made by `answer` (the worker's, the relay's refusal, the pump's
and the client's "superseded"), so that it always carries its change's id, origin, revision
and kind. `sentence` is its one rendering: `set`, events, `watch` and the page all show it."""

from __future__ import annotations

import time
from typing import Any

from loomrun._proto import loomrun_pb2 as pb
from loomrun.subjects import ACTIONS, PAUSE, SNAPSHOT_EVERY

STATES = {
    pb.APPLIED: "applied",
    pb.REJECTED: "rejected",
    pb.MISSED: "missed",
    pb.SUPERSEDED: "superseded",
    pb.OVERRIDDEN: "overridden",
    pb.FIRED: "fired",
}
# Why a change is superseded when the replica never read it: a later change to one of its
# keys came first (the client knows it when that change was applied; the supervisor, for a
# change of several keys, when one of them moved on before the rest came).
OVERTAKEN = "a later change to it reached the replica first"
# A rule's arithmetic on the value in effect (scale, shift) is replayed as the set of the
# value it came to (its record's `new`).
KINDS = {pb.SET: "set", pb.HOLD: "hold", pb.UNSET: "unset", pb.SCALE: "scale", pb.SHIFT: "shift"}
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
    outcome.new.CopyFrom(asked(want, name))
    return outcome


def asked(want: pb.DesiredParam, name: str) -> pb.Value:
    """What a change asks, as its answer says it until applied: the value; for arithmetic
    on the value in effect (a rule's), the text of it (`lr*0.5`), never the bare factor."""
    if want.kind in (pb.SCALE, pb.SHIFT) and want.value.WhichOneof("kind") == "f":
        by = want.value.f
        text = f"{name}*{by:g}" if want.kind == pb.SCALE else f"{name}{by:+g}"
        return pb.Value(s=text)
    return want.value


def answer_change(
    parts: dict[str, pb.DesiredParam], state: int, step: int = 0, reason: str = "",
    replica: str = "",
) -> pb.Outcome:  # fmt: skip
    """The one answer to a change of one or several parameters (`parts`: name -> its key's
    entry, all of one change id): `answer` of the first by name, and every part's asked
    value when there are several."""
    names = sorted(parts)
    outcome = answer(parts[names[0]], names[0], state, step, reason, replica)
    if len(names) > 1:
        for name in names:
            part = outcome.parts.add(name=name)
            if parts[name].HasField("value"):
                part.new.CopyFrom(asked(parts[name], name))
    return outcome


def names_of(outcome: pb.Outcome) -> list[str]:
    """The parameters an answer is about: its parts', or its one name."""
    return [part.name for part in outcome.parts] or [outcome.name]


def part_of(outcome: pb.Outcome, name: str) -> pb.Outcome:
    """The answer as one of its parameters sees it (for `get`'s latest answer per
    parameter): that part's name, old and new value; applied, when the change is
    overridden for another part only."""
    view = pb.Outcome()
    view.CopyFrom(outcome)
    view.ClearField("parts")
    for part in outcome.parts:
        if part.name == name:
            if outcome.state == pb.OVERRIDDEN and not part.overridden and not outcome.ended:
                view.state, view.reason = pb.APPLIED, ""
            view.name = name
            view.ClearField("old")
            view.ClearField("new")
            if part.HasField("old"):
                view.old.CopyFrom(part.old)
            if part.HasField("new"):
                view.new.CopyFrom(part.new)
    return view


def sentence(
    name: str, state: str, *, old: Any = None, new: Any = None, step: int = 0,
    reason: str = "", kind: str = "set", replica: str = "",
    parts: list[tuple[str, Any, Any]] | None = None,
) -> str:  # fmt: skip
    """One answer in words, as every view shows it: `lr 0.1 -> 0.05 at step 12`. A change
    of several parameters (`parts`: name, old, new) is one sentence too:
    `lr 0.1 -> 0.05, momentum 0.9 -> 0.8 at step 12`."""
    from loomrun.params import format_value as shown

    if state == "fired":  # a rule's: `name` is the rule's, `reason` what met it
        return f"rule {name} fired at step {step}: {reason}"
    if (name in ACTIONS or name == SNAPSHOT_EVERY) and not parts:
        return action_sentence(name, state, old, new, step, reason, replica)
    parts = parts or [(name, old, new)]
    names = ", ".join(n for n, _, _ in parts)
    asked = " ".join(f"{n}={shown(v)}" for n, _, v in parts)
    if state == "applied" and name == PAUSE:
        return f"{'paused' if new else 'resumed'} at step {step}"
    if state == "applied":
        how = {"hold": " (held)", "unset": " (the script's)"}.get(kind, "")
        moves = ", ".join(f"{n} {shown(o)} -> {shown(v)}" for n, o, v in parts)
        said = f"{moves}{how} at step {step}"
        return f"{said} ({reason})" if reason else said  # what is in effect, when not `new`
    if state == "overridden":
        return f"{names} overridden at step {step}, not in effect: {reason}"
    if state == "rejected":
        return f"{asked} rejected: {reason}" + (f" (at step {step})" if step else "")
    if state == "missed":
        return f"{asked} not applied: {reason}"
    if state == "superseded":
        them = name if len(parts) == 1 else "one of them"
        return f"{asked} not applied: a later change to {them} reached {replica} first"
    if state == "not running":
        return f"{names} not sent: {reason}"
    return f"{names} no answer yet: still desired, it applies when the replica gets to it"


def size_words(nbytes: float) -> str:
    """`40.1 MB`: a size as people read it (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def action_sentence(
    name: str, state: str, old: Any, new: Any, step: int, reason: str, replica: str
) -> str:
    """An action's answer in words: `snapshot a taken at step 120: 40.1 MB in 35 ms`."""
    done = new if isinstance(new, dict) else {}
    label = done.get("name") or done.get("dir") or ""
    took = f" in {_ms(done['seconds'])}" if isinstance(done.get("seconds"), float) else ""
    size = size_words(done["bytes"]) if isinstance(done.get("bytes"), int) else ""
    note = f" ({reason})" if reason else ""
    if state == "applied":
        if name == SNAPSHOT_EVERY:
            every, keep = done.get("every"), done.get("keep")
            if not every:
                return f"periodic snapshots off from step {step}"
            return f"a snapshot every {every} steps from step {step}, the last {keep} kept"
        if name == "rollback":
            return (
                f"rolled back to snapshot {label} (taken at step {done.get('step')}) at step "
                f"{step}{took}{note}"
            )
        if name == "save":
            size = f": {size}" if size else ""
            return f"saved {done.get('file', label)} at step {step}{size}{took}{note}"
        if name == "share":
            return (
                f"state shared for {done.get('target')} at step {step}: {size}{took} "
                f"(through {'the object store' if done.get('via') == 'store' else 'shm'}){note}"
            )
        if name == "copy":
            return (
                f"copied {done.get('from')}'s state of step {done.get('step')} at step "
                f"{step}: {size}{took}{note}"
            )
        return f"snapshot {label} taken at step {step}: {size}{took}{note}"
    what = {
        "snapshot": f"snapshot {label}".rstrip(),
        "rollback": f"rollback to {label or _before(done)}",
        "save": f"save to {label}",
        SNAPSHOT_EVERY: "periodic snapshots",
        "share": f"share of the state for {done.get('target', '?')}",
        "copy": f"copy from {done.get('from', '?')}",
    }[name]
    if state == "rejected":
        return f"{what} refused: {reason}" + (f" (at step {step})" if step else "")
    if state in ("missed", "not running"):
        return f"{what} not done: {reason}"
    if state == "superseded":
        return f"{what} not done: a later {name} reached {replica} first"
    return f"{what}: no answer yet: still desired, it is done when the replica gets to it"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def _before(asked: dict) -> str:
    before = asked.get("before")
    return f"the newest snapshot before step {before}" if before else "the newest snapshot"


def outcome_sentence(outcome: pb.Outcome) -> str:
    """`sentence` of an answer as it comes off the wire."""
    from loomrun.params import from_field, from_pb

    parts = [(p.name, from_field(p, "old"), from_field(p, "new")) for p in outcome.parts]
    in_effect = ""
    if outcome.state == pb.OVERRIDDEN and any(p.overridden for p in outcome.parts):
        others = [p.name for p in outcome.parts if not p.overridden]
        in_effect = f" ({', '.join(others)} in effect)" if others else ""
        parts = [t for t, p in zip(parts, outcome.parts, strict=True) if p.overridden]
    said = sentence(
        outcome.name, state_word(outcome), step=outcome.step, reason=outcome.reason,
        old=from_field(outcome, "old"), new=from_pb(outcome.new), kind=kind_word(outcome.kind),
        replica=outcome.replica, parts=parts or None,
    )  # fmt: skip
    return said + in_effect
