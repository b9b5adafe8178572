"""``treespec prepare-data``: build a tokenised corpus, offline.

The sources, the split by document and the files written are described in
treespec.training.data, which does the work (``prepare``); this module is the
command line around it.
"""

from __future__ import annotations

import sys


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="tokenise a corpus into train/val/test memmaps",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", default="stdlib,shakespeare",
                   help="comma-separated: stdlib, shakespeare, files:GLOB (default: %(default)s)")
    p.add_argument("--out", default="data/default", help="output folder (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="where downloads are kept (default: OUT/cache)")
    p.add_argument("--val-frac", type=float, default=0.05)
    p.add_argument("--test-frac", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: up to 4)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.data import SPLITS, DataError, prepare

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    try:
        meta = prepare(sources, args.out, args.cache_dir, args.val_frac, args.test_frac, args.seed, args.workers)
    except DataError as e:
        print(f"treespec prepare-data: error: {e}", file=sys.stderr)
        return 2
    for split in SPLITS:
        s = meta["splits"][split]
        parts = ", ".join(f"{d} {v['tokens']:,}" for d, v in s["domains"].items())
        print(f"{split:5s}: {s['tokens']:>10,} tokens in {s['documents']:,} documents ({parts})")
    print(f"wrote {args.out}/{{train,val,test}}.bin and meta.json")
    return 0
