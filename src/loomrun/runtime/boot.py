"""The worker's entry point: `python -m loomrun.runtime.boot (SCRIPT | -m MODULE) [ARGS]...`.

It attaches the worker's runtime, then runs the user's code as `__main__`, exactly as
`python SCRIPT ARGS` or `python -m MODULE ARGS` would, tracebacks included.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import traceback

from loomrun.lifeline import end_with_parent

_OWN_FILES = {__file__, runpy.__file__, "<frozen runpy>"}


def _user_traceback(tb):
    """Skip the frames of this module and of runpy, so the user's error reads as usual."""
    while tb is not None and tb.tb_frame.f_code.co_filename in _OWN_FILES:
        tb = tb.tb_next
    return tb


def run_target(argv: list[str]) -> None:
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, args = argv[0], argv[1:]
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.realpath(script))
        runpy.run_path(script, run_name="__main__")


def main() -> None:
    argv = sys.argv[1:]
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.exit("usage: python -m loomrun.runtime.boot (SCRIPT | -m MODULE) [ARGS]...")
    end_with_parent()
    from loomrun.runtime import optim
    from loomrun.runtime.worker import attach

    worker = attach()
    if worker is not None:
        optim.install(worker)
        # A cluster's scheduler sends SIGUSR1 to every process of a job before it preempts
        # it; its default would end the worker. The supervisor's answer is a save. A script
        # that handles SIGUSR1 itself installs its own handler over this one (Lightning
        # installs its own only where none is set: its callback puts the default back).
        if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            worker.ignores_usr1 = True  # Lightning's callback gives it back to the trainer
    try:
        run_target(argv)
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - reported like the interpreter would
        tb = _user_traceback(error.__traceback__)
        error = error.with_traceback(tb)
        if isinstance(error, KeyboardInterrupt):
            traceback.print_exception(error)
            sys.exit(130)
        sys.excepthook(type(error), error, tb)
        sys.exit(1)


if __name__ == "__main__":
    main()
