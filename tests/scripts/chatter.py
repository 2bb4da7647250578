"""Writes many lines quickly to stdout and stderr, numbered, to check ordering and tearing."""

import os
import sys

rank = os.environ["RANK"]
for i in range(2000):
    print(f"out {rank} {i} " + "x" * 100)
    print(f"err {rank} {i} " + "y" * 100, file=sys.stderr)
