"""How a node judges that a peer's supervisor is gone, from the nodes' heartbeats."""

from __future__ import annotations

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.control.peers import Peers

LOST = S.LOST_AFTER_SECONDS
EVERY = S.HEARTBEAT_SECONDS


def peers() -> Peers:
    return Peers("job", node_rank=0, nnodes=2, on_gone=None, progress=None)


def records(t: float, peer: float, finished: float = 0.0, own: bool = True) -> dict:
    """Node 0's own record beating with the time `t`, node 1's frozen at `peer`."""
    found = {1: pb.JobInfo(heartbeat=peer, finished=finished)}
    if own:
        found[0] = pb.JobInfo(heartbeat=t)
    return found


def looks(p: Peers, start: float, end: float, peer_beats_until: float, **kwargs) -> list:
    """A look every heartbeat period from `start` to `end`: every rank found gone."""
    found, t = [], start
    while t <= end:
        found += p.look(records(t, min(t, peer_beats_until), **kwargs), t, steps=7)
        t += EVERY
    return found


def test_a_peer_that_stops_beating_while_this_node_waits_is_gone_once():
    p = peers()
    assert looks(p, 0, 20, peer_beats_until=20) == [], "beating"
    assert looks(p, 22, 20 + LOST, peer_beats_until=20) == [], "quiet, not yet for long"
    assert looks(p, 22 + LOST, 40 + LOST, peer_beats_until=20) == [1], "told once"


def test_a_record_never_seen_beating_is_never_judged():
    """An earlier run's record of the node, or a node still on its way up."""
    assert looks(peers(), 0, 10 * LOST, peer_beats_until=-1) == []


def test_a_record_written_while_watched_is_judged_though_it_never_beat_again():
    """A node that died right after its first beat, before a second one was seen."""
    p = peers()
    t = 0.0
    while t <= 4:
        p.look({0: pb.JobInfo(heartbeat=t), 1: None}, t, steps=7)  # node 1 not there yet
        t += EVERY
    assert looks(p, 6, 6 + LOST, peer_beats_until=5) == []
    assert looks(p, 8 + LOST, 20 + LOST, peer_beats_until=5) == [1]


def test_a_peer_that_finished_is_not_gone():
    p = peers()
    looks(p, 0, 10, peer_beats_until=10)
    assert looks(p, 12, 10 * LOST, peer_beats_until=10, finished=11.0) == []


def test_while_this_node_cannot_see_its_own_beats_nothing_is_judged():
    """A failed read, a stalled stream or a lost connection: the broker's silence."""
    p = peers()
    looks(p, 0, 10, peer_beats_until=10)
    assert looks(p, 12, 10 + 3 * LOST, peer_beats_until=10, own=False) == []
    # back: counted from when this node's own beats were seen again
    assert looks(p, 12 + 3 * LOST, 10 + 4 * LOST, peer_beats_until=10) == []
    assert looks(p, 12 + 4 * LOST, 20 + 4 * LOST, peer_beats_until=10) == [1]


def test_a_stalled_own_record_starts_the_count_again():
    p = peers()
    looks(p, 0, 10, peer_beats_until=10)
    t = 12.0
    while t < 10 + 3 * LOST:  # this node's own heartbeat frozen on the broker too
        assert p.look(records(12, 10), t, steps=7) == []
        t += EVERY
    assert p.heard_since is None


def test_while_this_node_steps_a_silent_peer_is_not_gone():
    """Its ranks train with this node's: it is only cut off from the broker."""
    p = peers()
    found, t, steps = [], 0.0, 0
    while t < 10 * LOST:
        steps += 5
        found += p.look(records(t, min(t, 10)), t, steps)
        t += EVERY
    assert found == []


def test_the_word_stops_this_node_as_a_failure_that_gave_up():
    word = peers().word(1)
    assert word.give_up and word.stopped and word.exit_code == 1 and word.node_rank == 1
    assert "its supervisor is gone" in word.reason
