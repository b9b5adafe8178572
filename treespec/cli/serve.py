"""``treespec serve``: run the HTTP server on a bundle.

Every flag has a ``TREESPEC_*`` environment variable (``--max-running`` is
``TREESPEC_MAX_RUNNING``); a flag given on the command line wins over the
environment, which wins over the default. Prefer ``TREESPEC_API_KEY`` to
``--api-key``: command lines are visible to every user of the machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from ..server.settings import ENV_PREFIX, Settings, SettingsError, load_settings

# (The docstring above is the command's --help text. The server itself, uvicorn
# around build_app, is treespec.server.serve's ``serve``; this module reads the
# flags, sets up logging and reports what went wrong.)

# One line per setting for --help; the flags themselves come from Settings' fields.
HELP = {
    "bundle": "model bundle directory",
    "host": "interface to listen on",
    "port": "port to listen on (0: any free port, printed at startup)",
    "api_key": "require 'Authorization: Bearer KEY' on the generate routes",
    "max_running": "requests that take turns on the model at once",
    "max_waiting": "requests admitted to wait for a turn; beyond both, 429",
    "batching": "run the running requests' forwards as one batch (off: one at a time, each bit for bit a solo run)",
    "max_body_bytes": "larger request bodies get 413",
    "default_max_new_tokens": "max_new_tokens / max_tokens when a request leaves it out",
    "default_drafter": "auto (the bundle's tree drafter if it has one, else ngram), tree, ngram or none",
    "calibrate_drafter": "time the tree drafter's verify cost on this machine at startup (about 2 s)",
    "cors_origins": "comma-separated origins allowed by CORS (default: CORS off)",
    "model_name": "model name reported by /info and /v1/completions (default: the bundle directory name)",
    "device": "torch device for the model",
    "dtype": "weight precision: auto (the fastest timed here within the quality bounds), float32, bfloat16, int8 or w8a8",
    "threads": "torch intra-op threads (0: torch's default)",
    "graceful_timeout_s": "on shutdown, seconds to let in-flight requests finish before cancelling them",
    "log_level": "uvicorn/treespec log level",
    "debug_faults": "TEST ONLY: [[fail]] / [[slow]] prompt prefixes inject faults and delays",
}


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="serve a bundle over HTTP (TGI and OpenAI compatible)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-").removesuffix("-s")
        env = ENV_PREFIX + f.name.upper()
        default = getattr(defaults, f.name)
        if isinstance(default, list):
            default = ",".join(default) or "off"
        text = f"{HELP.get(f.name, '')} [env {env}; default {default}]"
        kind = str(f.type)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind.startswith("list"):
            p.add_argument(flag, dest=f.name, default=None, help=text,
                           type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
        else:
            conv = int if kind == "int" else float if kind == "float" else str
            p.add_argument(flag, dest=f.name, default=None, type=conv, help=text)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..server.serve import port_in_use, serve

    try:
        settings = load_settings(vars(args))
    except SettingsError as e:
        print(f"treespec serve: {e}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("treespec").setLevel(level)
    busy = port_in_use(settings.host, settings.port)
    if busy:  # say so before spending seconds loading a model that could never be served
        print(f"treespec serve: cannot listen on {settings.host}:{settings.port}: {busy}. Is another server "
              f"running there? Stop it, or pick another port with --port (0 picks a free one).", file=sys.stderr)
        return 1
    scheduler = serve(settings)
    if scheduler.state == "failed":
        print(f"treespec serve: {scheduler.load_error}", file=sys.stderr)
        return 1
    return 0
