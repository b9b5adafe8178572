"""Why the tree drafter's full-vocabulary features run in NumPy, and what a proposal costs.

Times, on a bundle's vocabulary width, the work a proposal does once over the
final logits (the top-4 tokens, and exp/sum for the log-normaliser and
entropy) as torch ops, as NumPy (``draft.features._vocab_stats``) and compiled
(``model.kernels.logit_stats``, what serving uses where the C kernel builds), on a
strided row and a contiguous one; then ``TreeDrafter.state`` and a whole
``TreeDrafter.propose`` when the bundle has a fitted drafter; then each piece
of a proposal where it really runs, inside the decode loop right after a
verify forward. ``--busy`` runs a 2-thread torch matmul loop in another
process meanwhile, as a server's other work or a training job would. The model's
kernels are planned as ``treespec serve`` plans them (``--dtype``). Writes
bench/results/drafter-cost-<bundle>-<cpu>[-busy].json.

    python bench/drafter_cost.py --bundle models/default --threads 2
    python bench/drafter_cost.py --bundle models/default --threads 2 --busy
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import torch
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

BUSY = ("import torch; torch.set_num_threads(2); a = torch.randn(512, 512)\n"
        "while True: a = (a @ a).clamp_(-1, 1)")


def main() -> None:
    from treespec.draft.loop import generate_all
    from treespec.draft.features import _vocab_stats
    from treespec.draft.registry import DrafterUnavailable, make_drafter
    from treespec.draft.tree import DrafterError
    from treespec.draft.types import SamplingParams
    from treespec.model.kernels import cpu_slug, cpu_summary, load_for_inference, logit_stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=201)
    ap.add_argument("--busy", action="store_true", help="load the CPU from another process meanwhile")
    ap.add_argument("--prompts", type=int, default=4, help="held-out code prompts for the in-loop timings")
    ap.add_argument("--data-dir", default="data/default", help="prepared corpus whose test split gives them")
    ap.add_argument("--dtype", default="auto", help="precision the kernels are planned in, as for serve")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    bundle, kplan = load_for_inference(args.bundle, args.dtype)
    report = {"bundle": args.bundle, "cpu": cpu_summary(), "threads": args.threads, "precision": kplan.precision,
              "busy": args.busy, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "isolated_ms": {}}
    V = bundle.tokenizer.n_vocab
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if args.busy else None
    try:
        if busy:
            time.sleep(2)  # let it spin up
        # A verify step's row of logits, as forward_step returned it before it
        # made them contiguous ((vocab, T) memory: the row has stride T = 7),
        # and contiguous.
        strided = (torch.randn(V, 7) * 3).T[:1]
        rows = {"strided row": strided, "contiguous row": strided.contiguous()}

        def torch_way(logits):
            top = torch.topk(logits, 4, dim=-1)
            z = logits - top.values[:, :1]
            ez = z.exp()
            return ez.sum(-1), (ez * z).sum(-1)

        def numpy_way(logits):  # what state_features runs per row without the C kernel
            return [_vocab_stats(row, 4) for row in logits.numpy()]

        def compiled_way(logits):  # and with it
            return logit_stats(logits.numpy(), 4)

        print(f"{args.bundle}: vocabulary {V}, {args.threads} torch threads, "
              f"{'busy CPU' if busy else 'idle CPU'}, median of {args.reps}")
        print("| what | ms |\n| --- | --- |")
        for layout, logits in rows.items():
            for how, fn in (("torch ops", torch_way), ("NumPy", numpy_way), ("compiled", compiled_way)):
                what = f"top-4 + softmax sums, {how}, {layout}"
                report["isolated_ms"][what] = median_ms(lambda: fn(logits), args.reps)
                print(f"| {what} | {report['isolated_ms'][what]:.3f} |")
        try:
            gated = make_drafter("tree", bundle)
            drafter = gated.drafter  # the TreeDrafter behind its gate
        except (DrafterUnavailable, DrafterError) as e:
            print(f"(no tree drafter timings: {e})")
            write(report, args)
            return
        seen = []
        draft = drafter.draft
        drafter.draft = lambda index, ctx, f, k: seen.append((list(ctx), f)) or draft(index, ctx, f, k)
        prompt = bundle.tokenizer.encode("class Stack:\n    def __init__(self):\n        self.items = []\n")
        generate_all(bundle.model, prompt, SamplingParams(max_new_tokens=48), gated, tokenizer=bundle.tokenizer)
        drafter.draft = draft
        ctx, feats = seen[len(seen) // 2]
        report["isolated_ms"]["TreeDrafter.state"] = median_ms(lambda: drafter.state(feats), args.reps)
        print(f"| TreeDrafter.state (once per proposal) | {report['isolated_ms']['TreeDrafter.state']:.3f} |")
        state = drafter.open()
        n = len(state.propose(ctx, feats, drafter.k_max).tokens)
        report["isolated_ms"]["TreeDrafter.propose"] = median_ms(lambda: state.propose(ctx, feats, drafter.k_max),
                                                                 args.reps)
        print(f"| TreeDrafter.propose ({n} tokens drafted) | {report['isolated_ms']['TreeDrafter.propose']:.3f} |")
        report["in_loop"] = in_loop(bundle, gated, args.prompts, args.data_dir)
        write(report, args)
    finally:
        if busy:
            busy.kill()
            busy.wait()


def write(report: dict, args) -> None:
    from treespec.model.kernels import cpu_slug

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"drafter-cost-{Path(args.bundle).name}-{cpu_slug()}{'-busy' if args.busy else ''}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


def in_loop(bundle, gated, n_prompts: int, data_dir: str) -> dict:
    """The same work timed where it really runs: inside the decode loop,
    right after each verify forward (greedy, held-out code prompts)."""
    from collections import defaultdict

    from treespec.cli.bench import corpus_suite
    from treespec.draft import tree
    from treespec.draft.ngram import NgramIndex
    from treespec.draft.loop import generate_all
    from treespec.draft.types import SamplingParams

    total, calls = defaultdict(float), defaultdict(int)

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                total[label] += time.perf_counter() - t
                calls[label] += 1
        setattr(owner, name, wrapper)
        return fn

    pieces = [(tree, "state_features", "model features (state_features)"),
              (NgramIndex, "copy_path", "n-gram lookups along the copy path"),
              (tree, "features_for", "feature rows (features_for)"),
              (gated.drafter, "predict", "LightGBM predict, per row"),
              (tree, "choose", "choose"),
              (tree, "worth_drafting", "cost rule (worth_drafting)"),
              (gated.drafter, "draft", "whole proposal")]
    saved = [(owner, name, timed(owner, name, label)) for owner, name, label in pieces]
    try:
        prompts = corpus_suite("code", data_dir, n_prompts, bundle.tokenizer)
        for prompt in prompts:
            generate_all(bundle.model, prompt["prompt_ids"], SamplingParams(max_new_tokens=128), gated,
                         tokenizer=bundle.tokenizer)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    steps = calls["whole proposal"]
    print(f"\nIn the decode loop ({len(prompts)} held-out code prompts, greedy, {steps} proposals):")
    print("| piece | ms per proposal | calls per proposal |\n| --- | --- | --- |")
    out = {"proposals": steps, "ms_per_proposal": {}, "calls_per_proposal": {}}
    for _, _, label in pieces:
        print(f"| {label} | {total[label] / steps * 1e3:.3f} | {calls[label] / steps:.2f} |")
        out["ms_per_proposal"][label] = total[label] / steps * 1e3
        out["calls_per_proposal"][label] = calls[label] / steps
    return out


if __name__ == "__main__":
    main()
