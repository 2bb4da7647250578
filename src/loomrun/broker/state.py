"""loomrun's state directory (0700) and the user's secret for the bundled broker (0600)."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from loomrun.broker import BrokerError


def state_dir() -> Path:
    """Where loomrun keeps its state: $XDG_STATE_HOME/loomrun or ~/.local/state/loomrun."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "loomrun"


def private_state_dir() -> Path:
    """The state directory, made if missing, readable by its owner only."""
    path = state_dir()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as error:
        raise BrokerError(f"cannot use {path} for loomrun's state: {error.strerror}") from None
    return path


def secret_path() -> Path:
    return state_dir() / "secret"


def local_secret(create: bool = True) -> str | None:
    """This user's secret for the bundled broker: made on first use, 0600."""
    path = secret_path()
    if path.exists() or not create:
        return _read_secret(path) if path.exists() else None
    private_state_dir()
    secret = secrets.token_urlsafe(32)
    temporary = path.with_name(f".secret.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    try:
        os.link(temporary, path)  # whole or not at all; if another loomrun won, theirs stands
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    """Never an empty token: nats-server takes an empty one as no authorization at all."""
    try:
        secret = path.read_text().strip()
    except OSError as error:
        raise BrokerError(f"cannot read loomrun's secret {path}: {error.strerror}") from None
    if len(secret) < 16:
        raise BrokerError(f"loomrun's secret {path} is empty or too short: remove it to make one")
    return secret


def write_private(path: Path, text: str) -> None:
    """A file only its owner can read, written whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temporary, path)


# Named by host too: a state directory shared by several hosts (an NFS home) holds each
# host's own records, and each host's broker its own store.
HOST = socket.gethostname()
