"""Starts a child process (as a dataloader would), records both pids, then sleeps."""

import os
import subprocess
import sys
import time

child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.path.join(os.environ["DUMP_DIR"], f"{os.environ['RANK']}.pids"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}\n")
print("ready", flush=True)
time.sleep(600)
