"""What a prompt's forward (the prefill) costs with the kernel the plan chose for long
products, against torch's GEMM for them.

    python bench/prefill.py --bundle models/default --dtype w8a8,float32

The model is planned as ``treespec serve`` plans it. A prompt longer than the last row
bucket (``model.kernels.ROW_BUCKETS``) runs with that bucket's choice, timed at load like
the others. The comparison runs the same model with that bucket switched to torch's GEMM
(with int8 weights: an fp32 copy, fp32 activations) and no whole-trunk C call, which is what
every prompt of more than 64 tokens ran before the bucket existed. Both are called
alternately, one prefill each, so drift on a shared machine hits both alike; per prompt
length, the medians and the median of the paired ratios.

Writes bench/results/prefill-<bundle>-<cpu>[-TAG].json.
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


def prompt_kernel(model, name: str | None, saved: dict) -> None:
    """Run the last bucket with ``name`` (and without the fused trunk), or restore the plan's
    choice (None). ``saved`` keeps the plan's choices from the first call on (kernels may
    share one table)."""
    from treespec.model.kernels import CANDIDATES, ROW_BUCKETS, LinearKernel

    last = ROW_BUCKETS[-1]
    kernels = [m.kernel for m in model.modules() if isinstance(getattr(m, "kernel", None), LinearKernel)]
    kernels.append(model.head_kernel)
    if not saved:
        saved.update({("table", id(k)): k.table[last] for k in kernels})
        saved.update({("fused", id(b)): last in b.fused.rows for b in model.blocks if b.fused is not None})
    for k in kernels:
        k.table[last] = name or saved[("table", id(k))]
        k._by_rows[last] = CANDIDATES[k.table[last]]
    for b in model.blocks:
        if b.fused is not None:
            if name is None and saved[("fused", id(b))]:
                b.fused.rows.add(last)
            else:
                b.fused.rows.discard(last)


def run(bundle_path: str, dtype: str, lengths: list[int], reps: int, threads: int) -> dict:
    from treespec.model.kernels import ROW_BUCKETS, load_for_inference

    torch.set_num_threads(threads)
    bundle, plan = load_for_inference(bundle_path, dtype)
    model = bundle.model
    last = ROW_BUCKETS[-1]
    choice = {"trunk": plan.choices["trunk"][last], "head": plan.choices["head"][last]}
    saved: dict = {}
    g = torch.Generator().manual_seed(0)
    rows = []
    for T in lengths:
        ids = torch.randint(0, min(50257, model.config.vocab_size), (1, T), generator=g)
        cache = model.new_cache(max_len=T)
        times = {"planned": [], "torch": []}
        with torch.inference_mode():
            for i in range(reps + 1):
                for which in (("planned", "torch") if i % 2 else ("torch", "planned")):
                    prompt_kernel(model, None if which == "planned" else "torch", saved)
                    t = time.perf_counter()
                    model.forward_step(ids, 0, cache, last_only=True)
                    if i:  # the first round warms both up
                        times[which].append((time.perf_counter() - t) * 1e3)
        prompt_kernel(model, None, saved)
        ratio = [a / b for a, b in zip(times["torch"], times["planned"])]
        row = {"tokens": T, "bucket_choice": choice,
               "planned_ms": statistics.median(times["planned"]), "torch_ms": statistics.median(times["torch"]),
               "torch_over_planned": statistics.median(ratio),
               "ratio_quartiles": statistics.quantiles(ratio, n=4) if len(ratio) > 1 else ratio,
               "planned_ms_all": times["planned"], "torch_ms_all": times["torch"]}
        rows.append(row)
        print(f"{dtype:9s} {T:5d} tokens: planned ({row['bucket_choice']['trunk']}) {row['planned_ms']:7.1f} ms "
              f"({row['planned_ms'] / T:.3f} ms/token); torch's GEMM {row['torch_ms']:7.1f} ms; "
              f"torch / planned {row['torch_over_planned']:.2f}x", flush=True)
    assert plan.choices["trunk"][last] == choice["trunk"], "the plan's choice was not restored"
    return {"kernels": plan.to_dict(), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--dtype", default="w8a8,float32", help="comma-separated precisions")
    ap.add_argument("--lengths", default="100,200,400", help="prompt lengths in tokens (past the last bucket)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default="", help="suffix for the result file (the CPU suffix names only the ISA)")
    args = ap.parse_args(argv)

    from treespec.model.kernels import cpu_slug, cpu_summary

    torch.set_flush_denormal(True)
    lengths = [int(x) for x in args.lengths.split(",")]
    report = {"bundle": args.bundle, "cpu": cpu_summary(), "threads": args.threads, "reps": args.reps,
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
              "precisions": {d: run(args.bundle, d, lengths, args.reps, args.threads)
                             for d in args.dtype.split(",") if d}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"prefill-{Path(args.bundle).name}-{cpu_slug()}" + (f"-{args.tag}" if args.tag else "") + ".json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
