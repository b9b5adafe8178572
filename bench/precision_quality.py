"""What each serving precision costs in quality: held-out loss against float32, per domain.

    python bench/precision_quality.py --bundle models/default --data-dir data/default

The model runs as it is served (``model.kernels.plan`` at each precision, on this machine's
chosen kernels), over windows of the test split fed through the KV cache in chunks of
``--chunk`` tokens: the row count of a verify step, so the kernels measured are the ones a
decode step uses. Every precision scores the same tokens, so the differences are paired.
Bounds (issue #16): bfloat16 at most +0.005 nats/token, int8 at most +0.02, on every domain.
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
def mean_loss(model, wins: list[np.ndarray], chunk: int) -> float:
    cache, total, n = model.new_cache(), 0.0, 0
    for w in wins:
        ids = torch.from_numpy(w)
        cache.reset()
        for s in range(0, len(w) - 1, chunk):
            x = ids[s:min(s + chunk, len(w) - 1)][None]
            logits = model.forward_step(x, s, cache).logits[0, :, :50257].float()
            total += F.cross_entropy(logits, ids[s + 1:s + 1 + x.shape[1]], reduction="sum").item()
            n += x.shape[1]
    return total / n


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
    losses, plans, secs = {}, {}, {}
    for p in PRECISIONS:
        plans[p] = plan(bundle.model, p).to_dict()["choices"]
        t = time.perf_counter()
        losses[p] = {d: mean_loss(bundle.model, w, args.chunk) for d, w in wins.items()}
        secs[p] = time.perf_counter() - t
        print(f"{p:9} " + "  ".join(f"{d} {v:.4f}" for d, v in losses[p].items()) + f"  ({secs[p]:.0f} s)",
              file=sys.stderr)
    delta = {p: {d: losses[p][d] - losses["float32"][d] for d in wins} for p in PRECISIONS if p != "float32"}
    within = {p: all(v <= BOUNDS[p] for v in delta[p].values()) for p in delta}
    report = {"bundle": args.bundle, "weights_sha256": bundle.weights_sha256, "cpu": cpu_summary(),
              "windows_per_domain": args.windows, "window_tokens": args.length, "chunk": args.chunk,
              "tokens_per_domain": args.windows * args.length, "loss": losses, "delta_vs_float32": delta,
              "bounds": BOUNDS, "within_bounds": within, "kernel_choices": plans,
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    slug = cpu_slug()
    out = Path(args.out) / f"precision-quality-{Path(args.bundle).name}-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for p, d in delta.items():
        print(f"{p}: " + ", ".join(f"{k} {v:+.4f} nats/token" for k, v in d.items())
              + f" (bound {BOUNDS[p]}: {'within' if within[p] else 'EXCEEDED'})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
