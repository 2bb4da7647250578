"""Tables for people: rich on a terminal, aligned plain text (no control codes) otherwise."""

from __future__ import annotations

import sys

from loomrun.printable import printable


def render(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    title = printable(title) if title is not None else None
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(title) if title else None, header_style="bold")
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # Text: no [markup] from the broker
        Console().print(table)
        return
    print(plain(headers, rows, title))


def plain(headers: list[str], rows: list[list[str]], title: str | None = None) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = [title] if title else []
    for row in [headers, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    return "\n".join(lines)
