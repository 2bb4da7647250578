"""One client of the flood: `python flood_client.py JOB URL CLIENT CALLS OUT`.

It makes CALLS changes through Steering, as a user's script would, each to one replica
(r0 or r1) and one parameter (lr or batch), each with a value no other change has, and
writes every result to OUT as a JSON line as soon as it has it: the change's id, its
answer, and whether that answer came from the job's supervisor or was deduced by the
client (a later change to the key was applied first, so this one was never read). A call
the broker outage broke is written too, with its error: such a change may still have
reached the broker, and be applied later."""

from __future__ import annotations

import asyncio
import json
import random
import sys

from loomrun.broker.connect import BrokerOptions
from loomrun.client import Steering
from loomrun.client.model import OVERTAKEN

job, url, out = sys.argv[1], sys.argv[2], sys.argv[5]
client, calls = int(sys.argv[3]), int(sys.argv[4])


def value(name: str, i: int):
    """A value of its own for the i-th call of this client."""
    if name == "lr":
        return round(0.001 + client * 0.01 + i * 1e-5, 8)
    return 1 + client * 1000 + i


async def main() -> None:
    rng = random.Random(client)
    with open(out, "w", buffering=1) as written:
        async with Steering.connect(BrokerOptions(url), timeout=10, reconnect=True) as s:
            for i in range(calls):
                replica, name = rng.choice(("r0", "r1")), rng.choice(("lr", "batch"))
                line = {"replica": replica, "name": name, "value": value(name, i)}
                try:
                    (result,) = await s.set(job, {name: line["value"]}, [replica], timeout=30)
                except Exception as error:  # noqa: BLE001 - recorded: the outage is the test
                    line["error"] = str(error) or type(error).__name__
                else:
                    outcome = result.outcome
                    line.update(
                        change_id=result.change_id,
                        state=result.state,
                        deduced=outcome is not None and outcome.reason == OVERTAKEN,
                    )
                written.write(json.dumps(line) + "\n")


asyncio.run(main())
