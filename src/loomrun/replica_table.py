"""The replicas as a table that reads at any width from about 60 columns up: `watch`'s
columns, cells and fitting.

Columns have a priority. replica, state, step, the first metric (loss) and lr are never
cut. When the table is wider than the screen, what says least goes first: host when there
is one host, device when every one is the CPU, gpu when there is none, restarts when all
are 0, then age; then "last change" shortens; then the other metrics, "last change" and
the rest go, steps/s and gpu last. Numbers are never cut: they are written to fit (1.23k
steps/s, loss to 3 significant digits, lr to 4).
"""

from __future__ import annotations

from dataclasses import dataclass

from loomrun import params as P
from loomrun.printable import printable

GAP = 2  # spaces between columns
LAST_CHANGE_MIN = 12  # "last change" shortens down to this many characters, then goes


@dataclass
class Fitted:
    """The columns shown, their cells and widths."""

    headers: list[str]
    rows: list[list[str]]
    widths: list[int]
    right: list[bool]

    def lines(self) -> list[str]:
        """Each row as one line of text, the header first."""
        out = []
        for row in [self.headers, *self.rows]:
            cells = [
                (cell.rjust(w) if right else cell.ljust(w))
                for cell, w, right in zip(row, self.widths, self.right, strict=True)
            ]
            out.append((" " * GAP).join(cells).rstrip())
        return out


def rate(value: float) -> str:
    """Steps per second in at most 6 characters: 12.3, 1.23k, 45.6k, 1.23M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.1f}"


def number(value, digits: int = 3) -> str:
    """A metric to `digits` significant digits (0.0123, 1.23e-05, 456); other values as
    they read elsewhere."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return P.format_value(value)


def age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def gpu(row: dict) -> str:
    if row["gpu_util"] is None:
        return "-"
    text = f"{row['gpu_util']:.0f}%"
    if row["gpu_mem_total"]:
        text += f" {row['gpu_mem_used'] / 2**30:.1f}/{row['gpu_mem_total'] / 2**30:.0f}G"
    return text


FIXED = ["replica", "host", "device", "state", "step", "steps/s", "lr", "last change", "gpu",
         "restarts", "age"]  # fmt: skip
NUMBERS = {"step", "steps/s", "lr", "restarts", "age"}


def headers(metrics: list[str]) -> list[str]:
    return [*FIXED[:6], *metrics, *FIXED[6:]]


def cells(row: dict, metrics: list[str]) -> list[str]:
    out = [
        row["replica"], row["host"], row["device"], row["state"], str(row["step"]),
        rate(row["steps_per_sec"]), *(number(row["metrics"].get(m)) for m in metrics),
        number(row["lr"] if row["lr"] is not None else row["metrics"].get("lr"), 4)
        + (" held" if "lr" in row.get("held", ()) else ""),
        row["last_change"] or "-", gpu(row), str(row["restarts"]),
        age(row["age"]),
    ]  # fmt: skip
    return [printable(cell) for cell in out]  # what the broker says, safe for a terminal


SHORTEN = "shorten last change"


def _drops(columns: list[str], rows: list[list[str]], metrics: list[str]) -> list[str]:
    """What goes, in order, when space is short: the columns that say nothing new ("age"
    with them); then "last change" shortens; then the metrics after the first, "last
    change" itself, and the other optional columns, the most telling (steps/s, gpu) last."""

    def alike(name: str, *values: str) -> bool:
        at = columns.index(name)
        seen = {r[at] for r in rows}
        return len(seen) <= 1 and (not values or not seen or seen <= set(values))

    said_nothing = [
        name
        for name, empty in (
            ("host", alike("host")),
            ("device", alike("device", "CPU", "-")),
            ("gpu", alike("gpu", "-")),
            ("restarts", alike("restarts", "0")),
            ("age", True),
        )
        if empty
    ]
    rest = ["host", "device", "restarts", "gpu", "steps/s"]
    rest = [n for n in rest if n not in said_nothing]
    return [*said_nothing, SHORTEN, *reversed(metrics[1:]), "last change", *rest]


def fit(rows: list[dict], metrics: list[str], width: int | None) -> Fitted:
    """The table for `width` characters (None: every column, for a file or a pipe)."""
    metrics = [m for m in metrics if m not in FIXED]  # a metric named lr is the lr column
    columns = headers(metrics)
    table = [cells(r, metrics) for r in rows]
    widths = [max(len(c) for c in column) for column in zip(columns, *table, strict=True)]
    shown = list(range(len(columns)))

    def total() -> int:
        return sum(widths[i] for i in shown) + GAP * (len(shown) - 1)

    change = columns.index("last change")
    if width is not None:
        for name in _drops(columns, table, metrics):
            if total() <= width:
                break
            if name == SHORTEN:
                widths[change] = max(
                    min(LAST_CHANGE_MIN, widths[change]), widths[change] - (total() - width)
                )
            else:
                shown.remove(columns.index(name))
    for line in table:  # the one column ever shortened
        if len(line[change]) > widths[change]:
            line[change] = line[change][: widths[change] - 1] + "…"
    return Fitted(
        headers=[columns[i] for i in shown],
        rows=[[line[i] for i in shown] for line in table],
        widths=[widths[i] for i in shown],
        right=[columns[i] in NUMBERS or columns[i] in metrics for i in shown],
    )
