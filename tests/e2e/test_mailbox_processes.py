"""The mailbox between processes: a writer and a reader, and segments a dead process left."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap

import pytest

from loomrun.mailbox import Mailbox, new_segment_path, sweep_stale


def test_stale_segments_of_a_dead_supervisor_are_swept():
    path = new_segment_path(f"test-{secrets.token_hex(4)}", "r0")
    code = (
        "from pathlib import Path; from loomrun.mailbox import Mailbox; "
        f"Mailbox.create(Path({str(path)!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert path.exists()  # its maker exited without unlinking, as a SIGKILL would leave it
    assert path in sweep_stale()
    assert not path.exists()


def test_writer_and_reader_processes_never_tear_and_lose_nothing(mailbox):
    """A writer process rewrites a self-checking status as fast as it can; we read as fast."""
    writes = 20_000
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                from pathlib import Path
                from loomrun._proto import loomrun_pb2 as pb
                from loomrun.mailbox import Mailbox
                box = Mailbox.attach(Path({str(mailbox.path)!r}))
                for i in range(1, {writes} + 1):
                    pad = {{f"k{{j}}": float(i) for j in range(i % 50)}}
                    box.status.write(pb.Status(step=i, steps_per_sec=-i, metrics=pad))
                box.close()
                """
            ),
        ]
    )
    reads, last = 0, 0
    while writer.poll() is None or reads == 0:
        seq, status = mailbox.status.read()
        if status is None:
            continue
        reads += 1
        assert status.steps_per_sec == -status.step, "torn read"
        assert len(status.metrics) == status.step % 50, "torn read"
        assert all(v == status.step for v in status.metrics.values()), "torn read"
        assert status.step >= last, "went back in time"
        last = status.step
    assert writer.wait() == 0
    seq, status = mailbox.status.read()
    assert status.step == writes and seq == 2 * writes
    assert reads > 100


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file needs root")
def test_the_sweep_touches_only_this_users_segments_of_this_pid_namespace():
    import struct

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    made = []
    for owner, namespace in ((54321, None), (os.getuid(), 12345)):
        path = new_segment_path(f"test-{secrets.token_hex(4)}", "r0")
        Mailbox.create(path).close()
        with open(path, "r+b") as f:  # a dead supervisor's, as a SIGKILL would leave it
            f.seek(16)
            f.write(struct.pack("<i", int(dead)))
            if namespace is not None:  # made in another pid namespace: that pid is not ours
                f.seek(32)
                f.write(struct.pack("<Q", namespace))
        os.chown(path, owner, owner)
        made.append(path)
    try:
        swept = sweep_stale()
        assert not set(made) & set(swept)
        assert all(p.exists() for p in made)
    finally:
        for path in made:
            path.unlink(missing_ok=True)
