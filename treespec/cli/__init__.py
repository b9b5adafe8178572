"""The treespec command line: train, draft, generate, bench and serve small GPTs.

Each subcommand lives in its own module of this package, which registers
itself through ``add_parser(subparsers, name)`` and sets ``func`` to the
function that runs it. Those modules hold the command line only (flags,
printing, exit codes); the work is done by the library packages
(treespec.model, treespec.training, treespec.draft, treespec.server), which
neither parse arguments nor act as HTTP clients.

``python -m treespec.cli`` runs the same command (__main__.py).
"""

from __future__ import annotations

import argparse
import importlib

from .. import __version__

# subcommand -> module that defines add_parser(subparsers) and run(args)
COMMANDS = {
    "inspect": "treespec.cli.inspect",
    "prepare-data": "treespec.cli.data",
    "train": "treespec.cli.train",
    "model-card": "treespec.cli.model_card",
    "generate": "treespec.cli.generate",
    "bench": "treespec.cli.bench",
    "serve": "treespec.cli.serve",
    "loadtest": "treespec.cli.loadtest",
    # Its command line still lives in the library module, which is being rewritten (issue #20).
    "draft-fit": "treespec.cli.draft_fit",
    "import": "treespec.cli.convert",
    "export": "treespec.cli.convert",
    "chat-template": "treespec.cli.chat_template",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treespec", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"treespec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `treespec train` takes free-form --key=value overrides; nothing else does.
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    return int(args.func(args) or 0)

