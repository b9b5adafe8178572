"""Does torch.compile pay for a decode step? The one-token forward in three ways, side by side.

    python bench/torch_compile.py --bundle models/default

* ``eager``: the model's own torch path (``set_kernels(None)``: F.linear, torch attention);
* ``compiled``: that same path through ``torch.compile`` (inductor's C++ backend on a CPU), as
  gpt-fast compiles its decode step: the compile time of the first call is reported, then the
  warm per-call time; the context grows by one position per call, as in decoding, so a
  compiler that specialises on the cache length recompiles (``dynamic=True`` asks it not to);
* ``fused``: what treespec serves at fp32, ``model/kernels.py``'s plan (the C trunk).

fp32 everywhere (the compiled path and eager use torch's fp32 weights). Each is timed at the
same contexts, interleaved, medians over ``--reps`` rounds. Writes
bench/results/torch-compile-<bundle>-<cpu>.json.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--ctx", type=int, default=256, help="context before the timed steps")
    ap.add_argument("--steps", type=int, default=32, help="one-token forwards per round, one position each")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from treespec.model import load_bundle
    from treespec.model.kernels import cpu_slug, cpu_summary, plan

    bundle = load_bundle(args.bundle)
    model = bundle.model
    ids = torch.randint(0, 50257, (1, args.ctx), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(0, 50257, (args.steps,), generator=torch.Generator().manual_seed(1))

    def eager_step(tok, pos, cache):
        return model.forward_step(tok, pos, cache).logits

    compiled_step = torch.compile(eager_step, mode=args.mode, dynamic=True)
    kernels = plan(model, "float32")

    def with_kernels(on: bool) -> None:
        # "eager" and "compiled" run torch's own path; "fused" the plan (re-made each round: it is
        # quick, and it times its candidates on the machine as it is now).
        if on:
            plan(model, "float32")
        else:
            model.set_kernels(None)

    def run_round(fn, kernels_on: bool) -> list[float]:
        with_kernels(kernels_on)
        cache = model.new_cache()
        model.forward_step(ids, 0, cache, last_only=True)
        times = []
        for j, t in enumerate(steps):
            t0 = time.perf_counter()
            fn(t.view(1, 1), args.ctx + j, cache)
            times.append(time.perf_counter() - t0)
        return times

    report = {"bundle": args.bundle, "cpu": cpu_summary(), "threads": args.threads, "ctx": args.ctx,
              "steps": args.steps, "reps": args.reps, "torch": torch.__version__, "compile_mode": args.mode,
              "kernel_plan": kernels.describe()}
    # The first compiled call compiles; the next ones (new positions) show whether it recompiles.
    t0 = time.perf_counter()
    first = run_round(compiled_step, False)
    report["compile_first_round_s"] = round(time.perf_counter() - t0, 2)
    report["compiled_first_call_s"] = round(first[0], 2)
    report["compiled_first_round_slowest_later_call_s"] = round(max(first[1:]), 3)
    print(f"compiled: first call {first[0]:.1f} s; slowest later call of that round {max(first[1:]):.3f} s",
          file=sys.stderr)
    ways = {"eager": (eager_step, False), "compiled": (compiled_step, False), "fused": (eager_step, True)}
    per = {w: [] for w in ways}
    names = list(ways)
    for rep in range(args.reps):
        for w in names[rep % len(names):] + names[:rep % len(names)]:
            fn, on = ways[w]
            per[w].append(statistics.median(run_round(fn, on)) * 1e3)
        print(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{w} {per[w][-1]:.2f} ms" for w in names), file=sys.stderr)
    report["forward_ms"] = {w: {"median": round(statistics.median(v), 3), "rounds": [round(x, 3) for x in v]}
                            for w, v in per.items()}
    base = report["forward_ms"]["eager"]["median"]
    report["vs_eager"] = {w: round(v["median"] / base, 3) for w, v in report["forward_ms"].items()}
    report["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["argv"] = sys.argv
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"torch-compile-{Path(args.bundle).name}-{cpu_slug()}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    for w, v in report["forward_ms"].items():
        print(f"{w:>9}: {v['median']:.2f} ms per one-token forward ({report['vs_eager'][w]:.2f}x eager)")
    print(f"compile: {report['compile_first_round_s']} s for the first round of {args.steps} steps; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
