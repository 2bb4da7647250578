"""Snapshots, rollback and save: the actions a worker takes at one step on its training
state (runtime.trainstate), and the periodic snapshots of `--every`.

Each action is a change like any other: it comes through the desired state under its own
name (`snapshot`, `rollback`, `save`), the ranks of a group take it at one agreed step, and
it gets one answer, which says what was done (the size and the time it took). It is done
once: it is never "in effect", and a restarted worker does not do it again.

Snapshots live in host memory, in the worker process: a restart loses them. A named one
stays until a snapshot of the same name replaces it, or the memory budget needs its room.
The periodic ones (`--every N --keep K`) roll: the last K are kept. The budget
(LOOMRUN_SNAPSHOT_MEMORY: bytes, or with a K/M/G/T suffix; by default a quarter of the
host's memory, shared by the ranks on it) drops the oldest periodic snapshots first, then
the oldest named ones, and the answer of the snapshot that needed the room names them.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.outcomes import answer_change, size_words
from loomrun.runtime.change import lead
from loomrun.subjects import COPY, ROLLBACK, SAVE, SHARE, SNAPSHOT, SNAPSHOT_EVERY
from loomrun.subjects import SNAPSHOT_NAME as NAME

KEEP = 2  # periodic snapshots kept, unless told
MOST = 100  # snapshots kept at most, whatever their size (each is listed in every status)
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """`8G`, `512MiB`, `1000000`: a size in bytes (a suffix counts in 1024s)."""
    found = _SIZE.fullmatch(text)
    if found is None:
        raise ValueError(f"{text!r} is not a size (like 8G, 512M or 1000000)")
    number, unit = float(found.group(1)), found.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


def memory_budget() -> tuple[int, str, str]:
    """The bytes snapshots may take on this worker, where that figure comes from, and
    what was wrong with LOOMRUN_SNAPSHOT_MEMORY ("" when nothing)."""
    text, problem = os.environ.get("LOOMRUN_SNAPSHOT_MEMORY", ""), ""
    if text:
        try:
            return parse_bytes(text), "LOOMRUN_SNAPSHOT_MEMORY", ""
        except ValueError as error:
            problem = f"LOOMRUN_SNAPSHOT_MEMORY: {error}; a quarter of the host's memory instead"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    ranks = max(1, _int_env("LOCAL_WORLD_SIZE", 1))
    return total // 4 // ranks, "a quarter of the host's memory (LOOMRUN_SNAPSHOT_MEMORY)", problem


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Snapshot:
    name: str
    step: int
    periodic: bool
    time: float
    seconds: float
    content: Any  # trainstate.Captured

    def info(self) -> pb.SnapshotInfo:
        return pb.SnapshotInfo(
            name=self.name, step=self.step, bytes=self.content.nbytes,
            periodic=self.periodic, time=self.time, seconds=self.seconds,
        )  # fmt: skip


class ActionError(Exception):
    """An action refused; its one line is the answer's reason."""


