"""``treespec train``: train a multi-exit GPT from scratch (or on from a bundle), end to end.

Settings are TrainConfig's fields: its defaults, then ``--preset``, then a
``--config`` JSON file, then free-form ``--key=value`` overrides (which
treespec.cli passes through as ``args.overrides``; treespec.training.config
parses them). The run itself, on one process or several under
``torchrun -m treespec.cli train``, is treespec.training.train's ``Run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub, name: str) -> None:
    from ..training.config import TRAIN_PRESETS, config_help

    p = sub.add_parser(name, help="train a multi-exit GPT (any TrainConfig field as --key=value)",
                       description="Train a multi-exit GPT from scratch (or on from a bundle), end to end. "
                                   "Settings: the defaults below, then --preset, then --config, then "
                                   "--key=value. Presets: " + ", ".join(
                                       f"{k} ({', '.join(f'{f}={v}' for f, v in p.items())})"
                                       for k, p in TRAIN_PRESETS.items()) + ".",
                       epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="cpu-default | gpt2-small")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from ckpt.pt")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch.distributed as dist

    from ..training.config import TrainConfigError, build_train_config
    from ..training.train import Run

    try:
        cfg = build_train_config(args.preset, args.config, args.overrides)
        result = Run(cfg, resume=args.resume).train()
    except TrainConfigError as e:
        print(f"treespec train: error: {e}", file=sys.stderr)
        return 2
    finally:
        # Run joins torchrun's process group; leave it before the process exits.
        if dist.is_initialized():
            dist.destroy_process_group()
    # Only the rank that wrote the bundle has these figures (a stopped run has none).
    if "final_val_loss" in result:
        print(json.dumps({"bundle": str(Path(cfg.out_dir) / "bundle"), "tokens_seen": result["tokens_seen"],
                          "final_val_loss": result["final_val_loss"]}, indent=2))
    return 0
