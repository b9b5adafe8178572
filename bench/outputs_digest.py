"""Every benchmark prompt's generated tokens, per drafter and decoding mode, as JSON.

A change that must not change outputs (a refactor, a kernel that claims to
be exact) is checked by running this before and after and comparing::

    python bench/outputs_digest.py --out before.json      # on the old code
    python bench/outputs_digest.py --out after.json --compare before.json

Greedy and seeded sampling (prompt i with seed i), on the code and prose
suites of ``treespec bench``, with every drafter. Besides the tokens it keeps
the prompt-lookup drafter's counters (drafted and accepted per position):
they depend on nothing but the context, so they must match too. The tree's
counters are not compared: its gate weighs proposals by their timed cost.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from treespec.cli.bench import corpus_suite
from treespec.draft.loop import generate_all
from treespec.draft.registry import make_drafter
from treespec.draft.types import SamplingParams
from treespec.model.kernels import load_for_inference

DETERMINISTIC = ("ngram",)  # drafters whose counters depend only on the context


def digest(bundle_path: str, data_dir: str, n: int, max_new: int, dtype: str) -> dict:
    bundle, kernels = load_for_inference(bundle_path, dtype)
    out = {"bundle": bundle_path, "weights_sha256": bundle.weights_sha256, "precision": kernels.precision,
           "runs": {}}
    drafters = {name: make_drafter(name, bundle) for name in ("none", "ngram", "tree")}
    for suite in ("code", "prose"):
        prompts = corpus_suite(suite, data_dir, n, bundle.tokenizer)
        for mode, temperature in (("greedy", 0.0), ("T0.8", 0.8)):
            for name, d in drafters.items():
                rows = []
                for i, p in enumerate(prompts):
                    params = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=i)
                    r = generate_all(bundle.model, p["prompt_ids"], params, d, tokenizer=bundle.tokenizer)
                    row = {"id": p["id"], "tokens": r.token_ids, "finish": r.finish_reason}
                    if name in DETERMINISTIC:
                        row["drafted_per_position"] = r.stats.drafted_per_position
                        row["accepted_per_position"] = r.stats.accepted_per_position
                    rows.append(row)
                out["runs"][f"{suite}/{mode}/{name}"] = rows
    return out


def compare(a: dict, b: dict) -> list[str]:
    if a["precision"] != b["precision"]:  # --dtype auto chooses by timing, so two runs may differ here
        return [f"precision {a['precision']} against {b['precision']}: pin --dtype to compare"]
    diffs = []
    for key in sorted(set(a["runs"]) | set(b["runs"])):
        ra, rb = a["runs"].get(key), b["runs"].get(key)
        if ra is None or rb is None:
            diffs.append(f"{key}: only in one file")
            continue
        for x, y in zip(ra, rb):
            if x != y:
                diffs.append(f"{key} prompt {x['id']}: differs")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--data-dir", default="data/default")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="auto",
                    help="auto times the precisions at load and may pick another one on the next run; "
                         "pin it (int8, w8a8, ...) when comparing (default: %(default)s)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="an earlier digest: exit 1 if anything differs")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    d = digest(args.bundle, args.data_dir, args.n, args.max_new_tokens, args.dtype)
    with open(args.out, "w") as f:
        json.dump(d, f)
    n = sum(len(r) for r in d["runs"].values())
    print(f"wrote {args.out}: {n} generations ({d['precision']})")
    if args.compare:
        with open(args.compare) as f:
            diffs = compare(json.load(f), d)
        for line in diffs:
            print("DIFF", line)
        print(f"{'identical' if not diffs else f'{len(diffs)} differences'} against {args.compare}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
