"""Whether the C products' prefetching pays here: one-token and verify forwards with and without.

    python bench/prefetch.py --dtype float32 w8a8 --rows 1 6

For each precision the bundle is planned once (as ``treespec serve`` plans it, which already
chooses; this measures what it chose between), prefilled with ``--ctx`` tokens, then rounds of
``--calls`` forwards alternate between asking for weight rows ``PREFETCH_ROWS`` ahead and not
(rotating which goes first). Reports medians and the median of the paired ratios with its
quartiles. Writes bench/results/prefetch-<bundle>-<cpu>.json.
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
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 6])
    ap.add_argument("--ctx", type=int, default=300)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from treespec.model import kernels
    from treespec.model.kernels import SKINNY, load_for_inference

    report = {"bundle": args.bundle, "cpu": kernels.cpu_summary(), "threads": args.threads, "ctx": args.ctx,
              "prefetch_rows": kernels.PREFETCH_ROWS, "results": {},
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    ctx = torch.randint(0, 50257, (1, args.ctx), generator=torch.Generator().manual_seed(0))
    for prec in args.dtype:
        bundle, p = load_for_inference(args.bundle, prec)
        model = bundle.model
        report["results"][prec] = {"plan_chose": {str(b): a for b, a in p.prefetch.items()},
                                   "plan_ms": {str(b): t for b, t in p.prefetch_ms.items()}}
        for rows in args.rows:
            cache = model.new_cache()
            model.forward_step(ctx, 0, cache, last_only=True)
            tok = torch.randint(0, 50257, (1, rows), generator=torch.Generator().manual_seed(1))
            chose = SKINNY.lib.skinny_get_prefetch(rows)
            ms = {0: [], kernels.PREFETCH_ROWS: []}
            for rep in range(args.reps):
                for ahead in (list(ms) if rep % 2 == 0 else list(ms)[::-1]):
                    SKINNY.lib.skinny_set_prefetch(rows, ahead)
                    ts = []
                    for _ in range(args.calls):
                        t = time.perf_counter()
                        model.forward_step(tok, args.ctx, cache)
                        ts.append(time.perf_counter() - t)
                    ms[ahead].append(statistics.median(ts) * 1e3)
            SKINNY.lib.skinny_set_prefetch(rows, chose)
            on, off = ms[kernels.PREFETCH_ROWS], ms[0]
            r = sorted(a / b for a, b in zip(on, off))
            q = statistics.quantiles(r, n=4)
            report["results"][prec][str(rows)] = {"plan_chose": chose, "prefetch_ms": statistics.median(on),
                                                  "none_ms": statistics.median(off),
                                                  "paired_ratio": statistics.median(r), "quartiles": [q[0], q[2]]}
            print(f"{prec}, {rows} row(s): prefetch {statistics.median(on):.3f} ms, none {statistics.median(off):.3f} ms; "
                  f"paired ratio {statistics.median(r):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}); the plan chose "
                  f"{chose or 'none'} for {rows} row(s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"prefetch-{Path(args.bundle).name}-{kernels.cpu_slug()}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
