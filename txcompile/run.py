"""`torchrun --nproc-per-node=N -m txcompile.run OUT --input FILE [-o OUTPUTS]`: run a converted artifact.

Every rank loads its part of a distributed artifact (`txcompile convert --backend distributed:tp=..,pp=..`) and runs
the inputs; rank 0 prints the table and writes the outputs. The same as `txcompile run` (which also takes ordinary
artifacts, in one process).
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
