"""Load benchmark for the server: N concurrent streaming clients for a bounded time on loopback.

    python bench/load.py --bundle models/default --concurrency 1 4 16 --duration 60 --drafter tree ngram none

The same as ``treespec loadtest`` (see treespec/cli/loadtest.py for what it measures):
it prints a markdown table (requests/s, tokens/s, TTFT and e2e p50/p95/p99,
acceptance, 429s, errors) and ``--json FILE`` keeps every figure.
"""

import sys

from treespec.cli import main

if __name__ == "__main__":
    sys.exit(main(["loadtest", *sys.argv[1:]]))
