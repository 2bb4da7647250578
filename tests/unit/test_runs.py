"""Which records on the broker are of this run of a job id, and which node of it answers."""

from __future__ import annotations

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb


def test_a_record_is_of_this_run_by_the_brokers_order_and_before_it_by_its_time():
    from loomrun.control.runs import Mark, of_this_run

    made, started = "2026-11-30T01:00:00Z", 1000.0
    mark = Mark(made, 120, started + 2.0)  # purged 2 s after starting
    assert of_this_run(121, started - 3600, made, mark, started), "after it: any clock"
    assert of_this_run(100, started + 1.0, made, mark, started), "failed as this one connected"
    assert not of_this_run(100, started - 60, made, mark, started), "an earlier run's"
    assert not of_this_run(100, started + 3600, made, mark, started), "a clock ahead"
    assert of_this_run(7, started - 3600, "2026-11-30T02:00:00Z", mark, started), (
        "a stream made since, from revision 1 again"
    )


def test_node_0_forgets_the_ledger_parts_no_node_of_its_run_writes():
    from loomrun.control.runs import earlier_parts

    found = {S.ledger("j", k): 3 for k in ("0", "1", "2", "10", "01", "x")}
    gone = {S.ledger("j", k) for k in ("2", "10", "01", "x")}
    assert earlier_parts(found, nnodes=2) == gone
    assert earlier_parts(found, nnodes=11) == {S.ledger("j", k) for k in ("01", "x")}
    assert earlier_parts({}, nnodes=2) == set()


def test_a_jobs_nodes_are_those_of_its_latest_run():
    from loomrun.client import this_run

    def node(rank, nnodes, started):
        return pb.JobInfo(job="j", node_rank=rank, nnodes=nnodes, started=started)

    earlier = [node(0, 2, 100.0), node(1, 2, 100.5)]
    assert this_run(earlier) == earlier
    fewer = [node(0, 1, 200.0), earlier[1]]
    assert this_run(fewer) == [fewer[0]], "node 1 of the run before is not this run's"
    # This run's node 1 is up, node 0 not yet: node 0's record is still the earlier run's.
    more = [node(0, 1, 100.0), node(1, 2, 200.0)]
    assert this_run(more) == more
    assert this_run([]) == []
