"""``ray job submit ... -- python -m jobs.segment --input ... --output ... --model ...``: the segment job entrypoint.

Inside a submitted job Ray is already running; ``ray.init()`` connects to it. Same flags as ``deeplab segment``.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
