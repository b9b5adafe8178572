"""Decoding on a CPU that something else is using: how OpenMP's waiting policy and the thread count fare.

    python bench/contention.py --reps 2 -- --suite code --n 4 --max-new-tokens 96 --dtype w8a8 --drafters none,tree

The matrix kernels (torch's and csrc/skinny.c) share one libgomp thread pool.
By default its threads spin between parallel regions, which is fastest on an
idle machine; when another process wants the same cores, a decode step's
many short regions each wait for a descheduled spinning thread. This runs
``treespec bench`` (the arguments after ``--``) in three ways:

* ``spin``: as shipped (libgomp's defaults);
* ``passive``: ``OMP_WAIT_POLICY=passive``, threads sleep as soon as they wait;
* ``1 thread``: ``--threads 1``, no waiting between threads at all;

each on an idle machine and beside a competitor (a process multiplying
1024 × 1024 fp32 matrices on every core, as another job on a shared host
would), interleaved and in rotating order. Nothing else may run meanwhile.
Prints tokens/s per drafter (median over reps) and writes
bench/results/contention-<cpu>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = "import sys; from treespec.cli import main; sys.exit(main(sys.argv[1:]))"
COMPETITOR = ("import os, torch; torch.set_num_threads(os.cpu_count()); a = torch.randn(1024, 1024)\n"
              "while True: a @ a")
VARIANTS = {"spin": ({}, []), "passive": ({"OMP_WAIT_POLICY": "passive"}, []), "1 thread": ({}, ["--threads", "1"])}
CONDITIONS = ("idle", "busy")


def run_bench(variant: str, args: list[str], out: Path) -> dict:
    extra_env, extra_args = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra_env)
    cmd = [sys.executable, "-c", BENCH, "bench", "--out", str(out), "--json", *args, *extra_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed ({variant}):\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    return {"tokens_per_s": {name: s["tokens_per_s"] for name, s in report["drafters"].items()},
            "precision": report["kernels"]["precision"], "threads": report["threads"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2, help="runs per variant and condition (default: 2)")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then treespec bench's arguments")
    args = ap.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    sys.path.insert(0, str(REPO))
    from treespec.model.kernels import cpu_slug, cpu_summary

    out = REPO / "bench" / "results"
    scratch = Path(tempfile.mkdtemp(prefix="treespec-contention-"))  # each run's own report, not kept
    runs = []
    order = list(VARIANTS)
    for rep in range(args.reps):
        for c, condition in enumerate(CONDITIONS if rep % 2 == 0 else CONDITIONS[::-1]):
            competitor = None
            if condition == "busy":
                competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], start_new_session=True)
                time.sleep(2.0)  # let it start multiplying
            try:
                k = (rep + c) % len(order)
                for variant in order[k:] + order[:k]:
                    r = run_bench(variant, bench_args, scratch)
                    runs.append({"rep": rep, "condition": condition, "variant": variant, **r})
                    print(f"rep {rep} {condition:4s} {variant:8s} {r['precision']:8s} "
                          + "  ".join(f"{d} {v:7.1f}" for d, v in r["tokens_per_s"].items()), flush=True)
            finally:
                if competitor is not None:
                    os.killpg(competitor.pid, signal.SIGKILL)
                    competitor.wait()
    drafters = list(runs[0]["tokens_per_s"])
    medians = {cond: {v: {d: statistics.median(r["tokens_per_s"][d] for r in runs
                                               if r["condition"] == cond and r["variant"] == v)
                          for d in drafters} for v in VARIANTS} for cond in CONDITIONS}
    base = medians["idle"]["spin"]
    print("\nmedian tokens/s (ratio to spin on an idle machine)")
    for cond in CONDITIONS:
        for v in VARIANTS:
            print(f"  {cond:4s} {v:8s} " + "  ".join(f"{d} {medians[cond][v][d]:7.1f} ({medians[cond][v][d] / base[d]:.2f})"
                                                    for d in drafters))
    slug = cpu_slug()
    result = {"cpu": cpu_summary(), "bench_args": bench_args, "reps": args.reps, "competitor": COMPETITOR,
              "runs": runs, "median_tokens_per_s": medians}
    path = out / f"contention-{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(medians, drafters, path.with_suffix(".png"), cpu_summary()["model"])
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def plot(medians: dict, drafters: list[str], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drafters), figsize=(5 * len(drafters), 3.6), squeeze=False)
    width = 0.8 / len(VARIANTS)
    for ax, d in zip(axes[0], drafters):
        for i, v in enumerate(VARIANTS):
            xs = [j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(CONDITIONS))]
            ax.bar(xs, [medians[c][v][d] for c in CONDITIONS], width, label=v)
        ax.set_xticks(range(len(CONDITIONS)), [f"{c} machine" for c in CONDITIONS])
        ax.set_title(f"drafter {d}")
        ax.set_ylabel("tokens/s (median)")
    axes[0][0].legend(title="libgomp threads")
    fig.suptitle(f"Decoding beside another CPU job ({cpu})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
