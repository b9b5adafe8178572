"""``treespec model-card BUNDLE``: write BUNDLE/README.md from what the bundle records.

The card (losses, samples, how to reproduce the weights) is written by
treespec.training.model_card's ``write_model_card``; this module is the
command line around it.
"""

from __future__ import annotations

import sys


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="write a bundle's README.md model card from its training summary")
    p.add_argument("bundle")
    p.add_argument("--loss-png", default=None, help="loss curve PNG to copy into the bundle")
    p.add_argument("--history", default=None, help="a paragraph on how the run really went (resumes, changes)")
    p.add_argument("--train-command", action="append", default=None,
                   help="a `treespec train` command that made these weights, in order; repeat it for a run "
                        "resumed with other settings (default: one uninterrupted run of the cpu-default preset)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.model_card import ModelCardError, write_model_card

    try:
        card = write_model_card(args.bundle, loss_png=args.loss_png, history=args.history,
                                train_commands=args.train_command)
    except ModelCardError as e:
        print(f"treespec model-card: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {card}")
    return 0
