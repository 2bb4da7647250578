"""A rule of a job, as the desired-config bucket and a --rules file hold it (a Rule):
checked whole, its condition and actions parsed by loomrun.rulelang."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loomrun import subjects as S
from loomrun._proto import loomrun_pb2 as pb
from loomrun.rulelang import Action, Condition, RuleError, parse_actions, parse_condition

MOST_RULES = 64  # of a job
ACROSS = ("max", "min", "mean")
MOST_COOLDOWN = 2**62


@dataclass
class Rule:
    message: pb.Rule
    when: Condition
    then: list[Action]
    units: dict = field(default_factory=dict)  # members -> control.rules.Unit


def read_rule(message: pb.Rule) -> Rule:
    """A rule as the bucket (or a --rules file) holds it, parsed; RuleError says what is
    wrong with it, in one line."""
    if not S.RULE_NAME.fullmatch(message.name):
        raise RuleError(
            f"rule name {message.name[:64]!r}: expected letters, digits, '_' or '-' "
            "(up to 64, the first a letter or digit)"
        )
    if message.cooldown < 0:
        raise RuleError(f"rule {message.name}: the cooldown is a number of steps, 0 or more")
    if message.across and message.across not in ACROSS:
        raise RuleError(f"rule {message.name}: across is one of {', '.join(ACROSS)}")
    for replica in message.replicas:
        if not S.REPLICA_NAME.fullmatch(replica):
            raise RuleError(f"rule {message.name}: {replica[:64]!r} is not a replica's name")
    return Rule(message, parse_condition(message.when), parse_actions(message.then))


RULE_FIELDS = {"when": str, "then": str, "cooldown": int, "across": str, "replicas": list}


def read_rules_file(path) -> list[pb.Rule]:
    """The rules of a TOML file, one table per rule, named by its key:

        [spike]
        when = "loss > 3 * ema(loss, 20)"
        then = "rollback; set lr=lr*0.5"
        cooldown = 300

    Each is checked as `rule add` checks it; RuleError names the file and the rule."""
    import tomllib

    try:
        tables = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise RuleError(
            f"cannot read {path}: {getattr(error, 'strerror', None) or error}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise RuleError(f"{path} is not TOML: {error}") from None
    rules = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise RuleError(f"{path}: {name} is not a table ([{name}] with when = ..., then = ...)")
        for key, value in table.items():
            kind = RULE_FIELDS.get(key)
            if kind is None or not isinstance(value, kind) or isinstance(value, bool):
                known = ", ".join(RULE_FIELDS)
                raise RuleError(f"{path}: rule {name}: {key} = {value!r} is not one of its "
                                f"fields ({known}), with a value of their kind")  # fmt: skip
        if "when" not in table or "then" not in table:
            raise RuleError(f"{path}: rule {name} needs both when and then")
        if not 0 <= table.get("cooldown", 0) <= MOST_COOLDOWN:
            raise RuleError(f"{path}: rule {name}: cooldown is a number of steps, 0 or more")
        message = pb.Rule(
            name=name, when=table["when"], then=table["then"], cooldown=table.get("cooldown", 0),
            across=table.get("across", ""), replicas=[str(r) for r in table.get("replicas", [])],
            origin=f"--rules {path}",
        )  # fmt: skip
        try:
            read_rule(message)
        except RuleError as error:
            raise RuleError(f"{path}: rule {name}: {error}") from None
        rules.append(message)
    if len(rules) > MOST_RULES:
        raise RuleError(f"{path}: a job has {MOST_RULES} rules at most")
    return rules
