"""What the supervisor's records cost: the change ledger per change, the metric history per
status read, and the history's memory per replica at its limit.

Baselines from the same run: for the ledger, what the supervisor does with every outcome
anyway (publishing it on the outcomes subject); for the history, decoding the status it
comes from. Memory is traced with tracemalloc, for loss, lr and steps/s (3 columns) and for
the most columns a series keeps.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import tracemalloc
from pathlib import Path

from loomrun._proto import loomrun_pb2 as pb
from loomrun.control import history
from loomrun.control.ledger import Ledger
from loomrun.control.outbox import Outbox

ROUNDS = 7


def best_ns(fn, calls: int) -> float:
    """The best of ROUNDS, per call: `fn` returns the ns it measured itself, or None for
    its whole run."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter_ns()
        spent = fn(calls)
        best = min(best, (spent or time.perf_counter_ns() - started) / calls)
    return best


def outcome() -> pb.Outcome:
    change = pb.Outcome(name="lr", replica="r0", state=pb.APPLIED, step=1234, time=time.time(),
                        change_id="9f2c4e1a7b3d5e60", origin="user@host", revision=7)  # fmt: skip
    change.old.f, change.new.f = 0.1, 0.05
    return change


def ledger_figures(folder: Path) -> None:
    outbox = Outbox(link=None)
    ledger = Ledger("bench", outbox, [folder / "a", folder / "b"])
    change = outcome()
    rounds = iter(range(1 << 30))

    def changes(calls: int) -> list[pb.Outcome]:
        """Changes of their own (the ledger records a change id once per outcome)."""
        made = []
        for _ in range(calls):
            one = pb.Outcome()
            one.CopyFrom(change)
            one.change_id = f"{next(rounds):016x}"
            made.append(one)
        return made

    def record(calls: int) -> int:
        made = changes(calls)
        started = time.perf_counter_ns()
        for one in made:
            ledger.record(one)
        outbox._records.clear()
        return time.perf_counter_ns() - started

    def publish(calls: int) -> int:
        made = changes(calls)
        started = time.perf_counter_ns()
        for one in made:
            outbox.publish("loomrun.bench.outcomes.r0", one)
        outbox._messages.clear()
        return time.perf_counter_ns() - started

    base, cost = best_ns(publish, 2_000), best_ns(record, 2_000)
    ledger.close()
    print(
        f"ledger: {cost / 1000:.1f} us per change (broker + 2 files); publishing the outcome "
        f"{base / 1000:.1f} us; ratio {cost / base:.1f}"
    )


def status(step: int, columns: int) -> pb.Status:
    metrics = {"loss": 1.0 / step} | {f"m{i}": float(i) for i in range(columns - 3)}
    message = pb.Status(step=step, steps_per_sec=100.0, metrics=metrics, time=time.time())
    message.values["lr"].f = 0.01
    return message


def history_figures() -> None:
    statuses = [status(step, 3) for step in range(1, 20_001)]
    wire = [s.SerializeToString() for s in statuses]

    def add(calls: int) -> None:
        kept = history.History("bench", ["r0"], limit=history.POINTS)  # every point taken
        for s in statuses[:calls]:
            kept.add("r0", s)

    def decode(calls: int) -> None:
        for data in wire[:calls]:
            pb.Status.FromString(data)

    base, cost = best_ns(decode, 20_000), best_ns(add, 20_000)
    print(
        f"history: {cost / 1000:.2f} us per status read; decoding the status {base / 1000:.2f} "
        f"us; ratio {cost / base:.2f}"
    )
    for columns in (3, history.COLUMNS):
        tracemalloc.start()
        series = history.Series()
        for step in range(1, 4 * history.POINTS):
            series.add(step, float(step), history.status_values(status(step, columns)))
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"history memory: {size / 1024:.0f} KiB per replica at {len(series.steps)} points "
            f"(limit {history.POINTS}), {len(series.columns)} columns; "
            f"{64 * size / 2**20:.1f} MiB for 64 replicas"
        )


def main() -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())  # the outbox's wake-up event
    with tempfile.TemporaryDirectory() as folder:
        ledger_figures(Path(folder))
    history_figures()


if __name__ == "__main__":
    main()
