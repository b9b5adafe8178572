"""How often would a one-token guess be accepted? Prompt lookup against the corpus bigram.

Generates vanilla continuations of a benchmark suite (the same prompts
``treespec bench`` uses), then scores every generated position with the
model's own distribution p there (after temperature): a drafted token d is
accepted with probability p(d) under exact speculative sampling, and with
probability 1 or 0 under greedy decoding. For each position it compares

- prompt lookup's candidate (the token that followed the longest earlier
  match of the context's last 1-3 tokens), where there is one, and
- the corpus bigram's guess (``draft/corpus.py``: the newest token's most
  frequent follower in the training split, read from the bundle's drafter),

and prints E[p(d)] for each, split by the lookup's match length (0: no
match). The tree drafter uses the guess only where the match length is 0::

    python bench/corpus_probe.py --bundle models/default --suite prose --temperature 0.8
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def main() -> None:
    from treespec.cli.bench import corpus_suite
    from treespec.draft.corpus import CorpusBigram
    from treespec.draft.loop import generate_all
    from treespec.draft.ngram import ngram_candidate
    from treespec.draft.types import SamplingParams
    from treespec.model import load_bundle
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--data-dir", default="data/default")
    ap.add_argument("--suite", default="prose", choices=("code", "prose"))
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    model, tok = bundle.model, bundle.tokenizer
    entry = json.loads((bundle.draft_dir / "meta.json").read_text())["settings"].get("corpus_bigram")
    if not entry:
        raise SystemExit(f"{bundle.draft_dir}: no corpus bigram; run "
                         f"`treespec draft-fit --bundle {args.bundle} --corpus-bigram only`")
    corpus = CorpusBigram.load(bundle.draft_dir / entry["file"], entry["sha256"])
    T = args.temperature
    # match length -> [positions, sum p(lookup), sum p(guess), positions with a guess]
    acc: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0])
    for i, p in enumerate(corpus_suite(args.suite, args.data_dir, args.n, tok)):
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=T,
                                seed=args.seed + i if T > 0 else None)
        out = generate_all(model, p["prompt_ids"], params, None, tokenizer=tok)
        ids = p["prompt_ids"] + out.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[-1][0, :, :tok.n_vocab].float()
        probs = torch.softmax(logits / T, -1) if T > 0 else \
            torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        for j in range(len(p["prompt_ids"]), len(ids)):  # position j, predicted from ids[:j]
            ctx = ids[:j]
            cand, match = ngram_candidate(ctx)
            guess = corpus.candidate(ctx[-1])
            a = acc[match]
            a[0] += 1
            a[1] += probs[j - 1, cand].item() if cand is not None else 0.0
            if guess is not None:
                a[2] += probs[j - 1, guess].item()
                a[3] += 1
    total = sum(a[0] for a in acc.values())
    mode = "greedy" if T == 0 else f"T={T:g}"
    print(f"{args.bundle} · {args.suite} · {mode} · {args.n} prompts × {args.max_new_tokens} tokens: "
          f"{total} positions")
    print("| match length | share of positions | E p(lookup) | E p(corpus guess) |")
    print("| --- | --- | --- | --- |")
    for m in sorted(acc):
        n, s_look, s_guess, n_guess = acc[m]
        look = "-" if m == 0 else f"{s_look / n:.3f}"
        print(f"| {m} | {n / total:.3f} | {look} | {s_guess / n:.3f} |")


if __name__ == "__main__":
    main()
