"""A child process that ends with the process that started it (Linux's parent-death signal).

The child asks for the signal itself, first thing, rather than through a pre-exec function:
a pre-exec function makes Python fork the whole supervisor instead of vforking it, which
costs 5-15 ms a worker. The parent's pid travels in the environment, so a child whose
parent died before it asked sees that and leaves.
"""

from __future__ import annotations

import os
import signal
import sys

PARENT_PID = "LOOMRUN_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def parent_env() -> dict[str, str]:
    """What a child needs in its environment to end with this process."""
    return {PARENT_PID: str(os.getpid())}


def end_with_parent() -> None:
    """SIGKILL this process when the parent named in its environment dies, or exit now if
    it already has. Nothing happens without that variable, or off Linux."""
    text = os.environ.pop(PARENT_PID, "")  # not for the children this process starts
    if not text.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(text):  # the parent died before the signal was asked for
        os._exit(1)
