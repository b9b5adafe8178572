"""Where a vanilla decode step's time goes: the model's forward, and everything else.

    python bench/decode_overhead.py --bundle models/default --dtype int8 --temperature 0 0.8

Greedy or seeded sampled vanilla decoding of one code prompt (the start of model/gpt.py),
``--tokens`` new tokens, ``--reps`` times; each run's wall time per token is split into
the time inside ``GPT.forward_step`` and the rest (choosing the token, the log-probabilities,
the decode loop and detokenisation). Medians over the repetitions; writes
bench/results/decode-overhead-<bundle>-<cpu>.json.
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
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.8])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from treespec.draft.engine import generate_all
    from treespec.draft.types import SamplingParams
    from treespec.model.kernels import cpu_slug, cpu_summary, load_for_inference

    bundle, kp = load_for_inference(args.bundle, args.dtype)
    model, tok = bundle.model, bundle.tokenizer
    prompt = tok.encode((REPO / "model" / "gpt.py").read_text()[:800])
    inside = [0.0]
    forward = model.forward_step

    def timed(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        inside[0] += time.perf_counter() - t
        return out

    model.forward_step = timed
    report = {"bundle": args.bundle, "precision": kp.precision, "cpu": cpu_summary(), "threads": args.threads,
              "prompt_tokens": len(prompt), "new_tokens": args.tokens, "reps": args.reps, "temperature": {},
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    for temp in args.temperature:
        runs = []
        for r in range(args.reps + 1):  # the first warms up
            params = SamplingParams(max_new_tokens=args.tokens, temperature=temp, seed=r)
            inside[0] = 0.0
            t = time.perf_counter()
            out = generate_all(model, prompt, params, None, tokenizer=tok)
            wall = time.perf_counter() - t
            n = len(out.token_ids)
            if r:
                runs.append({"ms_per_token": wall / n * 1e3, "forward_ms": inside[0] / n * 1e3,
                             "rest_ms": (wall - inside[0]) / n * 1e3})
        med = {k: round(statistics.median(x[k] for x in runs), 3) for k in runs[0]}
        report["temperature"][str(temp)] = {"median": med, "runs": runs}
        print(f"T={temp:g}: {med['ms_per_token']:.3f} ms a token = forward {med['forward_ms']:.3f} "
              f"+ rest {med['rest_ms']:.3f}")
    out = Path(args.out) / f"decode-overhead-{Path(args.bundle).name}-{cpu_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
