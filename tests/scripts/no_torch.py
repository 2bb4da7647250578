"""A worker that never imports torch: steps with loomrun.step(), reports a loss, has a
declared parameter; `--forever` keeps stepping (20 a second), else it says at the end
whether torch was imported behind its back."""

import sys
import time

import loomrun

scale = loomrun.param("scale", float, default=1.0, min=0.0)
step = 0
while "--forever" in sys.argv or step < 50:
    step += 1
    loomrun.step(loss=scale.value / step)
    time.sleep(0.05 if "--forever" in sys.argv else 0.001)
print(f"torch imported: {'torch' in sys.modules}", flush=True)
