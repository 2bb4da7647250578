"""Floods one job with `set lr=...` from several concurrent clients, at the lowest CPU
priority (the load is not what is measured), and prints every result as JSON lines."""

import asyncio
import json
import os
import sys

from loomrun.broker.connect import BrokerOptions
from loomrun.client import Steering

job, url, clients, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.nice(19)


async def client(index: int) -> list:
    async with Steering.connect(BrokerOptions(url)) as s:
        results = []
        for i in range(calls):
            value = round(0.001 + index * 0.01 + i * 1e-5, 8)
            (result,) = await s.set(job, {"lr": value}, timeout=60)
            results.append(result)
        return results


async def main() -> None:
    found = await asyncio.gather(*(client(i) for i in range(clients)))
    for result in (r for results in found for r in results):
        print(json.dumps([result.state, result.revision, result.requested]), flush=True)


asyncio.run(main())
