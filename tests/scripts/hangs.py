"""Steps, then (first run only) hangs inside a step: no step, no status, no exit."""

import os
import time

import loomrun

for step in range(1, 201):
    loomrun.step(loss=1.0 / step)
    if step == 20 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        print("hanging", flush=True)
        time.sleep(3600)
    time.sleep(0.005)
print("finished", flush=True)
