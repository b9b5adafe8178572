"""What each serving precision costs in quality: held-out loss against float32, per domain.

    python bench/precision_quality.py --bundle models/default --data-dir data/default

The model runs as it is served (``model.kernels.plan`` at each precision, on this machine's
chosen kernels), over windows of the test split fed through the KV cache in chunks of
``--chunk`` tokens: the row count of a verify step, so the kernels measured are the ones a
decode step uses. Every precision scores the same tokens, so the differences are paired.
Bounds (issue #16): bfloat16 at most +0.005 nats/token, int8 at most +0.02, on every domain.
It also reports each precision's mean KL divergence from float32's predictions on the same
tokens: the statistic ``auto`` checks at load on two short texts (``model.kernels.quality_cost``).
Writes bench/results/precision-quality-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
from treespec.model.kernels import QUALITY_BOUNDS as BOUNDS  # noqa: E402


def windows(data_dir: str, per_domain: int, length: int) -> dict[str, list[np.ndarray]]:
    """``per_domain`` windows of ``length`` tokens from each domain's test documents, spread evenly."""
    from treespec.training.data import load_meta, load_split

    meta, tokens = load_meta(data_dir), load_split(data_dir, "test")
    out = {}
    for domain in meta["domains"]:
        docs = [d for d in meta["splits"]["test"]["document_list"] if d["domain"] == domain]
        stream = np.concatenate([tokens[d["start"]:d["end"]] for d in docs]).astype(np.int64)
        starts = np.linspace(0, len(stream) - length - 1, per_domain).astype(int)
        out[domain] = [stream[s:s + length + 1] for s in starts]
    return out


@torch.no_grad()
def score(model, wins: list[np.ndarray], chunk: int, base: list[torch.Tensor] | None = None):
    """Mean loss over the windows and, against ``base`` (float32's log-probabilities per
    window), the mean KL(float32 || this) per token; returns (loss, kl, log-probabilities),
    the last only without ``base`` (float32's run, kept for the others)."""
    cache, total, kl, n, logps = model.new_cache(), 0.0, 0.0, 0, []
    for i, w in enumerate(wins):
        ids = torch.from_numpy(w)
        cache.reset()
        lp = torch.cat([model.forward_step(ids[s:min(s + chunk, len(w) - 1)][None], s, cache).logits[0, :, :50257]
                        for s in range(0, len(w) - 1, chunk)]).float().log_softmax(-1)
        total += F.nll_loss(lp, ids[1:], reduction="sum").item()
        if base is not None:
            kl += F.kl_div(lp, base[i], log_target=True, reduction="sum").item()
        n += len(w) - 1
        if base is None:
            logps.append(lp)
    return total / n, kl / n if base is not None else 0.0, logps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--data-dir", default="data/default")
    ap.add_argument("--windows", type=int, default=32, help="windows per domain")
    ap.add_argument("--length", type=int, default=256, help="tokens per window")
    ap.add_argument("--chunk", type=int, default=8, help="tokens per forward (a verify step's rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    from treespec.model import load_bundle
    from treespec.model.kernels import PRECISIONS, cpu_slug, cpu_summary, plan

    bundle = load_bundle(args.bundle)
    wins = windows(args.data_dir, args.windows, args.length)
    losses, kls, plans, secs = {p: {} for p in PRECISIONS}, {p: {} for p in PRECISIONS if p != "float32"}, {}, {}
    for d, w in wins.items():  # one domain at a time: float32's log-probabilities are held for the KL
        base = None
        for p in PRECISIONS:
            plans[p] = plan(bundle.model, p).to_dict()["choices"]
            t = time.perf_counter()
            losses[p][d], kl, logps = score(bundle.model, w, args.chunk, base)
            base = base or logps
            if p != "float32":
                kls[p][d] = kl
            secs[p] = secs.get(p, 0.0) + time.perf_counter() - t
            print(f"{d:12} {p:9} loss {losses[p][d]:.4f}" + (f"  KL {kl:.5f}" if p != "float32" else "")
                  + f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        del base
    delta = {p: {d: losses[p][d] - losses["float32"][d] for d in wins} for p in PRECISIONS if p != "float32"}
    within = {p: all(v <= BOUNDS[p] for v in delta[p].values()) for p in delta}
    report = {"bundle": args.bundle, "weights_sha256": bundle.weights_sha256, "cpu": cpu_summary(),
              "windows_per_domain": args.windows, "window_tokens": args.length, "chunk": args.chunk,
              "tokens_per_domain": args.windows * args.length, "loss": losses, "delta_vs_float32": delta,
              "kl_from_float32": kls,
              "bounds": BOUNDS, "within_bounds": within, "kernel_choices": plans,
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    slug = cpu_slug()
    out = Path(args.out) / f"precision-quality-{Path(args.bundle).name}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for p, d in delta.items():
        print(f"{p}: " + ", ".join(f"{k} {v:+.4f} nats/token (KL {kls[p][k]:.4f})" for k, v in d.items())
              + f" (bound {BOUNDS[p]} on the loss: {'within' if within[p] else 'EXCEEDED'})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
