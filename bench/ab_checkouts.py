"""``treespec bench`` on two revisions of the code, interleaved: did a change slow decoding down?

    python bench/ab_checkouts.py --before cac00e9 --reps 2 -- --suite code --n 8 --dtype auto

Checks out ``--before`` into a temporary git worktree, lays it out as the
``treespec`` package (the folders install as its subpackages), and runs the
benchmark command alternately on it and on this checkout (ABBA order, so a
drift of the machine falls on both), each in its own process. Everything
after ``--`` goes to ``treespec bench``. Prints tokens/s per drafter for
each run, the median per revision and the after/before ratios, and writes
them to bench/results/ab-<before>-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The bench runs with the repository as its working directory (relative bundle
# and data paths), and ``python -c`` puts that directory first on sys.path, where
# its own treespec/ shadowed the --before view on PYTHONPATH: until December
# 2026 both sides of every A/B ran this checkout's code. So the cwd entry goes.
PRELUDE = "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
BENCH = PRELUDE + "from treespec.cli import main; sys.exit(main(sys.argv[1:]))"


def package_view(worktree: Path, into: Path) -> Path:
    """A folder whose ``treespec`` package is ``worktree``'s code (for PYTHONPATH)."""
    pkg = into / "treespec"
    shutil.copytree(worktree / "treespec", pkg)
    for sub in ("model", "draft", "server", "training"):
        (pkg / sub).symlink_to(worktree / sub)
    return into


def run_bench(pythonpath: Path | None, args: list[str], out: Path, label: str | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, "-c", BENCH, "bench", "--out", str(out), "--json", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed ({label or ('before' if pythonpath else 'after')}):\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    return {name: s["tokens_per_s"] for name, s in report["drafters"].items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare this checkout against")
    ap.add_argument("--reps", type=int, default=2, help="runs per revision, in ABBA order (default: 2)")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then treespec bench's arguments")
    args = ap.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    sys.path.insert(0, str(REPO))
    from treespec.model.kernels import cpu_slug, cpu_summary

    tmp = Path(tempfile.mkdtemp(prefix="treespec-ab-"))
    worktree = tmp / "worktree"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(worktree), args.before], cwd=REPO, check=True,
                   capture_output=True)
    try:
        before_path = package_view(worktree, tmp / "view")
        runs = {"before": [], "after": []}
        order = []
        for i in range(args.reps):
            order += ["before", "after"] if i % 2 == 0 else ["after", "before"]
        for which in order:
            r = run_bench(before_path if which == "before" else None, bench_args, tmp / "out")
            runs[which].append(r)
            print(which, {k: round(v, 1) for k, v in r.items()}, flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    drafters = list(runs["after"][0])
    median = {w: {d: statistics.median(r[d] for r in runs[w]) for d in drafters} for w in runs}
    ratio = {d: median["after"][d] / median["before"][d] for d in drafters}
    for d in drafters:
        print(f"{d}: before {median['before'][d]:.1f} tok/s, after {median['after'][d]:.1f} tok/s, "
              f"after/before {ratio[d]:.3f} (runs: {[round(r[d], 1) for r in runs['before']]} / "
              f"{[round(r[d], 1) for r in runs['after']]})")
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    out = REPO / "bench" / "results" / f"ab-{rev}-{cpu_slug()}.json"
    out.write_text(json.dumps({"before": rev, "bench_args": bench_args, "order": order, "cpu": cpu_summary(),
                               "runs": runs, "median_tokens_per_s": median, "after_over_before": ratio},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
