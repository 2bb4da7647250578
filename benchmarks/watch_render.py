"""Cost of `loomrun watch` with 64 replicas: taking status messages, and drawing a frame.

Against, in the same run: the same work for 2 replicas. The view draws at most 4 frames a
second whatever the message rate, so a frame's cost over its 250 ms budget is the figure
that says whether it stays smooth; ingest is per message. A frame that costs more is paced
by `watch` itself (DRAW_SHARE), so drawing never takes more than a quarter of a core.
"""

from __future__ import annotations

import argparse
import io
import time

from rich.console import Console

from loomrun._proto import loomrun_pb2 as pb
from loomrun.watch import DRAW_SHARE, WatchModel, render_rich

FRAME_BUDGET = 0.25


def model_with(replicas: int, now: float) -> tuple[WatchModel, list[tuple[str, bytes]]]:
    model = WatchModel()
    info = pb.JobInfo(job="bench", host="h", started=now - 60, heartbeat=now, script="train.py")
    info.replicas.extend(f"r{i}" for i in range(replicas))
    model.take_job("bench.n0", info.SerializeToString())
    messages = []
    for i in range(replicas):
        status = pb.ReplicaStatus(
            job="bench", replica=f"r{i}", host="h", state=pb.RUNNING, time=now
        )
        status.status.step = 1000 + i
        status.status.steps_per_sec = 100.0
        status.status.metrics.update(loss=0.1 + i / 1000, acc=0.9, grad_norm=1.5)
        status.status.values["lr"].f = 0.001
        messages.append((f"bench.r{i}", status.SerializeToString()))
    for key, data in messages:
        model.take_status(key, data)
    return model, messages


def measure(replicas: int, frames: int, messages: int, width: int) -> tuple[float, float]:
    now = time.time()
    model, updates = model_with(replicas, now)
    console = Console(
        file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor"
    )
    started = time.perf_counter()
    for i in range(messages):
        key, data = updates[i % len(updates)]
        model.take_status(key, data)
    ingest = (time.perf_counter() - started) / messages
    started = time.perf_counter()
    for _ in range(frames):
        console.print(render_rich(model.snapshot(now), width))
    frame = (time.perf_counter() - started) / frames
    return ingest, frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args()
    for width in (200, 80):
        small = measure(2, args.frames, args.messages, width)
        large = measure(64, args.frames, args.messages, width)
        print(f"{width} columns:")
        for name, (ingest, frame) in (("2 replicas", small), ("64 replicas", large)):
            print(
                f"  {name:12s} ingest {ingest * 1e6:6.1f} us/message   frame "
                f"{frame * 1000:7.2f} ms (target at 64: < 25 ms)"
            )
        print(f"  64 / 2 replicas frame cost = {large[1] / small[1]:.1f}x")
        for name, (_, frame) in (("2 replicas", small), ("64 replicas", large)):
            period = max(FRAME_BUDGET, DRAW_SHARE * frame)  # how watch paces its frames
            print(
                f"  {name:12s} live view: {1 / period:.1f} frames/s, {frame / period:.0%} of a core"
            )
    print(f"64 replicas at 4 status/s each: {256 * large[0] * 100:.2f}% of a core to take in")


if __name__ == "__main__":
    main()
