"""Every name loomrun uses on NATS: buckets, keys and subjects, each scoped by job id.

loomrun_desired   {job}.{replica}.param.{name}   DesiredParam (version = KV revision);
                                                 a field's path is its name (key_token)
                  {job}.{replica}.pause          DesiredParam with a bool value
                  {job}.rules.{name}             Rule (loomrun rule add)
loomrun_state     {job}.{replica}.schema         Schema
                  {job}.{replica}.outcome.{name} Outcome of the latest change
loomrun_status    {job}.{replica}                ReplicaStatus (memory, a few per second)
loomrun_jobs      {job}.n{node_rank}             JobInfo with a heartbeat
loomrun_devices   {uuid}                         Device
object store loomrun_states  {job}.{source}.{target}.{token}  a replica's state, across hosts
stream LOOMRUN_EVENTS on loomrun.{job}.events.{replica}   Event
subject loomrun.{job}.outcomes.{replica}         Outcome, each once, as it happens
subject loomrun.{job}.history.{replica}          request: MetricSeries, from its supervisor
subject loomrun.{job}.group                      GroupFailure: a node's group failed
stream LOOMRUN_LEDGER on loomrun.{job}.ledger.{node_rank}  Outcome: the change ledger, kept
subject loomrun.devices.failed                   DeviceFailure (from health checkers)
"""

from __future__ import annotations

import re

DESIRED = "loomrun_desired"
STATE = "loomrun_state"
STATUS = "loomrun_status"
JOBS = "loomrun_jobs"
DEVICES = "loomrun_devices"
STATES = "loomrun_states"  # an object store: the states `copy` carries between hosts
EVENTS_STREAM = "LOOMRUN_EVENTS"
EVENTS_SUBJECTS = "loomrun.*.events.>"
LEDGER_STREAM = "LOOMRUN_LEDGER"
LEDGER_SUBJECTS = "loomrun.*.ledger.*"
LEDGER_BEFORE = "loomrun.*.ledger"  # a job's one part, before the nodes' parts: still read
LEDGER_KEPT = 100_000  # records of each node of each job
LEDGER_DAYS = 90
LEDGER_DEDUP_SECONDS = 600.0  # a record sent again within this long is kept once (msg id)
MSG_ID = "Nats-Msg-Id"  # the header JetStream keeps one message of each value by
DEVICE_FAILED = "loomrun.devices.failed"
PAUSE = "pause"
# What `snapshot`, `rollback` and `save` write: an action, done once at one step (never a
# parameter, never in effect); and the periodic snapshots' setting (`snapshot --every`).
SNAPSHOT, ROLLBACK, SAVE = "snapshot", "rollback", "save"
# `copy r2 --from r0`: r0 shares its state (writes it out for r2), then r2 copies it in.
SHARE, COPY = "share", "copy"
ACTIONS = frozenset({SNAPSHOT, ROLLBACK, SAVE, SHARE, COPY})
SNAPSHOT_EVERY = "snapshot_every"
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# loomrun's own names: no parameter may be declared with one.
OWN_NAMES = frozenset({PAUSE, SNAPSHOT_EVERY, *ACTIONS})
HEARTBEAT_SECONDS = 2.0
LOST_AFTER_SECONDS = 10.0

# A job id: a KV key token and a subject token, and part of a shared-memory segment's name.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# A replica's name: r0, r1, ... (its global rank).
RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
REPLICA_NAME = re.compile(r"r[0-9]{1,6}")
# A parameter's name; `lr.0`, `lr.1`, ... name one optimizer param group's lr.
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[0-9]{1,4})?")
# What a change names: a parameter, or a field of a structured one by its path
# (loomrun.fields): `sched/warmup`, `aug/p.x`, `blocks/0/width`.
_KEY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[0-9]{1,4}|(/[^/\x00-\x1f\x7f]+){1,16})?")
MOST_KEY_CHARS = 256
_KEPT = re.compile(r"[A-Za-z0-9_/-]")  # a path's characters a bucket key keeps as they are
_ESCAPED = re.compile(r"(?:=[0-9A-F]{2})+")
_KEY_TOKEN = re.compile(r"[^A-Za-z0-9_=-]")


def replica_order(name: str) -> tuple[int, str]:
    """A sort key: r2 before r10."""
    return (int(name[1:]), name) if name[1:].isdigit() else (1 << 30, name)


def is_key(name: str) -> bool:
    """A name a change may carry: a parameter's, or a field's path."""
    return len(name) <= MOST_KEY_CHARS and _KEY_NAME.fullmatch(name) is not None


