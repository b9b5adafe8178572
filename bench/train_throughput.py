"""Training throughput: tokens/s of the trainer's own optimizer step, fp32 against bf16 autocast.

    python bench/train_throughput.py --preset cpu-default --losses fused,logits --modes fp32

    python bench/train_throughput.py --preset cpu-default
    python bench/train_throughput.py --preset cpu-default --steps 3 -- --model.n_layer=2 --batch_size=2

It times ``Run.train_step`` itself (micro-batches, multi-exit loss with the
preset's ``exit_sample_frac``, clipping, AdamW), on random tokens written to a
temporary data folder, so the figure is what ``treespec train`` gets, minus
evaluation and checkpoints. Anything after ``--`` is a ``--key=value``
TrainConfig override, exactly as ``treespec train`` takes them.

The modes run interleaved, one step each in rotating order. ``--losses
logits`` times the loss as it was before the chunked ``LinearCrossEntropy``
(whole logits, then F.cross_entropy), for an A/B of that change.

bf16 autocast pays on CPUs with native bf16 dot products (AVX-512 BF16 or
AMX); elsewhere it can be slower than fp32. The CPU flags are printed so the
figures can be read against them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from treespec.model.kernels import cpu_summary
from treespec.training.config import build_train_config
from treespec.training.train import Run


def fake_data_dir(root: Path, n_tokens: int, seed: int = 0) -> Path:
    """train/val/test memmaps of random token ids and the meta.json Run reads."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        rng.integers(0, 50257, n_tokens, dtype=np.uint16).tofile(root / f"{split}.bin")
    span = {"fake": {"start": 0, "end": n_tokens, "tokens": n_tokens, "documents": 1}}
    meta = {"sources": ["random"], "splits": {s: {"tokens": n_tokens, "domains": span} for s in ("train", "val", "test")}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def logits_loss(model):
    """Make ``model``'s training forward materialise the logits and take
    F.cross_entropy of them, as it did before ``LinearCrossEntropy``."""
    plain = type(model).forward

    def forward(*args, **kwargs):
        return plain(model, *args, **{**kwargs, "return_logits": True})
    model.forward = forward


def build(cfg, bf16: bool, loss: str) -> dict:
    run = Run(replace(cfg, autocast_bf16="on" if bf16 else "off"), command_line="bench")
    run.model.train()
    if loss == "logits":
        logits_loss(run.model)
    name = ("bf16 autocast" if bf16 else "fp32") + ("" if loss == "fused" else ", logits loss")
    return {"name": name, "run": run, "times": []}


def time_interleaved(modes: list[dict], steps: int, warmup: int) -> None:
    """One step of each mode in turn, the order rotating every round, so a
    slow spell of the machine falls on every mode alike."""
    for m in modes:
        for _ in range(warmup):  # first steps allocate, and on CUDA compile
            m["run"].train_step()
    for r in range(steps):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            run = m["run"]
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run.train_step()  # ends in .item(): the step is finished when it returns
            m["times"].append(time.perf_counter() - t0)


def summary(m: dict, cfg) -> dict:
    tokens = cfg.tokens_per_step()
    med = statistics.median(m["times"])
    return {"mode": m["name"], "tokens_per_step": tokens, "s_per_step": med, "tokens_per_s": tokens / med,
            "s_per_step_all": m["times"], "steps_timed": len(m["times"]), "device": str(m["run"].device),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-default", help="training preset (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--losses", default="fused", help="comma-separated: fused (the trainer's chunked "
                    "LinearCrossEntropy), logits (whole logits, then F.cross_entropy)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args, overrides = ap.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"fp32", "bf16"}:
        ap.error(f"--modes must be fp32 and/or bf16, got {args.modes!r}")
    losses = [m.strip() for m in args.losses.split(",") if m.strip()]
    if not losses or set(losses) - {"fused", "logits"}:
        ap.error(f"--losses must be fused and/or logits, got {args.losses!r}")

    with tempfile.TemporaryDirectory() as tmp:
        base = build_train_config(args.preset, None, overrides)
        n = max(4 * base.batch_size * (base.seq_len + 1), 65536)
        cfg = replace(base, data_dir=str(fake_data_dir(Path(tmp), n)), out_dir=str(Path(tmp) / "out"),
                      progress=False)
        g = cfg.gpt_config()
        print(f"preset {args.preset}: {g.n_layer} layers x {g.n_embd}, exits {list(g.exit_layers)}, "
              f"dwa={g.dwa}, batch {cfg.batch_size} x {cfg.seq_len} x accum {cfg.grad_accum}, "
              f"exit_sample_frac={cfg.exit_sample_frac}, lr_schedule={cfg.lr_schedule}")
        cpu = cpu_summary()
        print(f"cpu: {cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '?'}; "
              f"torch {torch.__version__}")
        runs = [build(cfg, m == "bf16", loss) for m in modes for loss in losses]
        time_interleaved(runs, args.steps, args.warmup)
        results = [summary(m, cfg) for m in runs]

    print(f"\n| mode | device | threads | tokens/step | s/step (median of {args.steps}) | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['mode']} | {r['device']} | {r['threads']} | {r['tokens_per_step']} | "
              f"{r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} |")
    for r in results[1:]:
        print(f"{r['mode']} / {results[0]['mode']}: {r['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "overrides": overrides,
                                               "cpu": cpu_summary(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
