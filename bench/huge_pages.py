"""Whether serving the weights from 2 MB pages pays: one-token forwards with and without.

    python bench/huge_pages.py --dtype float32 w8a8

For each precision the bundle is planned twice, once with its packed weights moved into a block
that asks for transparent huge pages (what ``plan`` does) and once left in ordinary 4 KB pages;
both are prefilled with ``--ctx`` tokens, then they take turns (rotating order, ``--reps``
rounds of ``--calls`` one-token forwards each). Reports medians and the median of the paired
ratios with its quartiles. Writes bench/results/huge-pages-<bundle>-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--dtype", nargs="+", default=["float32", "w8a8"])
    ap.add_argument("--ctx", type=int, default=300)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from treespec.model import kernels, load_bundle

    models = {}
    ctx = torch.randint(0, 50257, (1, args.ctx), generator=torch.Generator().manual_seed(0))
    for prec in args.dtype:
        for huge in (True, False):
            bundle = load_bundle(args.bundle)
            moved = kernels._in_huge_pages
            if not huge:
                kernels._in_huge_pages = lambda packed: False
            try:
                p = kernels.plan(bundle.model, prec)
            finally:
                kernels._in_huge_pages = moved
            if p.huge_pages != huge:
                raise SystemExit("this system gives no huge pages (madvise): nothing to compare")
            cache = bundle.model.new_cache()
            bundle.model.forward_step(ctx, 0, cache, last_only=True)
            models[(prec, huge)] = (bundle.model, cache)
    tok = torch.tensor([[5]])
    ms = {k: [] for k in models}
    for rep in range(args.reps):
        keys = list(models)
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            model, cache = models[key]
            ts = []
            for _ in range(args.calls):
                t = time.perf_counter()
                model.forward_step(tok, args.ctx, cache)
                ts.append(time.perf_counter() - t)
            ms[key].append(statistics.median(ts) * 1e3)
    report = {"bundle": args.bundle, "cpu": kernels.cpu_summary(), "threads": args.threads, "ctx": args.ctx,
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "precisions": {}}
    for prec in args.dtype:
        a, b = ms[(prec, True)], ms[(prec, False)]
        r = sorted(x / y for x, y in zip(a, b))
        q = statistics.quantiles(r, n=4)
        report["precisions"][prec] = {"huge_pages_ms": statistics.median(a), "small_pages_ms": statistics.median(b),
                                      "paired_ratio": statistics.median(r), "quartiles": [q[0], q[2]],
                                      "huge_pages_ms_all": a, "small_pages_ms_all": b}
        print(f"{prec}: 2 MB pages {statistics.median(a):.3f} ms, 4 KB pages {statistics.median(b):.3f} ms; "
              f"paired ratio {statistics.median(r):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"huge-pages-{Path(args.bundle).name}-{kernels.cpu_slug()}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
