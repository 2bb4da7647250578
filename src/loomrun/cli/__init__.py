"""The `loomrun` command line: `loomrun [run] [OPTIONS] SCRIPT [ARGS]...` and the steering commands.

Exit codes of `loomrun run`: 0 when every replica finished; the failed replica's own exit
code when one failed past its restarts (128+N when killed by signal N); 130, 143 or 129 when
stopped by SIGINT, SIGTERM or SIGHUP; 2 for a usage error, with nothing started.

Exit codes of `set`, `pause`, `resume`: 0 every targeted replica applied the change; 1 some
did not (rejected it, missed its step, or a later change replaced it first); 3 timed out
(the change stays desired and will still apply); 2 usage error, nothing written; 4 the
broker cannot be reached.

Each command lives in a module of this package and is imported only when it runs: a
`loomrun set` loads neither the launcher nor the terminal views.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import click

from loomrun.cli.options import EXIT_NO_BROKER

COMMANDS = {
    "run": "loomrun.cli.run:run_command",
    "set": "loomrun.cli.steer:set_command",
    "unset": "loomrun.cli.steer:unset_command",
    "pause": "loomrun.cli.steer:pause_command",
    "resume": "loomrun.cli.steer:resume_command",
    "snapshot": "loomrun.cli.snapshots:snapshot_command",
    "rollback": "loomrun.cli.snapshots:rollback_command",
    "save": "loomrun.cli.snapshots:save_command",
    "copy": "loomrun.cli.snapshots:copy_command",
    "rule": "loomrun.cli.rules:rule_group",
    "get": "loomrun.cli.inspecting:get_command",
    "schema": "loomrun.cli.inspecting:schema_command",
    "log": "loomrun.cli.log:log_command",
    "ls": "loomrun.cli.inspecting:ls_command",
    "watch": "loomrun.cli.inspecting:watch_command",
    "server": "loomrun.cli.serve:server_command",
    "ui": "loomrun.cli.serve:ui_command",
}


class LoomGroup(click.Group):
    """Commands loaded when named; the default command is `run`: `loomrun train.py` means
    `loomrun run train.py`."""

    default_command = "run"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=LoomGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loomrun")
def main() -> None:
    """Launch a PyTorch job like torchrun, then steer it while it trains.

    \b
      loomrun train.py --replicas 4          start 4 workers (same as `loomrun run ...`)
      loomrun --nproc-per-node 4 train.py    torchrun's spelling works too
      loomrun -m pkg.train -- --lr 0.1       a module, and arguments for it after --
    """


def command_line() -> None:
    """The `loomrun` console script: `main`, then out without Python's own teardown.

    Every command closes what it opened before it returns; what Python's shutdown would
    still do is free each loaded module, one by one (20-40 ms after a launch or a `set`,
    nearly a third of a `set`). Flushed output and the exit code are all that is left."""
    try:
        main()  # standalone mode: click ends every command with SystemExit
    except SystemExit as done:
        code = done.code
    except Exception as error:
        from nats.errors import Error as NatsError  # loaded already, if it raised this

        if not isinstance(error, NatsError):
            raise
        from loomrun.printable import printable

        said = printable(str(error) or type(error).__name__)
        print(f"Error: the NATS broker stopped answering ({said})", file=sys.stderr)
        code = EXIT_NO_BROKER
    else:
        code = 0
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what Python itself does with sys.exit("message")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)
