"""The shared-memory segment a replica's training state moves through on its way to another
replica (`loomrun copy r2 --from r0`): its name, its header, and making and opening it.

One segment per copy, named for the job, both replicas and a random token, under /dev/shm:
made with O_EXCL and mode 0600 as the mailboxes are, opened with O_NOFOLLOW, and read only
when this user owns it. The source's worker writes it (runtime.statecopy); across hosts
the supervisors carry its bytes through the broker's object store (control.transfer); the
target's worker reads it and removes it. Its header begins as a mailbox's does (the
supervisor's pid at 16, its pid namespace at 32), so the sweep of a dead supervisor's
segments (mailbox.sweep_stale) removes a copy's too.

    0  magic LOOMSTA1     8  size u64      16  supervisor pid i32    20  manifest length u32
    24 data offset u64   32  pid namespace u64       64  StateManifest     data offset: tensors
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from pathlib import Path

from loomrun import subjects as S
from loomrun.mailbox import COPY_MAGIC as MAGIC
from loomrun.mailbox import SHM_DIR, pid_namespace

HEADER = 64
ALIGN = 64  # each tensor's bytes start at a multiple of this
TOKEN = re.compile(r"[0-9a-f]{16}")
MOST_MANIFEST = 64 << 20  # bytes of the manifest, at most (a million tensors' entries)


class SegmentError(Exception):
    """A segment that cannot be made, found or read; one line for the change's answer."""


def segment_path(job: str, source: str, target: str, token: str) -> Path:
    """Where the copy of `source`'s state for `target` lies on this host."""
    names = (S.REPLICA_NAME.fullmatch(source), S.REPLICA_NAME.fullmatch(target))
    if not S.JOB_ID.fullmatch(job) or not all(names) or not TOKEN.fullmatch(token):
        raise SegmentError(
            f"not a copy's name: job {job!r}, replicas {source!r} and {target!r}, token "
            f"{token!r} (expected 16 hex digits)"
        )
    return SHM_DIR / f"loomrun-{os.getuid()}-{job}-copy-{source}-{target}-{token}"


def segments_of(job: str, replicas) -> list[Path]:
    """This user's copy segments of the job that one of `replicas` shares or copies."""
    mine = set(replicas)
    name = rf"loomrun-{os.getuid()}-{re.escape(job)}-copy-(r\d+)-(r\d+)-[0-9a-f]{{16}}"
    pattern = re.compile(name)
    found = []
    for path in SHM_DIR.glob(f"loomrun-{os.getuid()}-{job}-copy-*"):
        match = pattern.fullmatch(path.name)
        if match and (match[1] in mine or match[2] in mine):
            found.append(path)
    return found


def free_bytes() -> int:
    """The room left where segments are made."""
    found = os.statvfs(SHM_DIR)
    return found.f_bavail * found.f_frsize


def aligned(position: int) -> int:
    return -(-position // ALIGN) * ALIGN


def header(size: int, manifest: int, data: int, supervisor: int) -> bytes:
    block = bytearray(HEADER)
    block[:8] = MAGIC
    struct.pack_into("<QiIQQ", block, 8, size, supervisor, manifest, data, pid_namespace())
    return bytes(block)


def own(view: mmap.mmap) -> None:
    """Name this process as the segment's supervisor (a segment fetched from another host
    names that host's)."""
    struct.pack_into("<i", view, 16, os.getpid())
    struct.pack_into("<Q", view, 32, pid_namespace())


def create(path: Path, size: int) -> mmap.mmap:
    """A new segment of `size` bytes, mapped for writing; SegmentError if it exists."""
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SegmentError(f"{path.name} exists already (this copy was written before)") from None
    except OSError as error:
        raise SegmentError(f"cannot make {path}: {error.strerror}") from None
    try:
        os.posix_fallocate(fd, 0, size)  # the room taken now: a full tmpfs is an error, not SIGBUS
        return mmap.mmap(fd, size)
    except OSError as error:
        path.unlink(missing_ok=True)
        raise SegmentError(f"cannot make {path} of {size} bytes: {error.strerror}") from None
    finally:
        os.close(fd)


def open_segment(path: Path) -> tuple[mmap.mmap, int, int]:
    """A segment mapped privately (written into, it stays as it is for others), checked:
    this user's regular file, its magic, its sizes. Returns it, the manifest's length and
    where the tensors' bytes begin."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SegmentError(f"no {path.name} here (already read, or never written)") from None
    except OSError as error:
        raise SegmentError(f"cannot open {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise SegmentError(f"{path} is not a segment of this user's")
        if info.st_size < HEADER:
            raise SegmentError(f"{path} is too short for a copy ({info.st_size} bytes)")
        view = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    size, _, manifest, data, _ = struct.unpack_from("<QiIQQ", view, 8)
    if view[:8] != MAGIC or size != len(view):
        view.close()
        raise SegmentError(f"{path} is not a whole copy (its header does not match its size)")
    if manifest > MOST_MANIFEST or data < HEADER + manifest or data > size or data % ALIGN:
        view.close()
        raise SegmentError(f"{path} has a malformed header (manifest {manifest}, data at {data})")
    return view, manifest, data
