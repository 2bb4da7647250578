"""Population-based training on a running job, with no restart: a controller built only on
loomrun's Python API (`loomrun.client.Steering`).

    loomrun examples/train.py --replicas 4 --steps 4000 --lr 0.001 --step-time 0.005 &
    python examples/pbt.py --every 200

Every --every steps (once every replica has passed the round's last step), the replicas
are ranked by their mean loss over the round (each status carries the mean of the values
reported since the one before). The worst quarter takes the best quarter's state at its
next step (`Steering.copy`: exploit) and the lr the best one runs with, times 0.8 or 1.25
(explore). Each exploit is one line, and a marker on `loomrun ui`'s curves. The
controller stops when the job ends, or after --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys

from loomrun import params as P
from loomrun._proto import loomrun_pb2 as pb
from loomrun.broker import BrokerError
from loomrun.broker.connect import BrokerOptions
from loomrun.client import SteerError, Steering

ENDED = ("exited", "failed", "stopped")


class Round:
    """The loss each replica reported since the round began: a count and a sum."""

    def __init__(self, replicas: list[str], metric: str):
        self.metric = metric
        self.seen: dict[str, float] = {}  # replica -> the time of its last status taken
        self.count = dict.fromkeys(replicas, 0)
        self.total = dict.fromkeys(replicas, 0.0)

    def take(self, replica: str, status) -> None:
        inner = status.status
        if self.seen.get(replica) == inner.time:
            return  # the same status again
        self.seen[replica] = inner.time
        window = inner.windows.get(self.metric)
        if window is not None and window.count:
            self.count[replica] += window.count
            self.total[replica] += window.mean * window.count
        elif self.metric in inner.metrics:
            self.count[replica] += 1
            self.total[replica] += inner.metrics[self.metric]

    def ranked(self) -> list[str]:
        """Best first: the lowest mean loss; a replica that reported none, last."""
        mean = {r: self.total[r] / n if n else float("inf") for r, n in self.count.items()}
        return sorted(mean, key=lambda r: (mean[r], r))


async def pbt(args: argparse.Namespace) -> int:
    chance = random.Random(args.seed)
    async with Steering.connect(BrokerOptions(args.nats)) as steering:
        found = await steering.job(args.job)
        job, replicas = found.job, found.replicas
        if len(replicas) < 2:
            raise SteerError(f"job {job} has one replica: nothing to exploit")
        losers = max(1, int(len(replicas) * args.quantile))
        round_, end, rounds = Round(replicas, args.metric), args.every, 0
        print(f"pbt: job {job}, {len(replicas)} replicas, every {args.every} steps", flush=True)
        while args.rounds == 0 or rounds < args.rounds:
            statuses = await steering.statuses(job)
            live = {r: s for r, s in statuses.items() if r in replicas}
            if any(_state(s) in ENDED for s in live.values()):
                break  # the job ends
            if len(live) < len(replicas):  # one not seen yet (starting, or its broker away)
                await asyncio.sleep(args.poll)
                continue
            for replica, status in live.items():
                round_.take(replica, status)
            if any(s.status.step < end for s in live.values()):
                await asyncio.sleep(args.poll)
                continue
            ranked = round_.ranked()
            best, worst = ranked[:losers], ranked[::-1][:losers]
            for loser, winner in zip(worst, best, strict=False):
                if loser in best:
                    continue
                lr = (
                    P.from_pb(live[winner].status.values["lr"])
                    if "lr" in (live[winner].status.values)
                    else None
                )
                if not isinstance(lr, float):
                    print(f"pbt round {rounds + 1}: {winner} shows no lr: no exploit", flush=True)
                    continue
                explored = lr * chance.choice(args.factors)
                try:
                    results = await steering.copy(job, [loser], winner, {"lr": explored})
                except SteerError as error:  # one of them ended meanwhile: the job ends
                    print(f"pbt round {rounds + 1}: no exploit: {error}", flush=True)
                    continue
                for result in results:
                    print(f"pbt round {rounds + 1}: {result.replica}  {result.sentence()}")
            rounds += 1
            end += args.every
            round_ = Round(replicas, args.metric)
    print(f"pbt: {rounds} rounds", flush=True)
    return 0


def _state(status) -> str:
    return pb.ReplicaState.Name(status.state).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=None, help="job id [default: the only running job]")
    parser.add_argument("--every", type=int, default=200, help="steps in a round")
    parser.add_argument("--quantile", type=float, default=0.25, help="share that exploits")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.8, 1.25])
    parser.add_argument("--metric", default="loss", help="the metric ranked, lower is better")
    parser.add_argument("--rounds", type=int, default=0, help="stop after so many (0: never)")
    parser.add_argument("--seed", type=int, default=0, help="for the explore's choices")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between two looks")
    parser.add_argument(
        "--nats", default=os.environ.get("LOOMRUN_NATS", "nats://127.0.0.1:4222"), help="broker"
    )
    args = parser.parse_args()
    if args.every < 1 or not 0 < args.quantile <= 0.5:
        parser.error("--every must be at least 1, --quantile in (0, 0.5]")
    try:
        sys.exit(asyncio.run(pbt(args)))
    except (SteerError, BrokerError) as error:
        print(f"pbt: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
