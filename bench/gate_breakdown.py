"""Where a drafter wins or loses against vanilla decoding, step by step.

    python bench/gate_breakdown.py --suite prose --temperature 0.8 --dtype w8a8

Runs vanilla and the drafter on the same held-out prompts (interleaved, alternating which goes
first), each step timed from the decode loop's events, and groups the drafter's steps by what
happened: whether the gate asked the drafter or let its fallback (or nobody) draft, how many
tokens were drafted (3 = three or more) and whether they were a corpus guess. Per group: steps,
ms per step, drafted, accepted, and the drafter's own ms per step. A group loses when its extra ms
per step, times its steps, exceeds the forwards its accepted tokens saved. Writes
bench/results/gate-breakdown-<bundle>-<cpu>-<suite>-T<temperature>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--data-dir", default="data/default")
    ap.add_argument("--suite", default="prose", choices=["code", "prose"])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--drafter", default="tree")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from treespec.cli.bench import corpus_suite
    from treespec.draft.loop import generate
    from treespec.draft.registry import make_drafter
    from treespec.draft.types import SamplingParams
    from treespec.model.kernels import cpu_slug, cpu_summary, load_for_inference

    bundle, kplan = load_for_inference(args.bundle, args.dtype)
    drafter = make_drafter(args.drafter, bundle, calibrate=True)
    model = bundle.model
    prompts = corpus_suite(args.suite, args.data_dir, args.n, bundle.tokenizer,
                           bundle.config.block_size - args.max_new_tokens)

    def run(d, prompt, seed):
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=seed)
        steps, ev = [], None
        t0 = last = time.perf_counter()
        for ev in generate(model, prompt["prompt_ids"], params, d, tokenizer=bundle.tokenizer, cache=model.new_cache()):
            now, s = time.perf_counter(), ev.step
            if s.verify_steps:  # the first event is the prefill's token
                steps.append((now - last, s.draft_tokens, s.accepted_tokens, s.skipped_proposals, s.drafter_time_s,
                              s.guess_tokens))
            last = now
        return time.perf_counter() - t0, ev.stats.generated_tokens, steps

    groups = collections.defaultdict(lambda: [0, 0.0, 0, 0, 0.0])
    wall, tokens = {"none": 0.0, args.drafter: 0.0}, {"none": 0, args.drafter: 0}
    for i, prompt in enumerate(prompts):
        order = [("none", None), (args.drafter, drafter)]
        for name, d in (order if i % 2 == 0 else order[::-1]):
            w, n, steps = run(d, prompt, 1000 + i)
            wall[name] += w
            tokens[name] += n
            for dt, drafted, acc, skipped, dtime, guess in steps:
                key = (name, "fallback or none" if skipped else "asked", min(drafted, 3), "guess" if guess else "")
                g = groups[key]
                g[0] += 1
                g[1] += dt
                g[2] += drafted
                g[3] += acc
                g[4] += dtime
    rows = []
    for key in sorted(groups):
        n, t, drafted, acc, dtime = groups[key]
        rows.append({"engine": key[0], "drafter_was": key[1], "drafted": key[2], "guess": bool(key[3]), "steps": n,
                     "ms_per_step": t / n * 1e3, "drafted_tokens": drafted, "accepted": acc,
                     "drafter_ms_per_step": dtime / n * 1e3})
    rate = {k: tokens[k] / wall[k] for k in wall}
    report = {"bundle": args.bundle, "cpu": cpu_summary(), "precision": kplan.precision, "suite": args.suite,
              "prompts": len(prompts), "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
              "tokens_per_s": rate, "drafter_vs_vanilla": rate[args.drafter] / rate["none"], "groups": rows,
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(f"{args.suite}, T={args.temperature:g}, {kplan.precision}: vanilla {rate['none']:.1f} tokens/s, "
          f"{args.drafter} {rate[args.drafter]:.1f} ({report['drafter_vs_vanilla']:.3f}x)")
    print("| engine | drafter was | drafted | guess | steps | ms/step | drafted tokens | accepted | drafter ms/step |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['engine']} | {r['drafter_was']} | {r['drafted']} | {'yes' if r['guess'] else ''} | {r['steps']} | "
              f"{r['ms_per_step']:.2f} | {r['drafted_tokens']} | {r['accepted']} | {r['drafter_ms_per_step']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gate-breakdown-{Path(args.bundle).name}-{cpu_slug()}-{args.suite}-T{args.temperature:g}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
