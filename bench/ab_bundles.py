"""``treespec bench`` on two bundles, interleaved: did a refit (or a retrain) make decoding faster?

    python bench/ab_bundles.py A_BUNDLE B_BUNDLE --reps 4 --suites code,prose -- --n 6 --drafters tree

Runs the benchmark alternately on the two bundles (ABBA order per suite, so
a drift of the machine falls on both), each in its own process; everything
after ``--`` goes to ``treespec bench``. Vanilla decoding runs in every
process, so each drafter's speedup over it is a ratio taken within one run,
steadier on a shared machine than tokens/s across runs. Prints both, the
medians per bundle, and B's speedup over A's with a bootstrap 95% interval
over the runs; writes bench/results/ab-bundles-<name>-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from ab_checkouts import REPO, run_bench


def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of median(b) / median(a), resampling each side's runs."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(b, k=len(b))) / statistics.median(rng.choices(a, k=len(a)))
                    for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="the first bundle (the baseline)")
    ap.add_argument("b", help="the second bundle")
    ap.add_argument("--reps", type=int, default=4, help="runs per bundle and suite, in ABBA order (default: 4)")
    ap.add_argument("--suites", default="code,prose", help="treespec bench --suite values (default: code,prose)")
    ap.add_argument("--name", default=None, help="result file name part (default: the bundles' folder names)")
    ap.add_argument("bench_args", nargs="*", help="after --: treespec bench's arguments")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    bench_args = argv[cut + 1:]
    sys.path.insert(0, str(REPO))
    from treespec.model.kernels import cpu_slug, cpu_summary

    bundles = {"a": args.a, "b": args.b}
    runs: dict = {s: {"a": [], "b": []} for s in args.suites.split(",")}
    order = []
    with tempfile.TemporaryDirectory(prefix="treespec-ab-") as tmp:
        for i in range(args.reps):
            for suite in runs:
                for which in (("a", "b") if i % 2 == 0 else ("b", "a")):
                    r = run_bench(None, ["--bundle", bundles[which], "--suite", suite, *bench_args], Path(tmp),
                                  label=bundles[which])
                    speedup = {d: v / r["none"] for d, v in r.items() if d != "none"}
                    runs[suite][which].append({"tokens_per_s": r, "speedup": speedup})
                    order.append((suite, which))
                    print(f"{suite} {which}: " + ", ".join(f"{d} {v:.1f} tok/s" for d, v in r.items())
                          + "; " + ", ".join(f"{d} {v:.2f}x" for d, v in speedup.items()), flush=True)
    summary: dict = {}
    for suite, by in runs.items():
        summary[suite] = {}
        for d in by["a"][0]["speedup"]:
            sa = [r["speedup"][d] for r in by["a"]]
            sb = [r["speedup"][d] for r in by["b"]]
            lo, hi = bootstrap_ratio(sa, sb)
            summary[suite][d] = {"a_speedup": statistics.median(sa), "b_speedup": statistics.median(sb),
                                 "b_over_a": statistics.median(sb) / statistics.median(sa), "ci95": [lo, hi],
                                 "a_tokens_per_s": statistics.median(r["tokens_per_s"][d] for r in by["a"]),
                                 "b_tokens_per_s": statistics.median(r["tokens_per_s"][d] for r in by["b"])}
            s = summary[suite][d]
            print(f"{suite} {d}: speedup over vanilla a {s['a_speedup']:.2f}x, b {s['b_speedup']:.2f}x; "
                  f"b/a {s['b_over_a']:.3f} (95% {lo:.2f}-{hi:.2f}); tokens/s a {s['a_tokens_per_s']:.0f}, "
                  f"b {s['b_tokens_per_s']:.0f}")
    name = args.name or f"{Path(args.a).name}-vs-{Path(args.b).name}"
    out = REPO / "bench" / "results" / f"ab-bundles-{name}-{cpu_slug()}.json"
    out.write_text(json.dumps({"bundles": bundles, "bench_args": bench_args, "order": order, "cpu": cpu_summary(),
                               "runs": runs, "summary": summary}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
