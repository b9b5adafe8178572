"""Where a decode step's forward spends its time, and whether a kernel change pays.

    python bench/forward_profile.py --dtype w8a8 --rows 1,8          # phases of the forward
    python bench/forward_profile.py --dtype w8a8 --against HEAD~1    # paired A/B against a revision

Profile: the model is planned as ``treespec serve`` plans it, then ``csrc/skinny.c`` is rebuilt
with ``-DTREESPEC_PROFILE`` (its per-phase timers; they compile to nothing otherwise) and
``forward_step`` runs ``--calls`` times per row count at ``--ctx`` tokens of context: per
forward, each block phase summed over the blocks, the head (run apart from the trunk's C call
here, to time it), and the rest (embedding, Python).

A/B (``--against REV``): the working tree's ``csrc/skinny.c`` and the one at git revision REV,
both built as the server builds them, called alternately (one forward each, ``--calls`` pairs),
so drift on a shared machine hits both alike; the median of the paired ratios and its quartiles.

Writes bench/results/forward-profile-<bundle>-<cpu>-<precision>.json (or forward-ab-...-vs-<revision>.json).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PHASES = ["ln1 + qkv", "cache writes + attention", "attention proj", "ln2 + mlp up", "gelu", "mlp down"]


def prefilled(model, ctx: int):
    ids = torch.randint(0, 50257, (1, ctx), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    model.forward_step(ids, 0, cache, last_only=True)
    return cache


def profile(model, kernels, args) -> dict:
    lib = kernels._Skinny(defines=("TREESPEC_PROFILE",))
    assert lib.load(), lib.error
    kernels.SKINNY.lib = lib.lib  # the same functions, with the phase timers
    acc = (ctypes.c_double * len(PHASES)).in_dll(lib.lib, "treespec_phase_s")
    head = model.head_kernel
    head_s = [0.0]

    def timed_head(h):
        t = time.perf_counter()
        out = head(h)
        head_s[0] += time.perf_counter() - t
        return out

    model.head_kernel = timed_head
    if model.fused_trunk is not None:  # the head runs apart from the trunk's C call, so it can be timed
        model.fused_trunk.head = None
    cache = prefilled(model, args.ctx)
    out = {}
    for rows in args.rows:
        toks = torch.randint(0, 50257, (1, rows), generator=torch.Generator().manual_seed(rows))
        for _ in range(5):
            model.forward_step(toks, args.ctx, cache)
        for i in range(len(PHASES)):
            acc[i] = 0.0
        head_s[0] = 0.0
        t0 = time.perf_counter()
        for _ in range(args.calls):
            model.forward_step(toks, args.ctx, cache)
        total = (time.perf_counter() - t0) / args.calls * 1e3
        phases = {name: acc[i] / args.calls * 1e3 for i, name in enumerate(PHASES)}
        head_ms = head_s[0] / args.calls * 1e3
        out[rows] = {"forward_ms": round(total, 3), "head_ms": round(head_ms, 3),
                     "blocks_ms": {k: round(v, 3) for k, v in phases.items()},
                     "rest_ms": round(total - head_ms - sum(phases.values()), 3)}
        print(f"{rows} rows: forward {total:.2f} ms = head {head_ms:.2f} + "
              + " + ".join(f"{k} {v:.2f}" for k, v in phases.items()) + f" + rest {out[rows]['rest_ms']:.2f}")
    model.head_kernel = head
    return out


def ab(model, kernels, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        old_src = Path(tmp) / "skinny.c"
        old_src.write_text(subprocess.run(["git", "show", f"{args.against}:model/csrc/skinny.c"], cwd=REPO,
                                          check=True, capture_output=True, text=True).stdout)
        libs = {}
        for name, src in (("working tree", None), (args.against, old_src)):
            sk = kernels._Skinny(source=src)
            assert sk.load(), sk.error
            libs[name] = sk.lib
    # Settings the plan made in the served build (which the working tree's shares, being the same
    # file) hold for the other build too, where it has them: the A/B is of the source alone.
    main, other = libs["working tree"], libs[args.against]
    if hasattr(main, "skinny_get_prefetch") and hasattr(other, "skinny_set_prefetch"):
        other.skinny_set_prefetch.argtypes = [ctypes.c_long, ctypes.c_long]
        for r in range(65):
            other.skinny_set_prefetch(r, main.skinny_get_prefetch(r))
    cache = prefilled(model, args.ctx)
    out = {}
    names = list(libs)
    for rows in args.rows:
        toks = torch.randint(0, 50257, (1, rows), generator=torch.Generator().manual_seed(rows))
        times = {n: [] for n in names}
        for i in range(2 * args.calls):
            n = names[i % 2]
            kernels.SKINNY.lib = libs[n]
            t = time.perf_counter()
            model.forward_step(toks, args.ctx, cache)
            times[n].append(time.perf_counter() - t)
        ratios = sorted(b / a for a, b in zip(times[names[1]], times[names[0]]))
        q = len(ratios) // 4
        out[rows] = {n: round(statistics.median(v) * 1e3, 3) for n, v in times.items()}
        out[rows]["paired_ratio_median"] = round(statistics.median(ratios), 4)
        out[rows]["paired_ratio_quartiles"] = [round(ratios[q], 4), round(ratios[-q - 1], 4)]
        print(f"{rows} rows: working tree {out[rows][names[0]]:.3f} ms, {names[1]} {out[rows][names[1]]:.3f} ms; "
              f"paired ratio {out[rows]['paired_ratio_median']:.3f} "
              f"(quartiles {out[rows]['paired_ratio_quartiles'][0]:.3f}-{out[rows]['paired_ratio_quartiles'][1]:.3f})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--dtype", default="w8a8")
    ap.add_argument("--rows", default="1,8", help="rows per forward: 1 is a decode step, more a verify step")
    ap.add_argument("--ctx", type=int, default=300, help="tokens of context before the timed forwards")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--against", default=None, help="git revision for a paired A/B of csrc/skinny.c")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    args.rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from treespec.model import kernels
    from treespec.model.kernels import cpu_slug, cpu_summary, load_for_inference

    bundle, kp = load_for_inference(args.bundle, args.dtype)
    if kp.precision == "float32" and args.dtype != "float32":
        print(f"note: {args.dtype} fell back to float32 here", file=sys.stderr)
    result = ab(bundle.model, kernels, args) if args.against else profile(bundle.model, kernels, args)
    report = {"bundle": args.bundle, "precision": kp.precision, "cpu": cpu_summary(), "threads": args.threads,
              "ctx": args.ctx, "calls": args.calls, "against": args.against, "rows": result,
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # An A/B is named by the revision it was against (resolved: "HEAD" moves), so one does not
    # overwrite another's figures.
    vs = ("-vs-" + subprocess.run(["git", "rev-parse", "--short", args.against], cwd=REPO, check=True,
                                  capture_output=True, text=True).stdout.strip()) if args.against else ""
    kind = "forward-ab" if args.against else "forward-profile"
    path = out / f"{kind}-{Path(args.bundle).name}-{cpu_slug()}-{kp.precision}{vs}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
