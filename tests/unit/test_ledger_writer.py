"""The ledger's writer: one record per answer, keyed by (replica, change id, outcome), and
a message id per record that the broker keeps once. Nothing is sent here (an Outbox with
no link keeps its records); the file is real."""

from __future__ import annotations

import json

from loomrun._proto import loomrun_pb2 as pb
from loomrun.control.ledger import Ledger
from loomrun.control.outbox import Outbox


def answer(change: str, state: int, ended: bool = False, replica: str = "r0") -> pb.Outcome:
    return pb.Outcome(replica=replica, name="lr", change_id=change, state=state, ended=ended)


def written(folder) -> list[tuple[str, str, str]]:
    lines = (folder / "changes.jsonl").read_text().splitlines()
    return [(r["replica"], r["change_id"], r["outcome"]) for r in map(json.loads, lines)]


def test_a_restarted_workers_answers_again_are_not_second_records(tmp_path):
    outbox = Outbox(link=None)
    ledger = Ledger("j", outbox, [tmp_path], run=1.0)
    for outcome in (
        answer("c1", pb.APPLIED),
        answer("c1", pb.APPLIED),  # the restarted worker starts from it
        answer("c1", pb.OVERRIDDEN, ended=True),  # the script wrote over it: its end
        answer("c1", pb.OVERRIDDEN, ended=True),
        answer("c2", pb.APPLIED),
        answer("c3", pb.APPLIED),
        answer("c2", pb.APPLIED),  # a replay's changes, again after a restart
        answer("c3", pb.MISSED),  # ... or missed by a worker restarted past their step
        answer("c2", pb.APPLIED, replica="r1"),  # another replica's answer: its own
    ):
        ledger.record(outcome)
    ledger.close()
    assert written(tmp_path) == [
        ("r0", "c1", "applied"),
        ("r0", "c1", "overridden"),
        ("r0", "c2", "applied"),
        ("r0", "c3", "applied"),
        ("r1", "c2", "applied"),
    ]
    assert outbox.unacked == 5, "the broker's copy gets the same records"


def test_a_change_overridden_at_once_gets_its_end_under_an_id_of_its_own(tmp_path):
    """A change overridden at once is in effect for the worker's count: a restarted worker
    applies it again (no record) and may end it, which is its second record; the broker
    must not take that for a copy of the first."""
    outbox = Outbox(link=None)
    ledger = Ledger("j", outbox, [tmp_path])
    ledger.record(answer("c1", pb.OVERRIDDEN))
    ledger.record(answer("c1", pb.APPLIED))  # a restart re-applies it: no record
    ledger.record(answer("c1", pb.OVERRIDDEN, ended=True))
    ledger.close()
    assert written(tmp_path) == [("r0", "c1", "overridden"), ("r0", "c1", "overridden")]
    first, ending = (msg_id for _, _, msg_id in outbox._records)
    assert first != ending


def test_without_a_broker_no_record_waits_for_one(tmp_path):
    outbox = Outbox(link=None)
    outbox.no_broker()
    ledger = Ledger("j", outbox, [tmp_path])
    ledger.record(answer("c1", pb.APPLIED))
    ledger.close()
    assert written(tmp_path) == [("r0", "c1", "applied")] and outbox.unacked == 0


def test_each_record_has_a_message_id_of_its_run_and_key(tmp_path):
    ids = []
    for run in (1.0, 2.0):
        outbox = Outbox(link=None)
        Ledger("j", outbox, [], run=run).record(answer("c1", pb.APPLIED))
        ids += [msg_id for _, _, msg_id in outbox._records]
    first, second = ids
    assert first != second, "a new run of the job id is never taken for a copy"
    assert first.startswith("j:1.000000:") and first.endswith(":r0:c1:1")


def test_each_key_of_a_change_of_several_ends_with_a_record_of_its_own(tmp_path):
    """`set lr=... momentum=...` is one change; when the script's new param groups end
    both keys, each end is a record (and once each)."""
    outbox = Outbox(link=None)
    ledger = Ledger("j", outbox, [tmp_path])
    applied = answer("c1", pb.APPLIED)
    applied.parts.add(name="lr")
    applied.parts.add(name="momentum")
    ledger.record(applied)
    for name in ("lr", "momentum", "lr"):
        ended = answer("c1", pb.OVERRIDDEN, ended=True)
        ended.name = name
        ledger.record(ended)
    ledger.close()
    lines = [json.loads(line) for line in (tmp_path / "changes.jsonl").read_text().splitlines()]
    assert [(r["name"], r["outcome"], r["ended"]) for r in lines] == [
        ("lr", "applied", False),
        ("lr", "overridden", True),
        ("momentum", "overridden", True),
    ]
    assert len({msg_id for _, _, msg_id in outbox._records}) == 3
