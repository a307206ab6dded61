"""`mose train` on several recipes in one process group, one after another.

    accelerate launch --config_file CONFIG tests/train_recipes.py JOBS.json

JOBS.json is a list of argument lists, each what follows `mose train` on its command line.
The processes start and join their group once for all recipes (on 2 CPU cores, starting
them costs as much as a shrunk recipe's training); every recipe still runs through the CLI's
own `train` command, as `accelerate launch -m mose.cli train` would run it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mose.cli import app

if __name__ == "__main__":
    for args in json.loads(Path(sys.argv[1]).read_text()):
        code = app(["train", *args], standalone_mode=False)
        if code:  # the CLI's clear error is printed; stop as `mose train` would
            sys.exit(code)
