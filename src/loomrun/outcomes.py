"""The words of the protocol's answers and kinds of change, one table each: the worker's
outcomes as `set`, `log`, the ledger's files, events and the page name them."""

from __future__ import annotations

from loomrun._proto import loomrun_pb2 as pb

STATES = {
    pb.APPLIED: "applied",
    pb.REJECTED: "rejected",
    pb.MISSED: "missed",
    pb.SUPERSEDED: "superseded",
    pb.OVERRIDDEN: "overridden",
}
KINDS = {pb.SET: "set", pb.HOLD: "hold", pb.UNSET: "unset"}
KIND_OF = {word: kind for kind, word in KINDS.items()}


def state_word(outcome: pb.Outcome) -> str:
    return STATES.get(outcome.state, "rejected")


def kind_word(kind: int) -> str:
    return KINDS.get(kind, "set")
