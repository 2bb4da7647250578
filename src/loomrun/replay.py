"""Replaying a steered run: the applied changes of a ledger, at the same steps.

The supervisor reads a record (`changes.jsonl`, or a job's own in the state directory),
keeps each replica's changes that were applied (with their kind: set, hold, unset) or
overridden at once (applied, and written over in that very step: replayed, the same
optimizer writes over them again); a later "overridden" record ends a change the record
has already, and pause, resume and save are left out: they change no parameter. A
rollback is replayed to a snapshot taken at the same step under the same name: the
record's own, or one taken for it when the run's was periodic) and hands each worker its
own schedule as a JSON file. The worker applies each
change at exactly its recorded step, before that step's optimizer step, and answers it like
any change, as asked by `replay`. Every rank applies what its own record says, at the
same steps, so a seeded run steered by hand runs again bitwise. Nothing is evaluated: the
record is JSON, and every value is checked against the parameter it goes to.
"""

from __future__ import annotations

import json
from pathlib import Path

from loomrun.broker.state import state_dir
from loomrun.outcomes import KIND_OF
from loomrun.records import job_dir, node_files
from loomrun.subjects import COPY, PAUSE, ROLLBACK, SAVE, SHARE, SNAPSHOT

ORIGIN = "replay"


class ReplayError(ValueError):
    """A record that cannot be replayed; one line for a person."""


def load(source: str) -> list[dict]:
    """The records of a ledger file, or of a job's ledger in the state directory (every
    node's file of it)."""
    paths = [Path(source)]
    if not paths[0].is_file():
        folder = job_dir(state_dir(), source)
        paths = [p for p in node_files(folder, "changes", ".jsonl") if p.is_file()]
        if not paths:
            raise ReplayError(f"'{source}' is neither a changes.jsonl file nor a job with one")
    return [item for path in paths for item in _records(path)]


def _records(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_text(errors="replace").splitlines()  # a line not JSON is said
    except OSError as error:
        raise ReplayError(f"cannot read {path}: {error.strerror}") from None
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
            records.append(
                {
                    "replica": str(item["replica"]),
                    "name": str(item["name"]),
                    "step": int(item["step"]),
                    "new": item["new"],
                    "outcome": str(item["outcome"]),
                    "change_id": str(item.get("change_id", "")),
                    "kind": str(item.get("kind") or "set"),
                    "revision": int(item.get("revision") or 0),
                    "ended": bool(item.get("ended", False)),
                    "parts": _parts(item.get("parts")),
                }
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
            raise ReplayError(f"{path}:{number} is not a change record") from None
    return records


def _parts(parts) -> dict | None:
    """A record's parts (a change of several parameters): name -> new value."""
    if parts is None:
        return None
    if not isinstance(parts, list) or not parts:
        raise TypeError("parts")
    found = {str(part["name"]): part["new"] for part in parts}
    if len(found) != len(parts):
        raise ValueError("a parameter twice")
    return found


def schedules(records: list[dict], replicas: list[str]) -> tuple[dict[str, list], list[str]]:
    """Each replica's applied changes, in step order, once each (a restarted worker answers
    its baseline again: the same change id); and the replicas the job does not have."""
    plans: dict[str, list] = {r: [] for r in replicas}
    missing, seen = [], set()
    for item in records:
        taken = item["outcome"] == "applied" or (
            item["outcome"] == "overridden" and not item["ended"]
        )
        if not taken or item["name"] in (PAUSE, SAVE, SHARE, COPY) or item["step"] < 1:
            continue
        if item["kind"] not in KIND_OF:
            raise ReplayError(f"the change of {item['name']} has an unknown kind {item['kind']!r}")
        values = item["parts"] or {item["name"]: item["new"]}
        if item["kind"] != "unset" and any(value is None for value in values.values()):
            raise ReplayError(f"the change of {item['name']} at step {item['step']} has no value")
        if (item["replica"], item["change_id"]) in seen:
            continue
        seen.add((item["replica"], item["change_id"]))
        if item["replica"] not in plans:
            if item["replica"] not in missing:
                missing.append(item["replica"])
            continue
        change = {"step": item["step"], "name": item["name"], "value": item["new"],
                  "change_id": item["change_id"], "kind": item["kind"],
                  "revision": item.get("revision", 0)}  # fmt: skip
        if item["parts"]:
            change["parts"] = item["parts"]  # applied together, at its step
        plans[item["replica"]].append(change)
    for plan in plans.values():
        plan[:0] = _snapshots_for(plan)
        # Changes of one step in the order the worker took them (by their revision, as
        # it orders them), not the order answered: a parked set is answered after its step.
        plan.sort(key=lambda change: (change["step"], change.get("revision", 0)))
    return plans, missing


def _snapshots_for(plan: list[dict]) -> list[dict]:
    """The snapshots the plan's rollbacks go to that it does not take itself (a periodic
    one, which no record holds): taken at the same step, under the same name."""
    taken = {
        (c["value"].get("name"), c["step"])
        for c in plan
        if c["name"] == SNAPSHOT and isinstance(c["value"], dict)
    }
    needed = []
    for change in plan:
        value = change["value"]
        if change["name"] != ROLLBACK or not isinstance(value, dict):
            continue
        name, step = value.get("name"), value.get("step")
        if not isinstance(name, str) or not isinstance(step, int) or (name, step) in taken:
            continue
        taken.add((name, step))
        needed.append({"step": step, "name": SNAPSHOT, "value": {"name": name},
                       "change_id": f"replay-{name}-{step}", "kind": "set"})  # fmt: skip
    return needed
