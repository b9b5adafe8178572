"""``treespec generate``: one prompt in, generated text out, with any drafter."""

from __future__ import annotations

import json
import sys
import time

from ..draft.registry import DRAFTERS
from ..model.kernels import DTYPE_CHOICES


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="generate text from a prompt (vanilla or speculative)",
                       description="Generate a continuation of --prompt with a model bundle. The text is "
                                   "streamed to stdout; --json prints one JSON object with the token ids "
                                   "and the speculative decoding statistics instead.")
    p.add_argument("--bundle", default="models/default", help="model bundle directory (default: %(default)s)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads it from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 is off")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already in the prompt or the output by this (1.0 is off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="minus this per earlier occurrence in the output, -2 to 2 (0 is off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="minus this once a token is in the output, -2 to 2 (0 is off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--drafter", choices=("auto", *DRAFTERS), default="auto",
                   help="auto (the default, as `treespec serve`): the bundle's tree drafter when it has one "
                        "that loads, else ngram (prompt lookup); none is vanilla decoding")
    p.add_argument("--k-max", type=int, default=None, help="cap on draft length (default: the drafter's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weight precision of the matrix products; auto: the fastest timed on this CPU "
                        "within the quality bounds (default: %(default)s; docs/performance.md)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="keep the tree's fitted costs instead of timing them on this machine first (about 2 s)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the text")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..draft.loop import generate
    from ..draft.registry import DrafterUnavailable, auto_drafter, make_drafter
    from ..draft.types import SamplingParams
    from ..model import BundleError
    from ..model.kernels import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        bundle, kernels = load_for_inference(args.bundle, args.dtype)
        name = args.drafter
        if name == "auto":
            try:
                drafter = make_drafter("tree", bundle, calibrate=not args.no_calibrate)
                name = auto_drafter(["tree"])
            except (DrafterUnavailable, ValueError) as e:
                name = auto_drafter([])
                if (bundle.draft_dir / "meta.json").is_file():  # a tree that is there but broken: say why
                    print(f"note: the bundle's tree drafter cannot be used ({e}); drafting with {name}",
                          file=sys.stderr)
                drafter = make_drafter(name, bundle)
        else:
            drafter = make_drafter(name, bundle, calibrate=not args.no_calibrate)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                k_max=args.k_max, repetition_penalty=args.repetition_penalty,
                                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty)
        ids = bundle.tokenizer.encode(prompt)
        token_ids, texts, event = [], [], None
        t0 = time.perf_counter()
        for event in generate(bundle.model, ids, params, drafter, tokenizer=bundle.tokenizer):
            token_ids += event.tokens
            texts += event.texts
            if not args.json:
                sys.stdout.write("".join(event.texts))
                sys.stdout.flush()
        wall = time.perf_counter() - t0
    except (BundleError, DrafterUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = event.stats
    tps = stats.generated_tokens / wall if wall > 0 else 0.0
    if args.json:
        print(json.dumps({"text": "".join(texts), "token_ids": token_ids, "finish_reason": event.finish_reason,
                          "drafter": name, "stats": stats.to_dict(), "wall_s": wall,
                          "kernels": kernels.to_dict(),
                          "tokens_per_s": tps}, indent=2))
    else:
        sys.stdout.write("\n")
        print(f"[{stats.generated_tokens} tokens, {tps:.1f} tok/s, drafter {name}, {kernels.precision}, "
              f"tau {stats.mean_accepted_length:.2f}, finish {event.finish_reason}]", file=sys.stderr)
    return 0
