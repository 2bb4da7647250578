"""The page's token cookie, in process."""

from __future__ import annotations

import re

from loomrun.ui.server import cookie_name


def test_each_server_keeps_its_token_in_a_cookie_of_its_own():
    first, second = "a" * 43, "b" * 43
    assert cookie_name(first) != cookie_name(second), "two tunnels to one remote port"
    assert cookie_name(first) == cookie_name(first)
    assert first[:8] not in cookie_name(first) and re.fullmatch(r"[\w]+", cookie_name(first))
