"""The shared-memory mailbox: sequence lock, limits, malformed payloads, cleanup."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from loomrun._proto import loomrun_pb2 as pb
from loomrun.desired import DesiredConfig
from loomrun.mailbox import SHM_DIR, Mailbox, MailboxError, new_segment_path


def test_segment_is_private_and_removed(mailbox):
    assert stat.S_IMODE(os.stat(mailbox.path).st_mode) == 0o600
    path = mailbox.path
    mailbox.unlink()
    assert not path.exists()


def test_empty_slot_reads_as_nothing(mailbox):
    assert mailbox.desired.read() == (0, None)


def test_two_writes_before_one_read_keep_the_latest_whole_state(mailbox):
    desired = DesiredConfig()
    desired.set("lr", 0.1)
    mailbox.desired.write(desired.state)
    desired.set("momentum", 0.8)
    mailbox.desired.write(desired.state)
    other = Mailbox.attach(mailbox.path)
    try:
        seq, state = other.desired.read()
    finally:
        other.close()
    assert seq == 4
    assert set(state.params) == {"lr", "momentum"}
    assert state.params["momentum"].version == 2


def test_too_large_a_state_is_refused_not_truncated(mailbox):
    status = pb.Status(step=1)
    mailbox.status.write(status)
    many = mailbox.status.capacity // 8
    big = pb.Status(step=2, metrics={f"m{i}": float(i) for i in range(many)})
    with pytest.raises(MailboxError, match="more than the mailbox's"):
        mailbox.status.write(big)
    assert mailbox.status.read()[1].step == 1


def test_malformed_payload_is_a_clear_error(mailbox):
    slot = mailbox.desired
    slot.seq[0] = 1
    slot._length[0] = 4
    slot._payload[:4] = b"\xff\xff\xff\xff"
    slot.seq[0] = 2
    with pytest.raises(MailboxError, match="malformed"):
        slot.read()
    slot._length[0] = 1 << 30
    with pytest.raises(MailboxError, match="bad length"):
        slot.read()


def test_attach_refuses_what_is_not_a_mailbox(tmp_path):
    other = tmp_path / "plain"
    other.write_bytes(b"x" * 100)
    with pytest.raises(MailboxError, match="not a loomrun mailbox"):
        Mailbox.attach(other)
    with pytest.raises(MailboxError, match="cannot open"):
        Mailbox.attach(tmp_path / "missing")


def test_shm_dir_is_dev_shm_on_linux():
    if sys.platform.startswith("linux"):
        assert str(SHM_DIR) == "/dev/shm"


def test_a_writer_that_died_mid_write_is_never_spun_on_and_reset_clears_it(mailbox):
    from loomrun._proto import loomrun_pb2 as pb

    mailbox.acks.write(pb.Acks(read_version=3))
    mailbox.acks.seq[0] += 1  # a worker killed between its two seq stores
    mailbox.step[0] = 41
    assert mailbox.acks.try_read() is None, "the supervisor's read gives up at once"
    with pytest.raises(MailboxError, match="stayed mid-write"):
        mailbox.acks.read()
    mailbox.reset_worker_side()
    assert mailbox.acks.try_read() == (0, None) and mailbox.step[0] == 0
    mailbox.acks.seq[0] = 7  # odd again: the next writer starts from an even number
    seq = mailbox.acks.write(pb.Acks(read_version=4))
    assert seq % 2 == 0 and mailbox.acks.read()[1].read_version == 4


def test_a_segment_is_made_anew_under_an_unguessable_name_never_through_a_link(tmp_path):
    names = {new_segment_path("job", "r0").name for _ in range(20)}
    assert len(names) == 20, "a random part in every name: nobody can take it beforehand"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path = new_segment_path("job", "r0")
    path.symlink_to(victim)
    try:
        with pytest.raises(MailboxError, match="cannot create the mailbox"):
            Mailbox.create(path)
        assert victim.read_text() == "keep"
    finally:
        path.unlink()
    path.write_text("made by someone else")
    try:
        with pytest.raises(MailboxError, match="cannot create the mailbox"):
            Mailbox.create(path)
    finally:
        path.unlink()
