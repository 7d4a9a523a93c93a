"""The optimizer-step benchmark (same as `lorapro bench`); see src/lorapro/cli/bench.py for what it measures.

    .venv/bin/python benchmarks/bench_step.py [--shapes 2048x2048:8] [--rank 16] [--dtype float32]
"""

import sys

from lorapro.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
