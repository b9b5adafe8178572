"""The kernel plan of this machine at each precision: what ``model.kernels.plan`` times and chooses.

    python bench/kernels.py --bundle models/default

For every precision: each candidate's time for one pass over the trunk's and the head's weights
at each row bucket (the medians ``plan`` chose by), the choice, and the one-token forward with
the plan installed, against torch's own kernels. Writes bench/results/kernels-<bundle>-<cpu>.json;
model/kernels.py and csrc/skinny.c point here for the figures behind their comments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def forward_ms(model, ctx: int = 256, T: int = 1, reps: int = 40) -> float:
    cache = model.new_cache()
    model.forward_step(torch.randint(0, 50257, (1, ctx), generator=torch.Generator().manual_seed(0)), 0, cache)
    x = torch.randint(0, 50257, (1, T), generator=torch.Generator().manual_seed(1))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        model.forward_step(x, ctx, cache)  # the same positions each time: the cache length stays
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from treespec.model import load_bundle
    from treespec.model.kernels import PRECISIONS, cpu_slug, cpu_summary, plan

    model = load_bundle(args.bundle).model
    report = {"bundle": args.bundle, "cpu": cpu_summary(), "threads": args.threads, "precisions": {},
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    model.set_kernels(None)
    report["torch_forward_ms"] = {T: forward_ms(model, T=T) for T in (1, 4, 8)}
    for p in PRECISIONS:
        kp = plan(model, p)
        entry = kp.to_dict()
        entry["forward_ms"] = {T: forward_ms(model, T=T) for T in (1, 2, 4, 8)}
        report["precisions"][p] = entry
        print(f"{p:9} forward " + ", ".join(f"T={T} {v:.2f} ms" for T, v in entry["forward_ms"].items())
              + f"; {kp.describe()}")
    print("torch's own kernels (no plan): " + ", ".join(f"T={T} {v:.2f} ms"
                                                       for T, v in report["torch_forward_ms"].items()))
    slug = cpu_slug()
    out = Path(args.out) / f"kernels-{Path(args.bundle).name}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
