"""Fails until TORCHELASTIC_RESTART_COUNT reaches $SUCCEED_AT, then prints it and exits 0."""

import os
import sys

count = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
print(f"restart count {count}", flush=True)
if count < int(os.environ["SUCCEED_AT"]):
    sys.exit(5)
