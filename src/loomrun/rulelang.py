"""The language of rules (`loomrun rule add NAME --when COND --then ACTIONS`): parsed
here, never evaluated by Python. An error names the character it stopped at, in one line.

    COND     a condition: comparisons of sums, joined with and / or / not, in parentheses
    sum      numbers, metrics and functions with + - * / and parentheses
    metric   `loss` (its last value at the status), `loss.mean`, `loss.min`, `loss.max`
             (over the steps since the status before), `loss.last`
    function ema(METRIC, N), mean(METRIC, N), min(METRIC, N), max(METRIC, N): over the N
             status points before this one (not defined, and the condition not met,
             until there are N of them)
    ACTIONS  `;`-separated: set KEY=VALUE ..., set KEY=KEY*X (also / + -: arithmetic on the
             value in effect where the change lands), unset KEY ..., pause, resume,
             snapshot [NAME], rollback [NAME], save DIR
"""

from __future__ import annotations

import itertools
import math
import re
from collections import deque
from dataclasses import dataclass, field

from loomrun import subjects as S

STATS = ("last", "mean", "min", "max")
FUNCTIONS = ("ema", "mean", "min", "max")
MOST_POINTS = 10_000  # N of a function, at most
COMPARISONS = (">=", "<=", "==", "!=", ">", "<")
_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)"
    r"|(?P<op>>=|<=|==|!=|[-+*/()<>,]))",
    re.ASCII,
)


class RuleError(ValueError):
    """A rule that cannot be read: the message says where, and what was expected."""


@dataclass(frozen=True)
class Metric:
    """A metric as a status gives it: `name` and which of its window's numbers."""

    name: str
    stat: str = "last"

    def __str__(self) -> str:
        return self.name if self.stat == "last" else f"{self.name}.{self.stat}"


@dataclass(frozen=True)
class Over:
    """A function of a metric over the N status points before the current one."""

    function: str
    metric: Metric
    points: int

    def __str__(self) -> str:
        return f"{self.function}({self.metric}, {self.points})"


@dataclass(frozen=True)
class Node:
    """An operation: arithmetic, a comparison, and/or/not."""

    op: str
    args: tuple


@dataclass
class Condition:
    """A parsed `--when`: its tree, and the metrics and functions it reads."""

    text: str
    tree: object
    metrics: list[Metric] = field(default_factory=list)
    functions: list[Over] = field(default_factory=list)


class _Reader:
    def __init__(self, text: str, what: str):
        self.text, self.what = text, what
        self.tokens: list[tuple[str, str, int]] = []
        at = 0
        while at < len(text):
            found = _TOKEN.match(text, at)
            if found is None or found.end() == at:
                if text[at:].strip() == "":
                    break
                where = at + len(text[at:]) - len(text[at:].lstrip())
                self.fail(where, f"unexpected {text[where]!r}")
            kind = found.lastgroup or ""
            self.tokens.append((kind, found.group(kind), found.start(kind)))
            at = found.end()
        self.i = 0

    def fail(self, at: int, what: str):
        shown = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        raise RuleError(f"{self.what} {shown!r}: {what} at character {at + 1}")

    def peek(self) -> tuple[str, str, int]:
        if self.i < len(self.tokens):
            return self.tokens[self.i]
        return ("end", "", len(self.text))

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        self.i += 1
        return token

    def expect(self, value: str) -> None:
        kind, text, at = self.take()
        if text != value or kind == "end":
            self.fail(at, f"expected {value!r}, found {_shown(kind, text)}")


def _shown(kind: str, text: str) -> str:
    return "the end" if kind == "end" else repr(text)


MOST_CHARS = 1000  # of a condition, and of its actions
MOST_TOKENS = 200  # of a condition: its tree is walked by recursion


def parse_condition(text: str, what: str = "--when") -> Condition:
    """A `--when` made a Condition, or RuleError naming the character it stopped at."""
    if len(text) > MOST_CHARS:
        raise RuleError(f"{what} is {len(text)} characters long; at most {MOST_CHARS}")
    reader = _Reader(text, what)
    if len(reader.tokens) > MOST_TOKENS:
        reader.fail(reader.tokens[MOST_TOKENS][2], f"more than {MOST_TOKENS} words and signs")
    condition = Condition(text=text, tree=None)
    try:
        tree, is_test = _or(reader, condition)
    except RecursionError:
        raise RuleError(f"{what} {text[:40]!r}...: nested too deeply") from None
    kind, rest, at = reader.peek()
    if kind != "end":
        reader.fail(at, f"expected an operator or the end, found {rest!r}")
    if not is_test:
        reader.fail(len(text), "expected a comparison (such as `loss > 3`)")
    condition.tree = tree
    return condition


