"""``treespec chat-template BUNDLE``: show, set or remove a bundle's chat template.

The template lives in the bundle's ``config.json`` (``meta.chat_template`` and
``meta.chat_stop``); treespec.server.chat renders it (``ChatTemplate``) and
holds the plain transcript that ``--transcript`` sets.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="show, set or remove a bundle's chat template",
                       description="A bundle's chat template turns /v1/chat/completions messages into a "
                                   "prompt (Jinja, Hugging Face's chat_template semantics). With no option, "
                                   "print the template and a sample rendering.")
    p.add_argument("bundle", help="bundle directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--transcript", action="store_true",
                   help="set the plain User:/Assistant: transcript (for models not instruction-tuned)")
    g.add_argument("--file", help="set the template from this Jinja file")
    g.add_argument("--remove", action="store_true", help="remove the template (chat answers 400)")
    p.add_argument("--stop", action="append", default=None,
                   help="a stop string the template's turns need (repeatable; --transcript sets '\\nUser:')")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.bundle import BundleError, _read_config, update_bundle_meta
    from ..model.tokenizer import EOT_TEXT
    from ..server.chat import TRANSCRIPT_STOP, TRANSCRIPT_TEMPLATE, ChatTemplate, ChatTemplateError

    try:
        if args.transcript or args.file:
            source = TRANSCRIPT_TEMPLATE if args.transcript else Path(args.file).read_text()
            stop = args.stop if args.stop is not None else (TRANSCRIPT_STOP if args.transcript else [])
            ChatTemplate(source, EOT_TEXT, stop)  # refuse one that does not compile
            update_bundle_meta(args.bundle, chat_template=source, chat_stop=stop or None)
            print(f"{args.bundle}: chat template set", file=sys.stderr)
        elif args.remove:
            update_bundle_meta(args.bundle, chat_template=None, chat_stop=None)
            print(f"{args.bundle}: chat template removed", file=sys.stderr)
        else:
            # The bundle's config alone: the template is shown without loading the weights.
            meta = _read_config(Path(args.bundle))[0].get("meta", {})
            if not meta.get("chat_template"):
                print(f"{args.bundle} has no chat template (set one with --transcript or --file)")
                return 1
            t = ChatTemplate(meta["chat_template"], EOT_TEXT, meta.get("chat_stop", []))
            sample = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}]
            print(meta["chat_template"])
            print(f"--- stop strings: {t.stop!r}\n--- rendered for {sample}:\n{t.render(sample)!r}")
    except (OSError, BundleError, ChatTemplateError) as e:
        print(f"treespec chat-template: {e}", file=sys.stderr)
        return 2
    return 0
