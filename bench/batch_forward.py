"""What continuous batching buys on this machine: one ``GPT.forward_batch``
over B sequences against B ``forward_step`` calls, each sequence verifying T
new tokens at a context of ``--context`` cached positions.

    python bench/batch_forward.py --bundle models/default --threads 2
    python bench/batch_forward.py --batch 1 2 4 8 --tokens 1 4 --reps 20
    python bench/batch_forward.py --dtype w8a8      # with the kernels `serve --dtype w8a8` plans

Prints, per (B, T), the median ms of one batched forward, of the B lone
forwards it replaces, and the ratio; ``--json`` keeps the figures. The
sequences' caches are filled once and the timed forwards write the same
positions again each repetition, as rejected drafts are overwritten.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def time_ms(fn, reps: int) -> float:
    fn()  # warm-up: first calls allocate
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8], help="sequences per forward")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="new tokens per sequence")
    ap.add_argument("--context", type=int, default=200, help="cached positions before the new tokens")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="plan the serving kernels in this precision (auto, float32, "
                    "bfloat16, int8, w8a8) as `treespec serve` does; default: the plain torch model")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from treespec.model import load_bundle
    from treespec.model.kernels import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.dtype:
        bundle, plan = load_for_inference(args.bundle, args.dtype)
        kernels = plan.to_dict()
    else:
        bundle, kernels = load_bundle(args.bundle), None
    model = bundle.model
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{args.bundle}: {args.dtype or 'plain torch'}, context {args.context}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    print("| sequences | new tokens each | one batched forward ms | lone forwards ms | lone / batched |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for B in args.batch:
            caches = [model.new_cache(max_len=args.context + max(args.tokens)) for _ in range(B)]
            for c in caches:
                model.forward_step(torch.randint(0, 50000, (1, args.context), generator=g), 0, c)
            for T in args.tokens:
                new = [torch.randint(0, 50000, (1, T), generator=g) for _ in range(B)]
                items = [(x, args.context, c, False) for x, c in zip(new, caches)]
                batched = time_ms(lambda: model.forward_batch(items), args.reps)
                lone = time_ms(lambda: [model.forward_step(x, args.context, c) for x, c in zip(new, caches)],
                               args.reps)
                rows.append({"sequences": B, "tokens": T, "batched_ms": batched, "lone_ms": lone})
                print(f"| {B} | {T} | {batched:.1f} | {lone:.1f} | {lone / batched:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": args.bundle, "dtype": args.dtype, "kernels": kernels,
                                               "context": args.context, "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