def _or(r: _Reader, c: Condition) -> tuple[object, bool]:
    return _joined(r, c, "or", _and)


def _and(r: _Reader, c: Condition) -> tuple[object, bool]:
    return _joined(r, c, "and", _not)


def _joined(r: _Reader, c: Condition, word: str, inner) -> tuple[object, bool]:
    start = r.peek()[2]
    left, is_test = inner(r, c)
    while r.peek()[1] == word and r.peek()[0] == "name":
        at = r.take()[2]
        if not is_test:
            r.fail(start, f"expected a comparison before {word!r}")
        right_at = r.peek()[2]
        right, right_test = inner(r, c)
        if not right_test:
            r.fail(right_at, f"expected a comparison after {word!r} (at character {at + 1})")
        left = Node(word, (left, right))
    return left, is_test


def _not(r: _Reader, c: Condition) -> tuple[object, bool]:
    if r.peek()[1] == "not" and r.peek()[0] == "name":
        r.take()
        at = r.peek()[2]
        inner, is_test = _not(r, c)
        if not is_test:
            r.fail(at, "expected a comparison after 'not'")
        return Node("not", (inner,)), True
    return _comparison(r, c)


def _comparison(r: _Reader, c: Condition) -> tuple[object, bool]:
    left, is_test = _sum(r, c)
    kind, op, at = r.peek()
    if kind == "op" and op in COMPARISONS:
        if is_test:
            r.fail(at, "expected 'and' or 'or' between two comparisons")
        r.take()
        right, right_test = _sum(r, c)
        if right_test:
            r.fail(at, "a comparison compares numbers, not conditions")
        if r.peek()[1] in COMPARISONS:
            r.fail(r.peek()[2], "expected 'and' between two comparisons")
        return Node(op, (left, right)), True
    return left, is_test


def _sum(r: _Reader, c: Condition) -> tuple[object, bool]:
    return _arith(r, c, "+-", _term)


def _term(r: _Reader, c: Condition) -> tuple[object, bool]:
    return _arith(r, c, "*/", _unary)


def _arith(r: _Reader, c: Condition, ops: str, inner) -> tuple[object, bool]:
    left, is_test = inner(r, c)
    while r.peek()[0] == "op" and r.peek()[1] in ops:
        op, at = r.take()[1:]
        if is_test:
            r.fail(at, f"{op!r} needs numbers, not a condition")
        right, right_test = inner(r, c)
        if right_test:
            r.fail(at, f"{op!r} needs numbers, not a condition")
        left = Node(op, (left, right))
    return left, is_test


def _unary(r: _Reader, c: Condition) -> tuple[object, bool]:
    if r.peek()[:2] == ("op", "-"):
        r.take()
        inner, is_test = _unary(r, c)
        return Node("neg", (inner,)), is_test
    return _atom(r, c)


def _atom(r: _Reader, c: Condition) -> tuple[object, bool]:
    kind, text, at = r.take()
    if kind == "number":
        return float(text), False
    if kind == "op" and text == "(":
        inner, is_test = _or(r, c)
        r.expect(")")
        return inner, is_test
    if kind == "name" and text in ("and", "or", "not"):
        r.fail(at, f"expected a number or a metric, found {text!r}")
    if kind == "name" and r.peek()[:2] == ("op", "("):
        return _function(r, c, text, at), False
    if kind == "name":
        return _metric(r, c, text, at), False
    r.fail(at, f"expected a number, a metric or '(', found {_shown(kind, text)}")


def _metric(r: _Reader, c: Condition, text: str, at: int) -> Metric:
    name, _, stat = text.partition(".")
    stat = stat or "last"
    if stat not in STATS:
        r.fail(at + len(name) + 1, f"a metric is read as {', '.join(STATS)}, not {stat!r}")
    metric = Metric(name, stat)
    if metric not in c.metrics:
        c.metrics.append(metric)
    return metric


