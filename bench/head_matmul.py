"""Why GPT.forward_step computes the output head as ``W @ h^T``.

Times the final head of a bundle's model both ways for the few rows a verify
step has (T = 1..8), on random hidden states. ``W @ h^T`` leaves the logits
in (vocab, T) memory order; the last columns time what a verify step then
does with them (argmax and logsumexp over each row) on that strided view,
and on a contiguous copy (the copy included):

    python bench/head_matmul.py --bundle models/default --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    from treespec.model import load_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    W = load_bundle(args.bundle).model.exit_heads[-1].weight.detach()
    print(f"head {tuple(W.shape)}, {args.threads} threads, median of {args.reps}")
    print("| T | F.linear(h, W) ms | (W @ h.T).T ms | argmax+logsumexp, strided ms | "
          "copy+argmax+logsumexp, contiguous ms |\n| --- | --- | --- | --- | --- |")
    for T in (1, 2, 3, 4, 6, 8):
        h = torch.randn(T, W.shape[1])
        a = median_ms(lambda: F.linear(h, W), args.reps)
        b = median_ms(lambda: (W @ h.T).T, args.reps)
        logits = (W @ h.T).T

        def rows(x):
            return x.argmax(dim=-1), torch.logsumexp(x, dim=-1)

        c = median_ms(lambda: rows(logits), args.reps)
        d = median_ms(lambda: rows(logits.contiguous()), args.reps)
        print(f"| {T} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} |")


if __name__ == "__main__":
    main()
