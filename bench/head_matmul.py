"""Why GPT.forward_step computes the output head as ``W @ h^T``.

Times the final head of a bundle's model both ways for the few rows a verify
step has (T = 1..8), on random hidden states:

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
    print("| T | F.linear(h, W) ms | (W @ h.T).T ms |\n| --- | --- | --- |")
    for T in (1, 2, 3, 4, 6, 8):
        h = torch.randn(T, W.shape[1])
        a = median_ms(lambda: F.linear(h, W), args.reps)
        b = median_ms(lambda: (W @ h.T).T, args.reps)
        print(f"| {T} | {a:.2f} | {b:.2f} |")


if __name__ == "__main__":
    main()