def _function(r: _Reader, c: Condition, name: str, at: int) -> Over:
    if name not in FUNCTIONS:
        r.fail(at, f"unknown function {name!r} (there are {', '.join(FUNCTIONS)})")
    r.expect("(")
    kind, text, where = r.take()
    if kind != "name" or text in ("and", "or", "not"):
        r.fail(where, f"expected a metric, found {_shown(kind, text)}")
    if r.peek()[:2] == ("op", "("):
        r.fail(where, f"{name}() takes a metric, not a function")
    metric = _metric(r, c, text, where)
    r.expect(",")
    kind, text, where = r.take()
    if kind != "number" or not text.isdigit() or not 1 <= int(text) <= MOST_POINTS:
        r.fail(where, f"expected a whole number of points from 1 to {MOST_POINTS}")
    r.expect(")")
    over = Over(name, metric, int(text))
    if over not in c.functions:
        c.functions.append(over)
    return over


# -- evaluation ----------------------------------------------------------------------


class Series:
    """What a rule has seen of one metric, for its functions: the points before the
    current one (as many as its longest function reads) and an ema per N."""

    def __init__(self, longest: int, emas: list[int]):
        self.points: deque[float] = deque(maxlen=max(longest, 1))
        self.count = 0
        self.emas = {n: 0.0 for n in emas}

    def value(self, over: Over) -> float | None:
        if self.count < over.points:
            return None
        if over.function == "ema":
            return self.emas[over.points]
        window = list(itertools.islice(reversed(self.points), over.points))
        if over.function == "mean":
            return sum(window) / len(window)
        return min(window) if over.function == "min" else max(window)

    def add(self, value: float) -> None:
        for n, ema in self.emas.items():
            alpha = 2.0 / (n + 1)
            self.emas[n] = value if self.count == 0 else ema + alpha * (value - ema)
        self.points.append(value)
        self.count += 1


class Watcher:
    """One rule's condition over one unit's status points (a replica's, or a group's)."""

    def __init__(self, condition: Condition):
        self.condition = condition
        self.series: dict[Metric, Series] = {}
        for metric in {over.metric for over in condition.functions}:
            reads = [o for o in condition.functions if o.metric == metric]
            emas = [o.points for o in reads if o.function == "ema"]
            self.series[metric] = Series(max(o.points for o in reads), emas)

    def see(self, point: dict[Metric, float]) -> tuple[bool, dict[str, float]] | None:
        """Whether this point meets the condition, with the values it read (by their text);
        None when the point lacks a metric it reads (not reported since the status before).
        The point then joins the functions' history."""
        if any(metric not in point for metric in self.condition.metrics):
            return None
        values: dict[str, float] = {str(m): point[m] for m in self.condition.metrics}
        functions: dict[Over, float | None] = {}
        for over in self.condition.functions:
            functions[over] = self.series[over.metric].value(over)
            if functions[over] is not None:
                values[str(over)] = functions[over]
        met = _evaluate(self.condition.tree, point, functions)
        for metric, series in self.series.items():
            series.add(point[metric])
        return bool(met), values


def _evaluate(tree, point, functions):
    """A number, True/False, or None (a function not defined yet: nothing is met)."""
    if isinstance(tree, float):
        return tree
    if isinstance(tree, Metric):
        return point[tree]
    if isinstance(tree, Over):
        return functions[tree]
    op, args = tree.op, [_evaluate(arg, point, functions) for arg in tree.args]
    if op == "and":
        return args[0] and args[1]
    if op == "or":
        return args[0] or args[1]
    if op == "not":
        return None if args[0] is None else not args[0]
    if any(a is None for a in args):
        return None
    if op == "neg":
        return -args[0]
    a, b = args
    if op in "+-*/":
        if op == "/":
            return a / b if b != 0 else math.nan
        return a + b if op == "+" else a - b if op == "-" else a * b
    return {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b}[op]


# -- actions -------------------------------------------------------------------------

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*(?:/[^\s/=]+)*", re.ASCII)
_ARITH = re.compile(
    r"(?P<key>[^\s*/+-]+)\s*(?P<op>[*/+-])\s*(?P<num>[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)"
)
ACTION_WORDS = ("set", "unset", "pause", "resume", "snapshot", "rollback", "save")


@dataclass(frozen=True)
class Assign:
    """`KEY=VALUE` (text, typed by the replica's schema when the rule fires), or
    `KEY=KEY*X` (`op` one of * / + -; `number` X)."""

    key: str
    text: str = ""
    op: str = ""
    number: float = 0.0