def key_token(name: str) -> str:
    """A name as a bucket key holds it: a path's characters that a key cannot hold (a dot,
    a space, any non-ASCII) as =XX, each byte of their UTF-8."""
    base, sep, path = name.partition("/")
    if not sep:
        return name
    kept = (c if _KEPT.fullmatch(c) else "".join(f"={b:02X}" for b in c.encode()) for c in path)
    return f"{base}/{''.join(kept)}"


def key_name(token: str) -> str | None:
    """The name a bucket key holds (key_token's inverse); None when it is not one."""
    try:
        name = _ESCAPED.sub(lambda m: bytes.fromhex(m[0].replace("=", "")).decode(), token)
    except UnicodeDecodeError:
        return None
    return name if is_key(name) else None


def desired_param(job: str, replica: str, name: str) -> str:
    return f"{job}.{replica}.param.{key_token(name)}"


def desired_pause(job: str, replica: str) -> str:
    return f"{job}.{replica}.{PAUSE}"


def rule(job: str, name: str = "*") -> str:
    """A rule of a job (a Rule) in the desired-config bucket; not a replica's key."""
    return f"{job}.rules.{name}"


def schema(job: str, replica: str = "*") -> str:
    return f"{job}.{replica}.schema"


def outcome(job: str, replica: str = "*", name: str = ">") -> str:
    return f"{job}.{replica}.outcome.{name if name == '>' else key_token(name)}"


def status(job: str, replica: str = "*") -> str:
    return f"{job}.{replica}"


def job_node(job: str, node_rank: int) -> str:
    return f"{job}.n{node_rank}"


def device(uuid: str) -> str:
    """A device UUID as one KV key token (GPU-... and MIG-... keep their shape)."""
    return _KEY_TOKEN.sub("_", uuid)


def events(job: str, replica: str = "job") -> str:
    return f"loomrun.{job}.events.{replica}"


def ledger(job: str, node_rank: int | str) -> str:
    """A node's part of the job's change ledger: every change it answered, once, in order
    (a stream); `ledger(job, "*")` is the whole job's. Each node forgets an earlier run's
    part at its start, and never another node's of this run."""
    return f"loomrun.{job}.ledger.{node_rank}"


def ledger_before(job: str) -> str:
    """The job's ledger as an earlier loomrun kept it, one part for every node."""
    return f"loomrun.{job}.ledger"


def outcomes(job: str, replica: str = "*") -> str:
    """Where a supervisor publishes each outcome once, as it happens (a `set` listens here)."""
    return f"loomrun.{job}.outcomes.{replica}"


def node_failures(job: str) -> str:
    """Where a node tells the job's other nodes that its process group failed."""
    return f"loomrun.{job}.group"


def node_failure_record(job: str, node_rank: int | str) -> str:
    """The latest such word of a node, kept in the state bucket (`*` for every node)."""
    return f"{job}.group.{node_rank}"


def history(job: str, replica: str = "*") -> str:
    """Where a replica's supervisor answers a request for its metric history."""
    return f"loomrun.{job}.history.{replica}"


def state_object(job: str, source: str, target: str, token: str) -> str:
    return f"{job}.{source}.{target}.{token}"


def split_desired(key: str) -> tuple[str, str, str | None] | None:
    """`job.r1.param.lr` -> ("r1", "param", "lr"); `job.r1.pause` -> ("r1", "pause", None)."""
    parts = key.split(".")
    if len(parts) in (4, 5) and parts[2] == "param":
        name = key_name(".".join(parts[3:]))
        return (parts[1], "param", name) if name is not None else None
    if len(parts) == 3 and parts[2] == PAUSE:
        return parts[1], PAUSE, None
    return None


def replica_of(key: str) -> str:
    """The replica a job's key is of: `job.r1.schema` -> "r1"."""
    return key.split(".", 2)[1]


def split_outcome(key: str) -> tuple[str, str]:
    """`job.r1.outcome.lr.0` -> ("r1", "lr.0")."""
    parts = key.split(".", 3)
    return parts[1], key_name(parts[3]) or parts[3]


def job_keys(job: str | None = None) -> str:
    """Every key of one job in a bucket (`job.>`), or of every job (`>`)."""
    return f"{job}.>" if job else ">"


def replica_keys(job: str, replica: str) -> str:
    """Every key of one replica of a job in a bucket."""
    return f"{job}.{replica}.>"


def kv_subject(bucket: str, key: str = ">") -> str:
    """The subject a bucket's key is stored on (JetStream's KV layout)."""
    return f"$KV.{bucket}.{key}"


def split_job_key(key: str) -> tuple[str, str]:
    """`job.r1` -> ("job", "r1"); `job.n0` -> ("job", "n0")."""
    job, _, rest = key.partition(".")
    return job, rest


def last_token(subject: str) -> str:
    """The replica of a history request, the node rank of a ledger part: the last token."""
    return subject.rsplit(".", 1)[-1]
