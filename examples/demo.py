"""`make demo`: launch examples/train.py on 4 replicas with loomrun and check the outcome.

Shows the launcher as it is today: torchrun's environment, one prefixed stream per replica,
a clean exit. (`loomrun set` and `loomrun watch` join this demo with the NATS control plane.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOOMRUN = str(Path(sys.executable).parent / "loomrun")


def main() -> int:
    command = [
        LOOMRUN, "--replicas", "4", str(HERE / "train.py"),
        "--steps", "300", "--print-every", "100", "--step-time", "0.002",
    ]  # fmt: skip
    print("$ loomrun --replicas 4 examples/train.py --steps 300 --print-every 100", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    finished = [f"[r{i}] step   300" for i in range(4)]
    missing = [line for line in finished if line not in result.stdout]
    if result.returncode != 0 or missing:
        print(f"demo failed: exit code {result.returncode}, missing {missing}", file=sys.stderr)
        return 1
    print("demo ok: 4 replicas trained 300 steps each and exited cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
