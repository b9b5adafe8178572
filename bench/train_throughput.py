"""Training throughput: tokens/s of the trainer's own optimizer step, fp32 against bf16 autocast.

    python bench/train_throughput.py --preset cpu-default
    python bench/train_throughput.py --preset cpu-default --steps 3 -- --model.n_layer=2 --batch_size=2

It times ``Run.train_step`` itself (micro-batches, multi-exit loss with the
preset's ``exit_sample_frac``, clipping, AdamW), on random tokens written to a
temporary data folder, so the figure is what ``treespec train`` gets, minus
evaluation and checkpoints. Anything after ``--`` is a ``--key=value``
TrainConfig override, exactly as ``treespec train`` takes them.

bf16 autocast pays on CPUs with native bf16 dot products (AVX-512 BF16 or
AMX); elsewhere it can be slower than fp32. The CPU flags are printed so the
figures can be read against them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from treespec.training.config import build_train_config
from treespec.training.train import Run


def cpu_features() -> list[str]:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in set(flags) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def fake_data_dir(root: Path, n_tokens: int, seed: int = 0) -> Path:
    """train/val/test memmaps of random token ids and the meta.json Run reads."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        rng.integers(0, 50257, n_tokens, dtype=np.uint16).tofile(root / f"{split}.bin")
    span = {"fake": {"start": 0, "end": n_tokens, "tokens": n_tokens, "documents": 1}}
    meta = {"sources": ["random"], "splits": {s: {"tokens": n_tokens, "domains": span} for s in ("train", "val", "test")}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def time_mode(cfg, bf16: bool, steps: int, warmup: int) -> dict:
    run = Run(replace(cfg, autocast_bf16="on" if bf16 else "off"), command_line="bench")
    run.model.train()
    for _ in range(warmup):  # first steps allocate, and on CUDA compile
        run.train_step()
    times = []
    for _ in range(steps):
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run.train_step()  # ends in .item(): the step is finished when it returns
        times.append(time.perf_counter() - t0)
    tokens = cfg.tokens_per_step()
    med = statistics.median(times)
    return {"mode": "bf16 autocast" if bf16 else "fp32", "tokens_per_step": tokens, "s_per_step": med,
            "tokens_per_s": tokens / med, "steps_timed": steps, "device": str(run.device),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-default", help="training preset (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--modes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--json", default=None, help="also write the results here")
    args, overrides = ap.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"fp32", "bf16"}:
        ap.error(f"--modes must be fp32 and/or bf16, got {args.modes!r}")

    with tempfile.TemporaryDirectory() as tmp:
        base = build_train_config(args.preset, None, overrides)
        n = max(4 * base.batch_size * (base.seq_len + 1), 65536)
        cfg = replace(base, data_dir=str(fake_data_dir(Path(tmp), n)), out_dir=str(Path(tmp) / "out"),
                      progress=False)
        g = cfg.gpt_config()
        print(f"preset {args.preset}: {g.n_layer} layers x {g.n_embd}, exits {list(g.exit_layers)}, "
              f"dwa={g.dwa}, batch {cfg.batch_size} x {cfg.seq_len} x accum {cfg.grad_accum}, "
              f"exit_sample_frac={cfg.exit_sample_frac}, lr_schedule={cfg.lr_schedule}")
        print(f"cpu: {platform.processor() or platform.machine()}, flags {' '.join(cpu_features()) or '?'}; "
              f"torch {torch.__version__}")
        results = [time_mode(cfg, m == "bf16", args.steps, args.warmup) for m in modes]

    print(f"\n| mode | device | threads | tokens/step | s/step (median of {args.steps}) | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['mode']} | {r['device']} | {r['threads']} | {r['tokens_per_step']} | "
              f"{r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} |")
    if len(results) == 2:
        print(f"\nbf16 autocast / fp32: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "overrides": overrides,
                                               "cpu_flags": cpu_features(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
