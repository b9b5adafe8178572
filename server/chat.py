"""Chat prompts from the bundle's chat template.

A bundle carries its template in ``config.json`` under ``meta.chat_template``
(``treespec import`` keeps a Hugging Face model's; ``models/default`` ships a
plain transcript). It is Jinja with Hugging Face's semantics: rendered with
``messages`` (role and content), ``add_generation_prompt``, ``bos_token`` and
``eos_token``, the ``raise_exception`` and ``strftime_now`` helpers and the
``tojson`` filter, in Jinja's immutable sandbox, so a template from a
downloaded model cannot reach Python's insides. ``meta.chat_stop`` lists stop
strings a template's turns need on a model without an end-of-turn token
(the transcript's "\\nUser:"). ``treespec chat-template BUNDLE``
(treespec/cli/chat_template.py) shows, sets or removes a bundle's template.
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
