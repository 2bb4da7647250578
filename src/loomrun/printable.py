"""Text from the broker, made safe for a terminal.

Job names, parameter names and docs, values, reasons and event texts come from whoever
can write to the broker. Printed raw, a crafted one could move the cursor, rewrite the
screen or hide text (escape sequences, carriage returns, bidi overrides). Every such
character is shown as an escape instead; JSON output is escaped by JSON itself.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                       else f"\\u{ord(m.group()):04x}", str(text))  # fmt: skip
