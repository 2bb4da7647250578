"""A module target for `loomrun -m pkg.main`."""

import json
import os
import sys

with open(os.path.join(os.environ["DUMP_DIR"], f"{os.environ['RANK']}.json"), "w") as f:
    json.dump({"argv": sys.argv, "name": __name__}, f)
