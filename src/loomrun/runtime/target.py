"""Where a parameter's value goes: a declared param, a handler, or an optimizer key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loomrun import params as P


class Target:
    """A parameter's spec, and how to read and change its live value."""

    def __init__(self, spec: P.ParamSpec, get: Callable[[], Any], put: Callable[[Any], None]):
        self.spec = spec
        self.get = get
        self.put = put
