"""The shared-memory mailbox between the supervisor and one worker, both sides.

One segment per replica under /dev/shm, made by the supervisor (mode 0600) before the
worker starts and removed by it on every exit path. The segment holds four slots, each
written by one side only under a sequence lock, so a reader never sees a torn payload:

    desired  supervisor -> worker   the whole latest DesiredState (level-triggered)
    acks     worker -> supervisor   the latest Outcome of every parameter
    schema   worker -> supervisor   the declared parameters
    status   worker -> supervisor   step, rate, metrics, values

A slot is `seq: u64 | length: u32 | pad: u32 | payload`. The writer makes seq odd, writes,
then makes it even again; a reader retries while seq is odd or changed under it. Payloads
are protobuf messages from proto/loomrun.proto: nothing is unpickled. Besides the slots,
the header holds the worker's step counter, written at every step boundary, so the
supervisor knows where a worker really ended even when it was killed between two statuses,
and the supervisor's count of the answers it has read (each field has one writer).

A worker killed in the middle of a write leaves its slot's seq odd: the supervisor resets
the worker's slots before it starts the replacement (`reset_worker_side`), and its reads
(`try_read`) give up at once on a slot that is mid-write instead of spinning.

The segment is opened with os.open + mmap, not multiprocessing.shared_memory, whose
resource tracker can unlink a segment when a worker exits (CPython issue 82300).

/dev/shm is shared by every user of the machine. A segment's name carries the user's uid
and a random part, and is made with O_EXCL (which never follows a link): a file another
user made beforehand cannot stop a job or catch its mailbox. The sweep of segments left by
dead supervisors touches only this user's, made in this pid namespace.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.protobuf.message import Message

MAGIC = b"LOOMMBX2"
COPY_MAGIC = b"LOOMSTA1"  # a copy's segment (statesegment): its header begins as this one's
SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
SLOT_NAMES = ("desired", "acks", "schema", "status")
# Room for structured values of up to params.LARGEST_VALUE (16 KiB) each; tmpfs pages are
# taken only as they are written.
SLOT_SIZES = {"desired": 256 << 10, "acks": 512 << 10, "schema": 128 << 10, "status": 256 << 10}
# Each slot's message, by name: protobuf is imported at the first read, not with this
# module, which the supervisor needs before its first spawn.
SLOT_TYPES = {"desired": "DesiredState", "acks": "Acks", "schema": "Schema", "status": "Status"}
WORKER_SLOTS = ("acks", "schema", "status")
_HEADER = 64
_STEP_OFFSET = 24
_PIDNS_OFFSET = 32
_READ_OFFSET = 40
_STATUS_READ_OFFSET = 48
_SLOT_HEADER = 16
_TORN_READ_TRIES = 10_000
_QUICK_READ_TRIES = 3


class MailboxError(RuntimeError):
    """A mailbox that cannot be made, opened, written or read; one line for a person."""


def _layout() -> tuple[dict[str, tuple[int, int]], int]:
    offsets, position = {}, _HEADER
    for name in SLOT_NAMES:
        offsets[name] = (position, SLOT_SIZES[name])
        position += _SLOT_HEADER + SLOT_SIZES[name]
    return offsets, position


SLOTS, SEGMENT_SIZE = _layout()


def new_segment_path(job: str, replica: str) -> Path:
    """A name nobody can have taken: this user's uid, the replica, and a random part."""
    return SHM_DIR / f"loomrun-{os.getuid()}-{job}-{replica}-{secrets.token_hex(4)}"


def find_segment(job: str, replica: str) -> Path | None:
    """The segment of a running job's replica, made by this user (None if there is none)."""
    pattern = re.compile(
        rf"loomrun-{os.getuid()}-{re.escape(job)}-{re.escape(replica)}-[0-9a-f]{{8}}"
    )
    found = [p for p in SHM_DIR.glob(f"loomrun-{os.getuid()}-*") if pattern.fullmatch(p.name)]
    return found[0] if len(found) == 1 else None


def pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep_stale() -> list[Path]:
    """Remove this user's segments (mailboxes, copies) whose supervisor is gone (a SIGKILL
    leaves it no chance to clean up). Another user's, or one made in another pid namespace
    (where its pid means another process), is never touched."""
    removed, uid, namespace = [], os.getuid(), pid_namespace()
    for path in SHM_DIR.glob("loomrun-*"):
        try:
            info = path.lstat()
            if info.st_uid != uid or not path.is_file() or path.is_symlink():
                continue
            with open(path, "rb") as f:
                header = f.read(_PIDNS_OFFSET + 8)
        except OSError:
            continue
        if len(header) < _PIDNS_OFFSET + 8 or header[:8] not in (MAGIC, COPY_MAGIC):
            continue
        pid = struct.unpack_from("<i", header, 16)[0]
        if struct.unpack_from("<Q", header, _PIDNS_OFFSET)[0] != namespace:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:
            pass
    return removed


