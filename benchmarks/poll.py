"""Cost of the worker's step boundary when nothing changed, in nanoseconds per call.

Against, in the same run: an empty loop (the floor), and `multiprocessing.Queue.get_nowait()`
on an empty queue, which the original torchLoom design polled every step. Targets: the
boundary <= 0.3 us above the empty loop, and >= 20x cheaper than the queue.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import secrets
import time

from loomrun.mailbox import Mailbox, segment_path
from loomrun.runtime.optim import Optimizers
from loomrun.runtime.worker import Worker


def per_call_ns(fn, calls: int) -> float:
    started = time.perf_counter_ns()
    fn(calls)
    return (time.perf_counter_ns() - started) / calls


def torch_free_optimizer():
    """Something shaped like an optimizer, for the hook's identity check (no torch needed)."""
    return type("Optimizer", (), {"param_groups": [{"lr": 0.1}]})()


def empty_loop(calls: int) -> None:
    for _ in range(calls):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    mailbox = Mailbox.create(segment_path(f"bench-{secrets.token_hex(3)}", "r0"))
    try:
        worker = Worker(mailbox)
        optimizers = Optimizers(worker)
        primary = torch_free_optimizer()
        optimizers._meet(primary)
        q = multiprocessing.Queue()

        def boundary(calls: int) -> None:
            step = worker.boundary
            for _ in range(calls):
                step()

        def optimizer_hook(calls: int) -> None:
            hook = optimizers.pre_step
            for _ in range(calls):
                hook(primary, (), {})

        def queue_poll(calls: int) -> None:
            get = q.get_nowait
            for _ in range(calls):
                try:  # noqa: SIM105 - suppress() would add its own cost to the baseline
                    get()
                except queue.Empty:
                    pass

        best: dict[str, float] = {}
        cases = {"empty loop": empty_loop, "boundary": boundary, "optimizer hook": optimizer_hook}
        for _ in range(args.rounds):  # interleaved rounds, best of each: noise only adds time
            for name, fn in cases.items():
                best[name] = min(best.get(name, float("inf")), per_call_ns(fn, args.calls))
            queue_ns = per_call_ns(queue_poll, max(args.calls // 20, 1000))
            best["queue.get_nowait"] = min(best.get("queue.get_nowait", float("inf")), queue_ns)
        q.close()
    finally:
        mailbox.unlink()

    floor = best["empty loop"]
    for name, ns in best.items():
        print(f"{name:18s} {ns:8.1f} ns/call  ({ns - floor:7.1f} ns above the empty loop)")
    boundary_ns = best["boundary"] - floor
    hook_ns = best["optimizer hook"] - floor
    print(f"boundary cost      {boundary_ns / 1000:.3f} us  (target <= 0.3 us)")
    print(f"optimizer hook     {hook_ns / 1000:.3f} us")
    ratio = (best["queue.get_nowait"] - floor) / boundary_ns
    print(f"queue / boundary = {ratio:.0f}x (target >= 20x)")


if __name__ == "__main__":
    main()