@dataclass(frozen=True)
class Action:
    word: str
    assigns: tuple[Assign, ...] = ()
    keys: tuple[str, ...] = ()
    arg: str = ""

    def __str__(self) -> str:
        if self.word == "set":
            shown = [a.text or f"{a.key}{a.op}{a.number:g}" for a in self.assigns]
            return "set " + " ".join(
                f"{a.key}={s}" for a, s in zip(self.assigns, shown, strict=True)
            )
        if self.word == "unset":
            return "unset " + " ".join(self.keys)
        return f"{self.word} {self.arg}".rstrip()


def parse_actions(text: str, what: str = "--then") -> list[Action]:
    """A `--then` made Actions, or RuleError naming the character it stopped at."""
    if len(text) > MOST_CHARS:
        raise RuleError(f"{what} is {len(text)} characters long; at most {MOST_CHARS}")
    reader = _Reader("", what)
    reader.text = text
    actions, at = [], 0
    for piece in text.split(";"):
        words = [(m.group(), at + m.start()) for m in re.finditer(r"\S+", piece)]
        if not words:
            reader.fail(at, "expected an action (" + ", ".join(ACTION_WORDS) + ")")
        actions.append(_action(reader, words))
        at += len(piece) + 1
    return actions


def _action(r: _Reader, words: list[tuple[str, int]]) -> Action:
    (word, at), rest = words[0], words[1:]
    end = at + len(word)
    if word not in ACTION_WORDS:
        r.fail(at, f"unknown action {word!r} (there are {', '.join(ACTION_WORDS)})")
    if word == "set":
        if not rest:
            r.fail(end, "expected KEY=VALUE after 'set'")
        assigns = tuple(_assign(r, w, where) for w, where in rest)
        if len({a.key for a in assigns}) != len(assigns):
            r.fail(rest[0][1], "a key is set twice")
        return Action("set", assigns=assigns)
    if word == "unset":
        if not rest:
            r.fail(end, "expected a parameter's name after 'unset'")
        for key, where in rest:
            _key(r, key, where)
        return Action("unset", keys=tuple(w for w, _ in rest))
    if word in ("pause", "resume") and rest:
        r.fail(rest[0][1], f"{word!r} takes nothing after it")
    if word in ("snapshot", "rollback") and len(rest) > 1:
        r.fail(rest[1][1], f"{word!r} takes one snapshot name at most")
    if word == "save" and len(rest) != 1:
        r.fail(end if not rest else rest[1][1], "expected one folder after 'save' (no spaces)")
    if word == "save" and not rest[0][0].startswith("/"):
        r.fail(rest[0][1], "expected an absolute folder (each worker's host saves there)")
    return Action(word, arg=rest[0][0] if rest else "")


def _key(r: _Reader, key: str, at: int) -> None:
    """A parameter's name (or a field's path) a change can carry."""
    if key in S.OWN_NAMES:
        r.fail(at, f"{key!r} is loomrun's own: use the action {key.split('_')[0]!r}")
    if not _KEY.fullmatch(key) or not S.is_key(key):
        r.fail(at, f"expected a parameter's name (lr, lr.1, sched/warmup), found {key!r}")


def _assign(r: _Reader, word: str, at: int) -> Assign:
    key, eq, value = word.partition("=")
    if not eq or not value:
        r.fail(at + len(word), f"expected KEY=VALUE, found {word!r}")
    _key(r, key, at)
    arith = _ARITH.fullmatch(value)
    if arith is None or not _KEY.fullmatch(arith["key"]):  # 1e-3 is a value
        return Assign(key, text=value)
    if arith["key"] != key:
        where = at + len(key) + 1
        r.fail(
            where, f"arithmetic reads the value of the key it sets ({key}), not {arith['key']!r}"
        )
    try:
        number = float(arith["num"])
    except ValueError:
        r.fail(at + len(key) + 1 + arith.start("num"), f"expected a number, found {arith['num']!r}")
    if not math.isfinite(number) or (arith["op"] == "/" and (number == 0 or abs(number) < 1e-300)):
        r.fail(
            at + len(key) + 1 + arith.start("num"),
            "expected a finite number, not zero to divide by",
        )
    return Assign(key, op=arith["op"], number=number)
