"""Chat prompts from the bundle's chat template.

A bundle carries its template in ``config.json`` under ``meta.chat_template``
(``treespec import`` keeps a Hugging Face model's; ``models/default`` ships a
plain transcript). It is Jinja with Hugging Face's semantics: rendered with
``messages`` (role and content), ``add_generation_prompt``, ``bos_token`` and
``eos_token``, the ``raise_exception`` and ``strftime_now`` helpers and the
``tojson`` filter, in Jinja's immutable sandbox, so a template from a
downloaded model cannot reach Python's insides. ``meta.chat_stop`` lists stop
strings a template's turns need on a model without an end-of-turn token
(the transcript's "\\nUser:").
"""

from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from treespec.model.tokenizer import EOT_TEXT


class ChatTemplateError(ValueError):
    """No template, a template that does not compile, or one that refused the messages."""


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special: str, stop: list[str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"the bundle's chat template does not compile: {e}") from None
        self.special = special  # GPT-2's one special token is both BOS and EOS
        self.stop = list(stop or [])

    @classmethod
    def of_bundle(cls, bundle) -> "ChatTemplate | None":
        source = bundle.meta.get("chat_template")
        if not source:
            return None
        if isinstance(source, list):  # HF's named templates: take "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        return cls(source, EOT_TEXT, bundle.meta.get("chat_stop", []))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.special, eos_token=self.special, tools=None,
                                        documents=None)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from None


# A plain transcript, for a base model that was never instruction-tuned (as
# models/default): system text first, then "User:" and "Assistant:" turns.
# The model continues the transcript; "\nUser:" stops it at its next turn.
TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% elif m.role == 'assistant' %}Assistant: {{ m.content }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
TRANSCRIPT_STOP = ["\nUser:"]


# --- treespec chat-template -------------------------------------------------

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
    import sys
    from pathlib import Path

    from treespec.model.bundle import BundleError, update_bundle_meta

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
            from treespec.model.bundle import _read_config

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
