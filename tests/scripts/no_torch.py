"""A worker that never imports torch: steps with loomrun.step(), reports a loss, has a
declared parameter; `--forever` keeps stepping (20 a second), `--seconds S` does so for S
seconds, else it takes 50 quick steps; then it says whether torch was imported behind its
back."""

import sys
import time

import loomrun

scale = loomrun.param("scale", float, default=1.0, min=0.0)
slow = "--forever" in sys.argv or "--seconds" in sys.argv
until = (
    time.monotonic() + float(sys.argv[sys.argv.index("--seconds") + 1])
    if "--seconds" in sys.argv
    else None
)
step = 0
while (
    "--forever" in sys.argv
    or (until is not None and time.monotonic() < until)
    or (not slow and step < 50)
):
    step += 1
    loomrun.step(loss=scale.value / step)
    time.sleep(0.05 if slow else 0.001)
print(f"torch imported: {'torch' in sys.modules}", flush=True)