class Snapshots:
    """A worker's snapshots and the actions on its training state. Owned by the Worker,
    which hands it the actions' changes (`act`) and calls `due` at each boundary where a
    periodic snapshot is due (its `next_due` is part of the boundary's one compare)."""

    def __init__(self, worker):
        from loomrun.runtime.trainstate import Finder

        self.worker = worker
        self.kept: list[Snapshot] = []  # oldest first
        self.finder = Finder()
        self.every = max(0, _int_env("LOOMRUN_SNAPSHOT_EVERY", 0))
        self.keep = max(1, _int_env("LOOMRUN_SNAPSHOT_KEEP", KEEP))
        self.next_due = self._after(0)
        self.optimizers = None  # runtime.optim.Optimizers, once torch is hooked
        self.saver = None  # (path) -> None: a framework's own checkpoint (Lightning's)

    def _after(self, step: int) -> float:
        """The first step past `step` a periodic snapshot is due at (a multiple of every)."""
        return (step // self.every + 1) * self.every if self.every else math.inf

    # -- at a boundary ---------------------------------------------------------------

    def due(self, step: int) -> None:
        """A periodic snapshot, at a multiple of `every` (the same steps on every rank)."""
        self.next_due = self._after(step)
        name = f"step-{step}"
        if any(s.name == name and not s.periodic for s in self.kept):
            self.worker.warn_once(f"no periodic snapshot at step {step}: {name} is one's own name")
            return
        try:
            self._take(name, step, periodic=True)
        except Exception as error:  # noqa: BLE001 - never the script's step
            said = str(error) if isinstance(error, ActionError) else repr(error)
            self.worker.warn_once(f"no periodic snapshot: {said}")

    # -- the actions -------------------------------------------------------------------

    def act(self, parts: dict[str, pb.DesiredParam], step: int) -> pb.Outcome:
        """Do one action's change (or set the periodic snapshots); its answer."""
        name, want = lead(parts)
        outcome = answer_change(parts, pb.REJECTED, step)
        try:
            if len(parts) > 1:
                raise ActionError(f"{name} is a change of its own, not one of several keys")
            value = P.from_pb(want.value)
            if not isinstance(value, dict):
                raise ActionError(f"{name} takes a structured value, not {value!r}")
            together = self._together(want)
            if name == ROLLBACK and self.worker.group is not None and want.at_once:
                raise ActionError(  # (a replay's: each rank its own record, at its step)
                    "a rollback of some ranks of a process group only would leave them "
                    "different: roll back the whole group, without --force"
                )
            done, old = {
                SNAPSHOT: self._snapshot, ROLLBACK: self._rollback, SAVE: self._save,
                SNAPSHOT_EVERY: self._every, SHARE: self._share, COPY: self._copy,
            }[name](value, step, together)  # fmt: skip
        except ActionError as error:
            outcome.reason = str(error)
            return outcome
        except Exception as error:  # noqa: BLE001 - an action never breaks the script's step
            outcome.reason = f"{name} failed: {type(error).__name__}: {error}"
            return outcome
        outcome.state = pb.APPLIED
        outcome.reason = done.pop("note", "")
        outcome.new.CopyFrom(P.to_pb(done))
        if old is not None:
            outcome.old.CopyFrom(P.to_pb(old))
        return outcome

    def _together(self, want: pb.DesiredParam):
        """The process group when the ranks take this change at one step together (they
        can check with each other then), else None."""
        group = self.worker.group
        if group is None or want.at_once or want.origin == "replay":
            return None
        return group

    def _snapshot(self, value: dict, step: int, together) -> tuple[dict, None]:
        name = text(value, "name") or f"step-{step}"
        if not NAME.fullmatch(name):
            raise ActionError(f"{name!r} cannot name a snapshot (letters, digits, _ . -)")
        taken, dropped = self._take(name, step, periodic=False)
        done = {"name": name, "step": step, "bytes": taken.content.nbytes,
                "seconds": round(taken.seconds, 6)}  # fmt: skip
        others = [d for d in dropped if d != name]
        if others:
            done["note"] = f"dropped {', '.join(others)} to stay within the memory budget"
        return done, None

    def _take(self, name: str, step: int, periodic: bool) -> tuple[Snapshot, list[str]]:
        from loomrun.runtime.trainstate import capture

        started = time.perf_counter()
        found = self.found()
        dropped = self._room(found.nbytes(), name, periodic)
        try:
            content = capture(found, self.steered())
        except Exception as error:  # noqa: BLE001 - said in the answer
            gone = f" (dropped {', '.join(dropped)} first, to make room)" if dropped else ""
            raise ActionError(f"cannot take it: {type(error).__name__}: {error}{gone}") from None
        taken = Snapshot(name, step, periodic, time.time(), time.perf_counter() - started, content)
        self.kept.append(taken)
        return taken, dropped

    def _share(self, value: dict, step: int, together) -> tuple[dict, None]:
        from loomrun.runtime.statecopy import share_action

        return share_action(self, value, step), None

    def _copy(self, value: dict, step: int, together) -> tuple[dict, None]:
        from loomrun.runtime.statecopy import copy_action

        return copy_action(self, value, step), None

    def found(self):
        """The objects of this replica's training state (ActionError when none yet)."""
        optimizers = self.optimizers.optimizers if self.optimizers is not None else []
        schedulers = self.optimizers.schedulers if self.optimizers is not None else ()
        if not optimizers and not self.finder.tracked:
            raise ActionError(
                "nothing to take yet: no torch optimizer has stepped in this replica, and "
                "nothing was given to loomrun.track"
            )
        return self.finder.find(optimizers, schedulers)

    def steered(self):
        return self.optimizers.steered if self.optimizers is not None else None

    def _room(self, need: int, name: str, periodic: bool) -> list[str]:
        """Drop what must go for a snapshot of `need` bytes: one of the same name, the
        periodic ones past `keep`, then the oldest (periodic first) while over budget or
        over MOST snapshots.
        Returns the names dropped (the one of the same name too: it is said if the new
        one then fails)."""
        budget, source, problem = memory_budget()
        if problem:
            self.worker.warn_once(problem)
        if need > budget:
            raise ActionError(
                f"a snapshot takes {size_words(need)} here, more than the budget of "
                f"{size_words(budget)} ({source})"
            )
        dropped = [s.name for s in self.kept if s.name == name and not periodic]
        self.kept = [s for s in self.kept if s.name != name]
        rolling = [s for s in self.kept if s.periodic]
        if periodic and len(rolling) >= self.keep:
            for gone in rolling[: len(rolling) - self.keep + 1]:
                self.kept.remove(gone)
        while self.kept and (
            sum(s.content.nbytes for s in self.kept) + need > budget or len(self.kept) >= MOST
        ):
            gone = next((s for s in self.kept if s.periodic), self.kept[0])
            if periodic and not gone.periodic:  # a periodic one never takes a named one's room
                raise ActionError(
                    "the named snapshots fill the memory budget (or the 100 kept): drop one "
                    "by taking another of its name, or raise LOOMRUN_SNAPSHOT_MEMORY"
                )
            self.kept.remove(gone)
            dropped.append(gone.name)
        return dropped

    def choose(self, name: str, before: int, step: int) -> Snapshot:
        """The snapshot a rollback goes to: by name; else the newest taken before step
        `before` (when > 0); else the newest. Not by name, never one of this very `step`
        (a periodic one taken at this boundary holds what is to be thrown away)."""
        if not self.kept:
            raise ActionError(
                "this replica has no snapshot (take one with `loomrun snapshot`, or launch with "
                "--snapshot-every N; a restart loses them)"
            )
        if name:
            found = [s for s in self.kept if s.name == name]
            if not found:
                have = ", ".join(s.name for s in self.kept)
                raise ActionError(f"this replica has no snapshot named {name!r} (it has: {have})")
            return found[-1]
        limit = min(before, step) if before > 0 else step
        found = [s for s in self.kept if s.step < limit]
        if not found:
            oldest = min(self.kept, key=lambda s: s.step)
            raise ActionError(
                f"this replica has no snapshot taken before step {limit} (the oldest is "
                f"{oldest.name}, at step {oldest.step})"
            )
        return max(found, key=lambda s: (s.step, s.time))

    def _rollback(self, value: dict, step: int, together) -> tuple[dict, dict]:
        """Back to a snapshot. In a group every rank first says which snapshot it would
        restore (or that it cannot), in one collective every rank reaches whatever it
        found: none restores unless all go to the same one. A second says whether each
        restored it whole."""
        from loomrun.runtime.trainstate import StateError, check, restore

        before = value.get("before", 0)
        if not isinstance(before, int) or isinstance(before, bool) or before < 0:
            raise ActionError(f"before must be a step number, not {before!r}")
        name, problem, chosen = text(value, "name"), "", None
        try:
            chosen = self.choose(name, before, step)
            check(chosen.content)
        except Exception as error:  # noqa: BLE001 - said at the collective, which all reach
            if isinstance(error, ActionError):
                problem = str(error)
            elif isinstance(error, StateError):
                problem = f"cannot roll back: {error}"
            else:
                problem = f"cannot roll back: {type(error).__name__}: {error}"
        if together is not None:
            said = "" if problem else f"{chosen.name}@{chosen.step}"
            if not together.alike(said) and not problem:
                problem = (
                    f"the ranks do not all hold snapshot {chosen.name} of step {chosen.step}, "
                    "or cannot all restore it: no rank rolled back"
                )
        if problem:
            raise ActionError(problem)
        started = time.perf_counter()
        failed: Exception | None = None
        live = [ref() for ref, _ in chosen.content.schedulers]
        counts = {id(s): getattr(s, "last_epoch", None) for s in live if s is not None}
        try:
            now = self.optimizers.optimizers if self.optimizers is not None else []
            notes, restored = restore(chosen.content, self.steered(), now)
        except Exception as error:  # noqa: BLE001 - said in the answer, and to the other ranks
            failed, notes, restored = error, [], []
        whole = together.alike("whole" if failed is None else "") if together else True
        if failed is not None:
            raise ActionError(
                f"the rollback to {chosen.name} failed part-way ({type(failed).__name__}: "
                f"{failed}): this replica's state is now partly the snapshot's"
            )
        skips = {}  # each scheduler restored skips as many as it took per step since
        for scheduler in restored:
            now, then = counts.get(id(scheduler)), getattr(scheduler, "last_epoch", None)
            if isinstance(now, int) and isinstance(then, int) and step > chosen.step:
                skips[id(scheduler)] = round((now - then) / (step - chosen.step))
        self.skip(restored, skips)
        seconds = time.perf_counter() - started
        done = {"name": chosen.name, "step": chosen.step, "seconds": round(seconds, 6)}
        if not whole:
            notes.append("another rank's rollback failed part-way: the ranks now differ")
        if notes:
            done["note"] = "; ".join(notes)
        return done, {"step": step}

    def skip(self, restored: list, counts: dict[int, int]) -> None:
        """At the boundary inside an optimizer step, the state was just put back: that
        step is a no-op (the gradients are None), and each scheduler restored skips the
        steps the script takes of it in one step (`counts` by id; one when not known)."""
        if not self.worker.explicit_steps and self.optimizers is not None:
            self.optimizers.skip_next_step(restored, counts)

    def _save(self, value: dict, step: int, together) -> tuple[dict, None]:
        from loomrun.runtime.trainstate import write_checkpoint

        folder = text(value, "dir").replace("{step}", str(step))
        if not folder or not os.path.isabs(folder):
            raise ActionError(f"save needs an absolute folder, not {folder!r}")
        replica = os.environ.get("LOOMRUN_REPLICA", "r0")
        started = time.perf_counter()
        group = self.worker.group
        if self.saver is not None and group is not None and together is None:
            raise ActionError(  # the trainer's save is a collective of the whole group
                "a Lightning save of some ranks of a process group only would hang the "
                "others: save every rank of the group, without --force"
            )
        if self.saver is not None:  # the trainer's: one file for a group, written by rank 0
            path = Path(folder) / ("checkpoint.ckpt" if group is not None else f"{replica}.ckpt")
            self.saver(str(path))
        else:
            path = Path(folder) / f"{replica}.pt"
            write_checkpoint(path, self._checkpoint(step, replica))  # trainstate
        seconds = time.perf_counter() - started
        done = {"dir": folder, "file": str(path), "seconds": round(seconds, 6)}
        if self.saver is not None and group is not None and group.rank != 0:
            done["note"] = "written by rank 0 of the group, on its host"
        else:
            done["bytes"] = path.stat().st_size
        return done, None

    def _checkpoint(self, step: int, replica: str) -> dict:
        from loomrun.runtime.trainstate import checkpoint

        data = checkpoint(self.found())
        group = self.worker.group
        data.update(
            format="loomrun-checkpoint/1", step=step, replica=replica, time=time.time(),
            rank=group.rank if group is not None else 0,
            world_size=group.size if group is not None else 1,
            values=self._values(),
        )  # fmt: skip
        return data

    def _values(self) -> dict[str, Any]:
        """The value in effect of each parameter, as a checkpoint keeps it (plain types)."""
        values = {}
        for name, target in self.worker.targets.items():
            try:
                values[name] = P.from_pb(P.to_pb(target.get()))  # an Enum as its text
            except Exception:  # noqa: BLE001 - one that cannot be read is left out
                continue
        return values

    def _every(self, value: dict, step: int, together) -> tuple[dict, dict]:
        every, keep = value.get("every", 0), value.get("keep", self.keep)
        for key, number in (("every", every), ("keep", keep)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise ActionError(f"{key} must be a whole number, not {number!r}")
        if not 1 <= keep <= MOST:
            raise ActionError(f"keep must be 1 to {MOST}, not {keep}")
        old = {"every": self.every, "keep": self.keep}
        self.every, self.keep = every, keep
        self.next_due = self._after(step)
        rolling = [s for s in self.kept if s.periodic]
        for gone in rolling[: max(0, len(rolling) - keep)]:
            self.kept.remove(gone)
        return {"every": every, "keep": keep}, old

    def infos(self) -> list[pb.SnapshotInfo]:
        return [s.info() for s in self.kept]


def text(value: dict, key: str) -> str:
    found = value.get(key, "")
    if not isinstance(found, str):
        raise ActionError(f"{key} must be text, not {found!r}")
    return found
