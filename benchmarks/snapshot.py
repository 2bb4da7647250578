"""Snapshot, rollback and save of a ~10 M-parameter model (AdamW, CPU), as users ask for
them: through the Python API (`Steering.act`, what `loomrun snapshot`, `rollback` and
`save` call), against a job that trains under loomrun.

Each figure is the worker's own time for the action (from its answer), and the request's
whole time (issue to acknowledged answer). The baselines, measured in this process in the
same run on the same model and optimizer state: copying the same tensors to new host
tensors (`clone`), copying them back (`copy_`), and `torch.save` of the model's and the
optimizer's state_dicts to a file, flushed to disk (`save`). The memory figure is the
snapshot's size against the bytes of the state, and the worker's resident memory before
the first snapshot, after it, and after the last (each replaces the one before: what
glibc keeps of the memory freed shows there). The step
boundary when no snapshot is asked for is `poll.py`'s figure (the boundary's code is the
same, whether or not snapshots are taken now and then).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loomrun.broker.bundled import BundledBroker
from loomrun.broker.connect import BrokerOptions
from loomrun.client import Steering
from loomrun.launch import free_port

HERE = Path(__file__).resolve().parent
LOOMRUN = str(Path(sys.executable).parent / "loomrun")
JOB = f"snapshot-{os.getpid()}"
WIDTH, DEPTH = 1024, 9  # 9 layers of 1024 x 1024: 9.4 M parameters


def model_and_optimizer():
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, WIDTH)).sum().backward()
    optimizer.step()
    return model, optimizer


WORKER = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from snapshot import model_and_optimizer
model, optimizer = model_and_optimizer()
x = torch.randn(8, 1024)
while True:
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    time.sleep(0.005)
"""


def baselines(rounds: int, folder: str) -> dict[str, float]:
    """Median seconds of the plain-torch equivalents, on the same state (the save: to a
    file in the same folder, flushed to disk, as a checkpoint must be)."""
    import torch

    model, optimizer = model_and_optimizer()
    tensors = [*model.parameters()] + [
        v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    ]
    clones, back, saves = [], [], []
    for _ in range(rounds):
        copies = None  # as a snapshot replaced: the old copy goes first
        started = time.perf_counter()
        copies = [t.detach().clone() for t in tensors]
        clones.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            for t, c in zip(tensors, copies, strict=True):
                t.copy_(c)
        back.append(time.perf_counter() - started)
        started = time.perf_counter()
        with open(os.path.join(folder, "plain.pt"), "wb") as out:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out)
            out.flush()
            os.fsync(out.fileno())
        saves.append(time.perf_counter() - started)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    params = sum(p.numel() for p in model.parameters())
    return {
        "clone": statistics.median(clones), "copy_": statistics.median(back),
        "save": statistics.median(saves), "bytes": nbytes, "params": params,
    }  # fmt: skip


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def measure(options: BrokerOptions, rounds: int, folder: str) -> dict[str, list]:
    out: dict[str, list] = {}
    async with Steering.connect(options) as steering:
        for _ in range(100):
            try:
                if "lr" in (await steering.schemas(JOB)).get("r0", ()).specs:
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.sleep(0.2)
        pid = (await steering.statuses(JOB))["r0"].pid
        before = rss(pid)
        for action, value in (
            ("snapshot", {"name": "bench"}),
            ("rollback", {"name": "bench"}),
            ("save", {"dir": folder}),
        ):
            for _ in range(rounds):
                started = time.perf_counter()
                (result,) = await steering.act(JOB, action, value, timeout=60)
                whole = time.perf_counter() - started
                if result.state != "applied" or result.outcome.change_id != result.change_id:
                    raise SystemExit(f"{action} was {result.state}: {result.sentence()}")
                done = result.as_dict()["new"]
                out.setdefault(action, []).append((done["seconds"], whole, done.get("bytes", 0)))
                if action == "snapshot":
                    out.setdefault("rss", [before]).append(rss(pid))
    return out


def on_a_job(state: str, launch: list[str], work):
    """`work(broker options)`'s result, run against a job of WORKER started with `launch`
    on a bundled broker of its own, in the state folder `state`."""
    env = {**os.environ, "XDG_STATE_HOME": state, "OMP_NUM_THREADS": "1"}
    os.environ["XDG_STATE_HOME"] = state
    broker = BundledBroker.start(free_port())
    env["LOOMRUN_NATS"] = broker.url
    script = Path(state) / "train.py"
    script.write_text(WORKER)
    job = subprocess.Popen(
        [LOOMRUN, *launch, str(script), str(HERE)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        return asyncio.run(work(BrokerOptions(broker.url)))
    finally:
        job.terminate()
        job.wait(timeout=60)
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        base = baselines(args.rounds, state)
        found = on_a_job(state, ["--job", JOB], lambda o: measure(o, args.rounds, state + "/ck"))
    mb = base["bytes"] / 1e6
    print(f"model: {base['params'] / 1e6:.1f} M parameters; with AdamW's state {mb:.0f} MB")
    for action, baseline in (("snapshot", "clone"), ("rollback", "copy_"), ("save", "save")):
        worker = statistics.median(s for s, _, _ in found[action])
        whole = statistics.median(w for _, w, _ in found[action])
        print(
            f"{action:9s} worker {worker * 1000:7.1f} ms ({worker / base[baseline]:.2f}x "
            f"{baseline} {base[baseline] * 1000:.1f} ms); request, whole {whole * 1000:7.1f} ms"
        )
    size = found["snapshot"][0][2]
    before, first, last = found["rss"][0], found["rss"][1], found["rss"][-1]
    print(
        f"snapshot size {size / 1e6:.1f} MB = {size / base['bytes']:.2f}x the state's bytes; "
        f"worker RSS {before / 1e6:.0f} MB, after the first {first / 1e6:.0f} MB "
        f"(+{(first - before) / size:.2f}x the snapshot), after the last {last / 1e6:.0f} MB"
    )


if __name__ == "__main__":
    main()
