"""A torch-free worker for the scale benchmarks: it steps every STEP_TIME seconds and
reports a loss and an lr-like `scale` parameter, through the public API only."""

import math
import os
import sys
import time

import loomrun

STEP_TIME = float(sys.argv[1]) if len(sys.argv) > 1 else 0.05
scale = loomrun.param("scale", float, default=1.0, min=0.0, doc="multiplies the loss")
rank = int(os.environ.get("RANK", "0"))
step = 0
while True:
    step += 1
    loomrun.step(loss=scale.value * (1.0 + rank / 100) * math.exp(-step / 500) + 0.01)
    time.sleep(STEP_TIME)
