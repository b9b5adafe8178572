"""Can the model count indentation? The probe behind the model card's greedy loops.

GPT-2's BPE (r50k_base) has no token for a run of spaces: "        return"
is seven ' ' tokens and then ' return'. A model must count the spaces since
the newline to know when the indentation ends. This prints, after a
``def`` line and n = 0..12 spaces, the model's probability that the next
token is yet another ' ', and its top-3 tokens:

    python bench/indent_probe.py --bundle models/default

A model that counts puts most of its mass on a word at n = 7 (an 8-space
body); one that does not keeps predicting ' ' at every n, and greedy
decoding then emits spaces forever.
"""

from __future__ import annotations

import argparse

import torch

PROMPT = "class Counter:\n    def __init__(self, start=0):\n"


def main() -> None:
    from treespec.model import load_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--max-spaces", type=int, default=12)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    bundle = load_bundle(args.bundle)
    tok, model = bundle.tokenizer, bundle.model
    space = tok.encode(" ")[0]
    ids = tok.encode(PROMPT)
    print(f"{args.bundle}: after {PROMPT!r} + n spaces")
    print("| n | p(' ') | top 3 |\n| --- | --- | --- |")
    with torch.no_grad():
        for n in range(args.max_spaces + 1):
            cache = model.new_cache()
            out = model.forward_step(torch.tensor([ids + [space] * n]), 0, cache, last_only=True)
            p = out.logits[0, -1, :tok.n_vocab].float().softmax(-1)
            top = torch.topk(p, 3)
            best = ", ".join(f"{tok.decode([i])!r} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f"| {n} | {float(p[space]):.3f} | {best} |")


if __name__ == "__main__":
    main()
