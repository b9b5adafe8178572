"""Where a vanilla decode step's time goes: the model's forward, and everything else.

    python bench/decode_overhead.py --bundle models/default --dtype int8 --temperature 0 0.8

Greedy or seeded sampled vanilla decoding of one code prompt (the start of model/gpt.py),
``--tokens`` new tokens, ``--reps`` times; each run's wall time per token is split into
the time inside ``GPT.forward_step`` and the rest (choosing the token, the log-probabilities,
the decode loop and detokenisation). Medians over the repetitions. Also the per-token helpers
against torch on 50257 logits: the sampling race (compiled, and torch's full race over the same
uniforms) and greedy's argmax + log-sum-exp for 1 and 6 rows. Writes
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

    from treespec.draft.loop import generate_all
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
    report["helpers_ms"] = helpers()
    for name, ms in report["helpers_ms"].items():
        print(f"{name}: {ms:.3f} ms")
    out = Path(args.out) / f"decode-overhead-{Path(args.bundle).name}-{cpu_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def helpers(reps: int = 300) -> dict[str, float]:
    """Median ms of the per-token helpers, compiled against torch's way."""
    from treespec.draft.sampling import PositionDraws, make_generator, race_uniforms
    from treespec.model.kernels import argmax_logsumexp

    def ms(f) -> float:
        for _ in range(10):
            f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return round(statistics.median(ts) * 1e3, 4)

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50257, generator=g) / 0.8, dim=0)
    draws = PositionDraws(4, make_generator(1))
    seed = draws.seeds[0][0]
    out = {"race_compiled": ms(lambda: draws.token(p, 0)),
           "race_torch": ms(lambda: int(torch.argmax(p / race_uniforms(p.numel(), seed).log_().neg_())))}
    for rows in (1, 6):
        x = torch.randn(rows, 50304, generator=g)[:, :50257]
        out[f"argmax_lse_{rows}_rows_compiled"] = ms(lambda: argmax_logsumexp(x))
        out[f"argmax_lse_{rows}_rows_torch"] = ms(lambda: (x.argmax(dim=-1).tolist(), torch.logsumexp(x, dim=-1)))
    return out


if __name__ == "__main__":
    sys.exit(main())
