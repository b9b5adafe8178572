"""Why ``model.gpt.linear`` runs a decode step's few-row products as ``W @ h^T``.

For the rows a decode step has (T = 1 for vanilla decoding, 1 + drafts for a
verify step), times a bundle's weights three ways: ``F.linear(h, W)`` (what
nn.Linear does), ``W @ h^T`` as it is, and ``model.gpt.linear`` (``W @ h^T``
with a single row doubled, and the result copied to row order). First for
the output head and for one block's MLP input weight, then for the whole
``GPT.forward_step`` over a 200-token cache with ``linear`` and with
``F.linear`` everywhere, and last a one-token step with a single row doubled
for the head only (as ``linear`` does) against doubled for every weight:

    python bench/head_matmul.py --bundle models/default --threads 2
    python bench/head_matmul.py --rows 16 32 64 128 256 512 --products-only   # batched forwards' rows
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

ROWS = (1, 2, 3, 4, 6, 8, 12, 16)


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    from treespec.model import gpt, load_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS),
                    help="row counts to time (a batched server's forwards have more: try 16 32 64 128 256)")
    ap.add_argument("--products-only", action="store_true", help="only the matrix products, not the forwards")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_bundle(args.bundle).model
    weights = {"head": model.exit_heads[-1].weight.detach(), "c_fc": model.blocks[0].mlp.c_fc.weight.detach()}
    print(f"{args.threads} threads, median of {args.reps} runs, ms")
    for name, W in weights.items():
        print(f"\n{name} {tuple(W.shape)}\n| T | F.linear(h, W) | W @ h.T | gpt.linear |\n| --- | --- | --- | --- |")
        for T in args.rows:
            h = torch.randn(T, W.shape[1])
            a = median_ms(lambda: F.linear(h, W), args.reps)
            b = median_ms(lambda: (W @ h.T).T, args.reps)
            c = median_ms(lambda: gpt.linear(h, W), args.reps)
            print(f"| {T} | {a:.2f} | {b:.2f} | {c:.2f} |")

    if args.products_only:
        return
    cache = model.new_cache(batch_size=1)
    model.forward_step(torch.randint(0, 50000, (1, 200)), 0, cache)

    def step_ms(T: int) -> float:
        idx = torch.randint(0, 50000, (1, T))

        def run():
            cache.rollback(200)
            model.forward_step(idx, 200, cache)

        return median_ms(run, args.reps)

    print("\nGPT.forward_step over a 200-token cache\n| T | F.linear everywhere | gpt.linear |\n| --- | --- | --- |")
    for T in args.rows:
        with mock.patch.object(gpt, "FEW_ROWS", 0):  # every product through F.linear
            a = step_ms(T)
        print(f"| {T} | {a:.2f} | {step_ms(T):.2f} |")

    # Doubling a single row only for the head: a difference of a few percent,
    # smaller than the drift between two runs, so the two are interleaved.
    idx = torch.randint(0, 50000, (1, 1))
    times = {"head only": [], "every weight": []}
    for _ in range(max(args.reps, 200)):
        for label, cut in (("head only", gpt.DOUBLE_MIN_OUT), ("every weight", 0)):
            with mock.patch.object(gpt, "DOUBLE_MIN_OUT", cut):
                cache.rollback(200)
                t0 = time.perf_counter()
                model.forward_step(idx, 200, cache)
                times[label].append(time.perf_counter() - t0)
    print("\nOne-token forward_step, a single row doubled for ..., interleaved: "
          + ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
