"""Which records on the broker are of this node's run, and which parts of a job's change
ledger no node of this run writes: what a supervisor leaves out of an earlier run of the
same job id."""

from __future__ import annotations

from typing import NamedTuple

from loomrun import subjects as S


class Mark(NamedTuple):
    """Where this node's run starts in the state bucket: its stream's making (as the broker
    says), the revision of this node's purge of its own earlier record, and when that was
    (this node's clock)."""

    made: str
    revision: int
    time: float


def of_this_run(revision: int, written: float, stream_made: str, mark: Mark, started: float):
    """Whether another node's record (its `revision` in a stream made at `stream_made`, and
    the time it says it was `written`) is of this node's run, which `started` and set its
    `mark` in the bucket. After the mark in the broker's order (a later revision, or a
    stream made since, whose revisions began again at 1), it is, whatever any clock says.
    Before it, only the record's time can tell: between this node's start and its mark, it
    is (another node failed while this one connected); a time after the mark on a record
    written before it is a clock running ahead, and an earlier run's record."""
    if stream_made != mark.made or revision > mark.revision:
        return True
    return started <= written <= mark.time


def earlier_parts(subjects: dict[str, int] | list[str], nnodes: int) -> set[str]:
    """The parts of a job's change ledger (`loomrun.JOB.ledger.K` subjects) that no node of
    a run of `nnodes` nodes writes: an earlier run's with more nodes, or none of loomrun's."""
    ours = {str(rank) for rank in range(nnodes)}
    return {s for s in subjects if S.last_token(s) not in ours}
