"""What applying the penalties costs a verify step, by its row count.

    python bench/penalty_cost.py

Times ``draft.sampling.Penalties.apply`` (sparse: only the columns of tokens
already there) against the same penalties computed over whole (rows, V)
masks, as treespec did before December 2026, on a 200-token prompt and 100
generated tokens, 50,304 logits a row. Either is paid once per decode step on
top of the forward, so it is what an extra draft position costs beyond the
verify curve when a request has penalties. Writes bench/results/penalty-cost-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def dense(seen: torch.Tensor, count: torch.Tensor, logits: torch.Tensor, drafts: list[int], r: float, f: float,
          a: float) -> torch.Tensor:
    """The penalties over whole (rows, V) masks: the earlier implementation, for the comparison."""
    T = logits.size(0)
    seen, count = seen.expand(T, -1).clone(), count.expand(T, -1).clone()
    for j, d in enumerate(drafts[:T - 1], start=1):
        seen[j:, d] = True
        count[j:, d] += 1
    z = logits.float()
    if r != 1.0:
        z = torch.where(seen, torch.where(z > 0, z / r, z * r), z)
    if f or a:
        z = z - f * count - a * (count > 0).float()
    return z


def per_call_ms(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from treespec.draft.sampling import Penalties
    from treespec.draft.types import SamplingParams
    from treespec.model.kernels import cpu_slug, cpu_summary

    V, prompt, generated = 50304, list(range(100, 300)), list(range(1000, 1100))
    rows = []
    for kind, kw in (("repetition 1.3", dict(repetition_penalty=1.3)),
                     ("frequency 0.5 + presence 0.2", dict(frequency_penalty=0.5, presence_penalty=0.2))):
        params = SamplingParams(**kw)
        pen = Penalties(prompt, V, params)
        seen, count = torch.zeros(V, dtype=torch.bool), torch.zeros(V)
        seen[prompt] = True
        for t in generated:
            pen.push(t)
            seen[t] = True
            count[t] += 1
        for T in (1, 2, 5, 9):
            logits = torch.randn(T, V)
            drafts = list(range(5000, 5000 + T - 1))
            assert torch.equal(pen.apply(logits, drafts), dense(seen, count, logits, drafts, params.repetition_penalty,
                                                                params.frequency_penalty, params.presence_penalty))
            d = per_call_ms(lambda: dense(seen, count, logits, drafts, params.repetition_penalty,
                                          params.frequency_penalty, params.presence_penalty), args.reps)
            s = per_call_ms(lambda: pen.apply(logits, drafts), args.reps)
            rows.append({"penalty": kind, "rows": T, "dense_ms": round(d, 4), "sparse_ms": round(s, 4)})
            print(f"{kind:30} {T} rows: dense {d:.3f} ms, sparse {s:.3f} ms ({d / s:.1f}x)")
    out = Path(args.out) / f"penalty-cost-{cpu_slug()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_summary(), "threads": args.threads, "vocab": V, "prompt_tokens": len(prompt),
                               "generated_tokens": len(generated), "rows": rows, "argv": sys.argv}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
