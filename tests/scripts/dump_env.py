"""Writes this worker's environment and argv as JSON to $DUMP_DIR/<RANK>.json."""

import json
import os
import sys

path = os.path.join(os.environ["DUMP_DIR"], f"{os.environ['RANK']}.json")
with open(path, "w") as f:
    json.dump({"env": dict(os.environ), "argv": sys.argv, "name": __name__}, f)