class Slot:
    """One single-writer region of the segment, under a sequence lock."""

    def __init__(self, view: memoryview, name: str):
        offset, capacity = SLOTS[name]
        self.name = name
        self.capacity = capacity
        self.seq = view[offset : offset + 8].cast("Q")
        self._length = view[offset + 8 : offset + 12].cast("I")
        self._payload = view[offset + _SLOT_HEADER : offset + _SLOT_HEADER + capacity]
        self._type = self._malformed = None  # protobuf's, at the first read

    def write(self, message: Message) -> int:
        data = message.SerializeToString()
        if len(data) > self.capacity:
            raise MailboxError(
                f"the {self.name} state is {len(data)} bytes, more than the mailbox's "
                f"{self.capacity} bytes for it; nothing was written"
            )
        seq = self.seq[0]
        seq += seq & 1  # an earlier writer died mid-write: start from an even number again
        self.seq[0] = seq + 1
        self._length[0] = len(data)
        self._payload[: len(data)] = data
        self.seq[0] = seq + 2
        return seq + 2

    def read_bytes(self, tries: int = _TORN_READ_TRIES) -> tuple[int, bytes] | None:
        """The latest complete payload and its sequence number (0 and b"" before any write);
        None when it stayed mid-write for `tries` attempts."""
        for attempt in range(tries):
            before = self.seq[0]
            if before & 1:
                if attempt > 100:
                    time.sleep(0)
                continue
            length = self._length[0]
            data = None if length > self.capacity else bytes(self._payload[:length])
            if self.seq[0] == before:
                if data is None:
                    raise MailboxError(f"the {self.name} slot holds a bad length {length}")
                return before, data
        return None

    def read(self) -> tuple[int, Message | None]:
        """The latest message, or None before the first write. Raises MailboxError if malformed
        or if the slot stays mid-write (its writer is stuck or died writing)."""
        found = self._read(_TORN_READ_TRIES)
        if found is None:
            raise MailboxError(f"the {self.name} slot stayed mid-write; is its writer stuck?")
        return found

    def try_read(self) -> tuple[int, Message | None] | None:
        """Like read, but None at once when the slot is mid-write: for an event loop, which
        must never spin on a writer that may have died; it reads again on its next round."""
        return self._read(_QUICK_READ_TRIES)

    def _read(self, tries: int) -> tuple[int, Message | None] | None:
        found = self.read_bytes(tries)
        if found is None:
            return None
        seq, data = found
        if seq == 0:
            return 0, None
        if self._type is None:
            from google.protobuf.message import DecodeError

            from loomrun._proto import loomrun_pb2

            self._type, self._malformed = getattr(loomrun_pb2, SLOT_TYPES[self.name]), DecodeError
        message = self._type()
        try:
            message.ParseFromString(data)
        except self._malformed:
            raise MailboxError(f"the {self.name} slot holds a malformed message") from None
        return seq, message

    def clear(self) -> None:
        """Back to never written; only while no writer can be running."""
        self._length[0] = 0
        self.seq[0] = 0

    def release(self) -> None:
        for view in (self.seq, self._length, self._payload):
            view.release()


class Mailbox:
    """One replica's segment, opened by either side; `create` and `unlink` are the supervisor's."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        try:
            self._map = mmap.mmap(fd, SEGMENT_SIZE)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self.slots = {name: Slot(self._view, name) for name in SLOT_NAMES}
        self.desired, self.acks = self.slots["desired"], self.slots["acks"]
        self.schema, self.status = self.slots["schema"], self.slots["status"]
        # The worker's step counter: one aligned 8-byte store per step, read without a lock.
        self.step = self._view[_STEP_OFFSET : _STEP_OFFSET + 8].cast("q")
        # The supervisor's: the last outcome it has read from the acks, so the worker keeps
        # (and rewrites) only the answers not yet read.
        self.outcomes_read = self._view[_READ_OFFSET : _READ_OFFSET + 8].cast("Q")
        # The supervisor's too: the status it read last, so the worker's next status holds
        # every metric's values since then (its window), even when a status was not read.
        self.status_read = self._view[_STATUS_READ_OFFSET : _STATUS_READ_OFFSET + 8].cast("Q")

    @classmethod
    def create(cls, path: Path) -> Mailbox:
        """Make a fresh segment under a name no file has (see new_segment_path)."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            raise MailboxError(f"cannot create the mailbox {path}: {error.strerror}") from None
        try:
            os.ftruncate(fd, SEGMENT_SIZE)
            header = struct.pack("<IIi", SEGMENT_SIZE, len(SLOT_NAMES), os.getpid())
            os.pwrite(fd, MAGIC + header, 0)
            os.pwrite(fd, struct.pack("<Q", pid_namespace()), _PIDNS_OFFSET)
        except OSError as error:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise MailboxError(f"cannot size the mailbox {path}: {error.strerror}") from None
        return cls(path, fd)

    @classmethod
    def attach(cls, path: Path) -> Mailbox:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as error:
            raise MailboxError(f"cannot open the mailbox {path}: {error.strerror}") from None
        header = os.pread(fd, 16, 0)
        if header[:8] != MAGIC or struct.unpack("<I", header[8:12])[0] != SEGMENT_SIZE:
            os.close(fd)
            raise MailboxError(f"{path} is not a loomrun mailbox of this version")
        return cls(path, fd)

    @property
    def closed(self) -> bool:
        return self._map.closed

    def owner_pid(self) -> int:
        """The pid of the supervisor that made the segment."""
        return struct.unpack_from("<i", self._map, 16)[0]

    def reset_worker_side(self) -> None:
        """Forget what the last worker wrote (it may have died mid-write): the supervisor
        calls this between two workers, when no worker of this replica runs."""
        for name in WORKER_SLOTS:
            self.slots[name].clear()
        self.step[0] = 0
        self.outcomes_read[0] = 0
        self.status_read[0] = 0

    def close(self) -> None:
        if self._map.closed:
            return
        for slot in self.slots.values():
            slot.release()
        self.step.release()
        self.outcomes_read.release()
        self.status_read.release()
        self._view.release()
        self._map.close()

    def unlink(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
