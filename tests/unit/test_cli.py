"""The command line's usage errors in process, with click's CliRunner: each is one line that
names what was wrong, exit code 2, and nothing started. (tests/e2e keeps one case of each
exit path in a real process: CliRunner does not see os._exit or a real exit code.)"""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner
from conftest import SCRIPTS

from loomrun.cli import main as cli_main


def usage_error(argv: list[str]) -> str:
    """What `loomrun ARGV` said, asserting it was a usage error and nothing started."""
    result = CliRunner().invoke(cli_main, argv)
    assert result.exit_code == 2, (argv, result.output, repr(result.exception))
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    return result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.py"], "'missing.py' does not exist"),
        (["--replicas", "0", "{s}"], "'0' is not a number of workers"),
        (["--replicas", "four", "{s}"], "'four' is not a number of workers"),
        (["{s}", "-m", "pkg.main"], "got both a script"),
        (["--bogus", "{s}"], "no such option: --bogus"),
        (["-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
        (["--job", "bad.id", "{s}"], "'bad.id' is not a valid job id"),
        (["--node-rank", "2", "--nnodes", "2", "{s}"], "out of range"),
        (["--replicas", "2", "--replicas-filter", "r7", "{s}"], "'r7' is not a replica"),
        ([], "missing SCRIPT"),
        (["--grace", "nan", "{s}"], "'nan' is not a finite number of seconds"),
        (["--step-timeout", "inf", "{s}"], "'inf' is not a finite number of seconds"),
        (["--nats", "nats://[::1", "{s}"], "is not a NATS URL"),
        (["--log-dir", "{s}/logs", "{s}"], "cannot make the folder"),
    ],
)
def test_bad_launch_options_are_one_clear_line(args, message):
    script = str(SCRIPTS / "dump_env.py")
    assert message in usage_error(["run", *(a.replace("{s}", script) for a in args)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rdzv-backend", "c10d", "--nnodes", "2"], "needs --rdzv-endpoint"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "h:0", "--rdzv-id", "j", "--nnodes", "2"],
         "a port is 1..65535"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "h", "--rdzv-id", "j", "--node-rank", "1",
          "--nnodes", "2"], "leave it out"),
        (["--rdzv-backend", "etcd"], "'etcd' is not one of 'static', 'c10d'"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:1", "--rdzv-id", "j",
          "--nnodes", "2", "--replicas-filter", "r9"], "'r9' is not a replica"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:1", "--rdzv-id", "j",
          "--nnodes", "2", "--replicas-filter", "r1,3"], "'3' is not a replica"),
        (["--nnodes", "1:2"], "'1:2' is not a valid integer"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "a b:12", "--rdzv-id", "j", "--nnodes",
          "2"], "'a b:12' is not HOST[:PORT]"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "[::1", "--rdzv-id", "j", "--nnodes",
          "2"], "an IPv6 address in [ ]"),
    ],
)  # fmt: skip
def test_rendezvous_usage_errors_are_one_line(args, message):
    said = usage_error([*args, str(SCRIPTS / "exit_with.py"), "0"])
    assert message in said and "waiting for" not in said


def _random_argv(rng: random.Random) -> list[str]:
    words = [
        "set", "get", "pause", "resume", "watch", "ls", "server", "run", "--job", "--replica",
        "--at-step", "--timeout", "--json", "--force", "--once", "--nats", "--replicas",
        "--nnodes", "--node-rank", "--master-port", "-m", "--", "lr=0.1", "lr=", "=1",
        "lr.0=x", "r1", "r-1", "nojob", "-1", "1e309", "nan", "\x1b[2J", "日本", "",
        "--interval", "0", "--metrics", "--grace", "--step-timeout", "missing.py",
    ]  # fmt: skip
    return [rng.choice(words) for _ in range(rng.randint(0, 6))]


def test_random_command_lines_are_one_line_errors_never_tracebacks():
    rng = random.Random(20261123)
    runner = CliRunner()
    for _ in range(500):
        argv = _random_argv(rng)
        if argv[:1] in (["server"], ["watch"]) and "--once" not in argv:
            argv = ["--help"]  # neither runs a foreground broker nor watches for ever here
        result = runner.invoke(cli_main, argv, catch_exceptions=True)
        shown = result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            argv, repr(result.exception))  # fmt: skip
        assert "Traceback" not in shown, (argv, shown)
        if result.exit_code not in (0, 1, 3):
            errors = [line for line in shown.splitlines() if line.startswith("Error")]
            assert len(errors) <= 1, (argv, shown)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["set", "lr"], "'lr' is not KEY=VALUE (like lr=0.002"),
        (["set", "lr=0.1", "--replica", "r-1"], "'r-1' is not a replica name"),
        (["set", "lr=0.1", "--replica", ""], "no replica named"),
        (["set", "lr=0.1", "--job", "bad.id"], "'bad.id' is not a valid job id"),
        (["set", "lr=0.1", "--timeout", "nan"], "'nan' is not a finite number of seconds"),
        (["set", "lr=0.1", "--at-step", "0"], "0 is not in the range"),
        (["set", "momentum=0.5", "--hold"], "--hold is for lr and lr.N"),
        (["unset", "bad name"], "'bad name' is not a parameter name"),
        (["pause", "--nats", "nats://[::1"], "is not a NATS URL"),
        (["watch", "--interval", "0"], "0 is not in the range"),
        (["server", "--cluster-name", "a b"], "is not a cluster name"),
        (["server", "--cluster", "127.0.0.1:6222"], "--cluster needs --routes"),
        (["ui", "--port", "70000"], "70000 is not in the range"),
    ],
)  # fmt: skip
def test_bad_steering_and_inspecting_options_are_one_clear_line(argv, message):
    assert message in usage_error(argv)


def test_no_broker_is_one_line_and_exit_4():
    """Every command that needs the broker: `Error: ...` naming it, and exit 4."""
    for argv in (["ls"], ["get"], ["set", "lr=0.1"], ["pause"], ["watch", "--once"]):
        result = CliRunner().invoke(cli_main, [*argv, "--nats", "nats://127.0.0.1:1"])
        assert result.exit_code == 4, (argv, result.output)
        said = [line for line in result.stderr.splitlines() if line]
        assert len(said) == 1 and said[0].startswith("Error: cannot reach the NATS broker")
