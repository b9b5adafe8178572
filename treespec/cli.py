"""The treespec command line: train, draft, generate, bench and serve small GPTs.

Each subcommand lives in its own module, which registers itself through
``add_parser(subparsers, name)`` and sets ``func`` to the function that does
the work.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# subcommand -> module that defines add_parser(subparsers) and run(args)
COMMANDS = {
    "inspect": "treespec.model.inspect",
    "prepare-data": "treespec.training.data",
    "train": "treespec.training.train",
    "model-card": "treespec.training.model_card",
    "generate": "treespec.draft.generate_cli",
    "bench": "treespec.draft.bench",
    "serve": "treespec.server.serve",
    "loadtest": "treespec.server.loadtest",
    "draft-fit": "treespec.draft.fit",
    "import": "treespec.model.convert_cli",
    "export": "treespec.model.convert_cli",
    "chat-template": "treespec.server.chat",
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


if __name__ == "__main__":
    sys.exit(main())
