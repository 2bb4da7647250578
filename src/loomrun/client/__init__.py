"""The steering client: what `loomrun set/get/pause/resume/ls` do over NATS, from Python too.

    async with Steering.connect(BrokerOptions("nats://127.0.0.1:4222")) as steering:
        results = await steering.set("train-1a2b3c", {"lr": "0.002"}, replicas=["r1"])

A change is checked against the schema the targeted replicas published before anything is
written; then it is written as desired state, and `set` waits for every replica's outcome.
"""

from loomrun.client.model import (
    Job,
    ReplicaSchema,
    Result,
    SteerError,
    how_it_ended,
    parameters,
    summary,
    this_run,
)
from loomrun.client.steering import Steering

__all__ = [
    "Job",
    "ReplicaSchema",
    "Result",
    "SteerError",
    "Steering",
    "how_it_ended",
    "parameters",
    "summary",
    "this_run",
]
