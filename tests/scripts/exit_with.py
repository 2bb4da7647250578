"""Replica $FAIL_RANK fails: `N` exits with N, `kill` SIGKILLs itself, `raise` raises."""

import os
import signal
import sys
import time

how = sys.argv[1]
if os.environ["RANK"] == os.environ.get("FAIL_RANK", "0"):
    time.sleep(0.3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "raise":
        raise RuntimeError("the model diverged at step 7")
    sys.exit(int(how))
time.sleep(60)
