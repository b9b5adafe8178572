"""``treespec bench``: speculative decoding measured the way Spec-Bench does.

Batch 1. Every prompt is run by every drafter before the next prompt starts
(the order rotates from prompt to prompt), so slow drifts of the machine (a
background job, thermal throttling) fall on all drafters alike. Greedy by
default; ``--temperature`` and ``--seed`` measure sampled decoding.

Per drafter it reports tokens/s, the speedup over vanilla (``none``, always
run) with a 95% bootstrap interval over the prompts (``ratio_ci``; the JSON
also has the interval against every other drafter), tau (tokens per verify
step, bonus included), the acceptance rate per draft position, the share of
wall time spent drafting, and whether every output was identical to
vanilla's (sampled runs too: prompt i is sampled with seed+i by every
drafter, and a seeded request gives the same tokens with any deterministic
drafter). It prints a table, writes JSON and a PNG, and exits with status 1
if any output differs.

A drafter may be named with a draft-length cap, ``NAME@K`` (``ngram@7``),
so a baseline can be compared at its best length and not only at its
default: ``--drafters none,ngram,ngram@7,tree``.

Suites ``code`` and ``prose`` come from the test split of a prepared corpus
(``treespec prepare-data``): each prompt is 64-128 tokens from a different
test document of that kind, at a seeded position, so the suite is the same
on every run. Your own ``files:`` corpus is kind ``text``, and any domain
can be named instead of a kind. ``FILE.jsonl`` takes one ``{"prompt": ...}``
per line.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..draft.costs import measure_verify_ms
from ..draft.registry import DRAFTERS
from ..draft.types import extend_costs
from ..model.kernels import BUSY_SHARE, DTYPE_CHOICES, CpuShare, cpu_model

PROMPT_MIN, PROMPT_MAX = 64, 128


# --- suites --------------------------------------------------------------------

def corpus_suite(kind: str, data_dir, n: int, tokenizer, max_prompt: int = PROMPT_MAX) -> list[dict]:
    """``n`` prompts of 64-128 tokens from test documents of ``kind``, one
    document after another (distinct documents first). ``kind`` is a kind of
    domain ("code", "prose", or "text" for a ``files:`` corpus) or the name
    of one domain of the corpus ("stdlib", "files")."""
    from ..training.data import load_meta, load_split

    meta = load_meta(data_dir)
    tokens = load_split(data_dir, "test")
    domains = meta["domains"]
    docs = [d for d in meta["splits"]["test"]["document_list"]
            if kind in (d["domain"], domains.get(d["domain"], {}).get("kind"))
            and d["end"] - d["start"] - 1 >= PROMPT_MIN]
    if not docs:
        kinds = sorted({str(v.get("kind")) for v in domains.values()})
        raise ValueError(f"{data_dir}: no test document of kind or domain {kind!r} with at least {PROMPT_MIN} "
                         f"tokens (kinds here: {', '.join(kinds)}; domains: {', '.join(sorted(domains))})")
    rng = random.Random(f"treespec-bench:{kind}")
    docs = sorted(docs, key=lambda d: d["id"])
    rng.shuffle(docs)
    eot = meta.get("eot_id", tokenizer.eot_id)
    prompts = []
    for i in range(n):
        d = docs[i % len(docs)]
        doc = tokens[d["start"]:d["end"]].tolist()
        if doc and doc[-1] == eot:
            doc = doc[:-1]
        length = min(rng.randint(PROMPT_MIN, max(PROMPT_MIN, max_prompt)), max_prompt, len(doc))
        start = rng.randint(0, len(doc) - length)
        # Begin on a fresh line when one is near, as a user's prompt would.
        for j in range(start, min(start + 32, len(doc) - length)):
            if tokenizer.token_bytes(doc[j]).endswith(b"\n"):
                start = j + 1
                break
        prompts.append({"id": f"{d['id']}@{start}", "prompt_ids": doc[start:start + length]})
    return prompts


def jsonl_suite(path, n: int | None, tokenizer) -> list[dict]:
    prompts = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"prompt\" string") from None
        prompts.append({"id": str(obj.get("id", lineno)), "prompt_ids": tokenizer.encode(text)})
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts[:n] if n else prompts


# --- measuring -------------------------------------------------------------------

def summarise(runs: list[dict], reference: list[dict] | None) -> dict:
    """Totals over one drafter's runs (``reference``: vanilla's runs of the same prompts)."""
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    s = {k: sum(r["stats"][k] for r in runs)
         for k in ("verify_steps", "draft_tokens", "accepted_tokens", "model_handbacks", "skipped_proposals",
                   "guess_tokens", "accepted_guesses", "drafter_time_s", "verify_time_s", "prefill_time_s")}
    depth = max((len(r["stats"]["drafted_per_position"]) for r in runs), default=0)
    drafted = [sum(r["stats"]["drafted_per_position"][j] for r in runs
                   if j < len(r["stats"]["drafted_per_position"])) for j in range(depth)]
    accepted = [sum(r["stats"]["accepted_per_position"][j] for r in runs
                    if j < len(r["stats"]["accepted_per_position"])) for j in range(depth)]
    steps = s["verify_steps"]
    out = {
        "prompts": len(runs),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "tau": (s["accepted_tokens"] + steps) / steps if steps else 0.0,
        "mean_draft_length": s["draft_tokens"] / steps if steps else 0.0,
        "acceptance_rate": s["accepted_tokens"] / s["draft_tokens"] if s["draft_tokens"] else 0.0,
        "acceptance_per_position": [a / d if d else 0.0 for a, d in zip(accepted, drafted)],
        "drafted_per_position": drafted,
        "drafter_share": s["drafter_time_s"] / wall if wall else 0.0,
        "verify_share": s["verify_time_s"] / wall if wall else 0.0,
        "drafter_ms_per_step": 1e3 * s["drafter_time_s"] / steps if steps else 0.0,
        "verify_ms_per_step": 1e3 * s["verify_time_s"] / steps if steps else 0.0,
        **{k: s[k] for k in ("verify_steps", "draft_tokens", "accepted_tokens", "model_handbacks",
                             "skipped_proposals", "guess_tokens", "accepted_guesses")},
    }
    if reference is not None:
        # Sampled runs too: prompt i has the same seed for every drafter, and
        # the engine ties its random numbers to output positions, so every
        # (deterministic) drafter must give vanilla's sampled tokens.
        same = [r["token_ids"] == v["token_ids"] for r, v in zip(runs, reference)]
        out["identical"] = sum(same)
        out["mismatched_prompts"] = [r["id"] for r, ok in zip(runs, same) if not ok]
    else:
        out["identical"] = None
    return out


def modelled_s(stats: dict, verify_ms: list[float]) -> float:
    """Seconds a run's decode steps take under one verify-cost curve (ms for
    T = 1, 2, ... positions), plus the drafter's own measured time: the
    run's decisions priced without the machine's drift. A step that drafted
    L tokens verifies L + 1 positions; ``drafted_per_position[j]`` counts the
    steps that drafted more than j, so the steps of each length follow."""
    drafted = list(stats["drafted_per_position"]) + [0]
    counts = [stats["verify_steps"] - drafted[0]] + [drafted[j] - drafted[j + 1] for j in range(len(drafted) - 1)]
    v = extend_costs(verify_ms, len(counts))
    return sum(c * v[L] for L, c in enumerate(counts)) / 1e3 + stats["drafter_time_s"]


def ratio_ci(runs: list[dict], reference: list[dict], n_boot: int = 2000, level: float = 0.95,
             seed: int = 0, time_key: str = "wall_s") -> list[float]:
    """A bootstrap interval for (tokens/s of ``runs``) / (tokens/s of
    ``reference``) over the same prompts: the prompts are resampled with
    replacement, in pairs, so the interval says how much the ratio depends on
    which prompts the suite happened to hold (not on the machine's drift,
    which interleaving spreads over every drafter alike). A prompt that
    took no time on either side is left out: one whose first token ended it
    ran no decode step, so its modelled time is 0 and it says nothing about
    the drafters (it made every modelled interval NaN)."""
    import numpy as np

    pairs = [(r, v) for r, v in zip(runs, reference) if r[time_key] > 0 or v[time_key] > 0]
    tok = np.asarray([[r["tokens"], v["tokens"]] for r, v in pairs], dtype=np.float64)
    wall = np.asarray([[r[time_key], v[time_key]] for r, v in pairs], dtype=np.float64)
    if len(tok) == 0 or (wall <= 0).any():
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(tok), size=(n_boot, len(tok)))
    t, w = tok[idx].sum(axis=1), wall[idx].sum(axis=1)  # (n_boot, 2)
    ratio = (t[:, 0] / w[:, 0]) / (t[:, 1] / w[:, 1])
    lo, hi = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def parse_drafter_spec(spec: str) -> tuple[str, int | None]:
    """``"ngram@7"`` -> ("ngram", 7); ``"tree"`` -> ("tree", None)."""
    name, at, k = spec.partition("@")
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r} in {spec!r}; choose from {', '.join(DRAFTERS)}")
    if not at:
        return name, None
    if not k.isdigit() or int(k) < 1 or name == "none":
        raise ValueError(f"bad drafter spec {spec!r}: the form is NAME@K with K >= 1 (not for none)")
    return name, int(k)


def run_bench(bundle, prompts: list[dict], drafter_names: list[str], params_for, warmup: int = 1,
              progress: bool = True, calibrate: bool = True) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Run every prompt with every drafter (``NAME`` or ``NAME@K``),
    interleaved; the raw per-run records, and the costs each costed drafter
    was calibrated to on this machine (``calibrate``: see make_drafter)."""
    from dataclasses import replace

    from tqdm import tqdm

    from ..draft.loop import generate_all
    from ..draft.registry import make_drafter

    model, tok = bundle.model, bundle.tokenizer
    specs = {label: parse_drafter_spec(label) for label in drafter_names}
    drafters = {label: make_drafter(name, bundle, calibrate=calibrate) for label, (name, _) in specs.items()}
    # The costs each drafter says it was calibrated to here (describe(): the tree's "calibration").
    costs = {label: d.describe()["calibration"] for label, d in drafters.items()
             if d is not None and d.describe().get("calibration")}

    def params(label: str, i: int, max_new: int | None):
        p, k = params_for(i, max_new), specs[label][1]
        return p if k is None else replace(p, k_max=k)

    cache = model.new_cache()
    for name, d in drafters.items():  # warm the allocator and any lazy state
        for _ in range(warmup):
            generate_all(model, prompts[0]["prompt_ids"], params(name, 0, 16), d, tokenizer=tok, cache=cache)
    runs: dict[str, list[dict]] = {name: [] for name in drafter_names}
    bar = tqdm(total=len(prompts) * len(drafter_names), desc="bench", unit="run", disable=not progress)
    for i, p in enumerate(prompts):
        order = drafter_names[i % len(drafter_names):] + drafter_names[:i % len(drafter_names)]
        for name in order:
            t0 = time.perf_counter()
            r = generate_all(model, p["prompt_ids"], params(name, i, None), drafters[name], tokenizer=tok,
                             cache=cache)
            wall = time.perf_counter() - t0
            runs[name].append({"id": p["id"], "prompt_tokens": len(p["prompt_ids"]), "tokens": len(r.token_ids),
                               "wall_s": wall, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                               "stats": r.stats.to_dict()})
            bar.update(1)
        bar.set_postfix({n: f"{sum(x['tokens'] for x in runs[n]) / sum(x['wall_s'] for x in runs[n]):.0f}t/s"
                         for n in drafter_names})
    bar.close()
    return runs, costs


# --- reporting -------------------------------------------------------------------

def format_table(summary: dict[str, dict], positions: int = 5) -> str:
    head = (f"{'drafter':<9} {'tok/s':>8} {'speedup':>8} {'95% CI':>13} {'tau':>6} {'draft':>6} "
            + " ".join(f"{'acc@' + str(j + 1):>6}" for j in range(positions))
            + f" {'draft%':>7} {'ms/verify':>9} {'identical':>10}")
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        acc = s["acceptance_per_position"]
        cells = " ".join(f"{acc[j]:>6.2f}" if j < len(acc) else f"{'-':>6}" for j in range(positions))
        ident = "n/a" if s["identical"] is None else f"{s['identical']}/{s['prompts']}"
        lo, hi = s.get("speedup_ci95") or (float("nan"), float("nan"))
        ci = f"{lo:.2f}-{hi:.2f}x" if name != "none" else "-"
        lines.append(f"{name:<9} {s['tokens_per_s']:>8.1f} {s['speedup']:>7.2f}x {ci:>13} {s['tau']:>6.2f} "
                     f"{s['mean_draft_length']:>6.2f} {cells} {100 * s['drafter_share']:>6.1f}% "
                     f"{s['verify_ms_per_step']:>9.2f} {ident:>10}")
    return "\n".join(lines)


def plot(summary: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(summary)
    speed = [summary[n]["speedup"] for n in names]
    ci = [summary[n].get("speedup_ci95") or [v, v] for n, v in zip(names, speed)]
    err = [[max(v - c[0], 0.0) for v, c in zip(speed, ci)], [max(c[1] - v, 0.0) for v, c in zip(speed, ci)]]
    bars = ax1.bar(names, speed, yerr=err, capsize=4,
                   color=["#999999" if n == "none" else "#3b7dd8" for n in names])
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.bar_label(bars, labels=[f"{v:.2f}x" for v in speed])
    ax1.set_ylim(0, max(speed + [c[1] for c in ci] + [1.0]) * 1.15)
    ax1.set_ylabel("speedup over vanilla (tokens/s)")
    ax1.set_title("speedup (bars: 95% bootstrap interval over prompts)")
    for n in names:
        acc = summary[n]["acceptance_per_position"]
        if acc:
            ax2.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{n} (tau {summary[n]['tau']:.2f})")
    ax2.set_xlabel("draft position")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_ylabel("acceptance rate")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("acceptance per draft position")
    if ax2.lines:
        ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- CLI -------------------------------------------------------------------------

def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="benchmark drafters against vanilla decoding (Spec-Bench style)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="models/default", help="model bundle (default: %(default)s)")
    p.add_argument("--suite", default="code",
                   help="prompts from the --data-dir corpus's test split, by kind (code, prose, or text for a "
                        "files: corpus) or by domain (stdlib, files, ...); or a FILE.jsonl of {\"prompt\": ...} "
                        "lines (default: %(default)s)")
    p.add_argument("--drafters", default="none,ngram,tree",
                   help=f"comma-separated, from {', '.join(DRAFTERS)}, each optionally NAME@K to cap its draft "
                        f"length at K (default: %(default)s; none is always run)")
    p.add_argument("--n", type=int, default=10, help="number of prompts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed+i")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 is off (see treespec generate)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="0 is off")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="0 is off")
    p.add_argument("--k-max", type=int, default=None, help="cap on draft length (default: each drafter's)")
    p.add_argument("--data-dir", default="data/default", help="prepared corpus for code/prose (default: %(default)s)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON and PNG (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up generations per drafter (default: 1)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="keep the tree's fitted costs instead of timing them on this machine first")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weight precision of the matrix products (default: %(default)s; docs/performance.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..draft.registry import DrafterUnavailable
    from ..draft.types import SamplingParams
    from ..model import BundleError
    from ..model.kernels import load_for_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.drafters.split(",") if n.strip()]
    try:
        for n in names:
            parse_drafter_spec(n)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = ["none"] + [n for n in dict.fromkeys(names) if n != "none"]
    try:
        bundle, kernels = load_for_inference(args.bundle, args.dtype)
        max_prompt = min(PROMPT_MAX, bundle.config.block_size - args.max_new_tokens)
        if max_prompt < 1:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                             f"model's context of {bundle.config.block_size}")
        if not (args.suite.endswith(".jsonl") or Path(args.suite).is_file()):
            prompts = corpus_suite(args.suite, args.data_dir, args.n, bundle.tokenizer, max_prompt)
            suite_name = args.suite
        else:
            prompts = jsonl_suite(args.suite, args.n, bundle.tokenizer)
            suite_name = Path(args.suite).stem
            for p in prompts:  # keep the most recent context, as a server would have to
                p["prompt_ids"] = p["prompt_ids"][-max_prompt:]

        def params_for(i: int, max_new: int | None) -> SamplingParams:
            return SamplingParams(max_new_tokens=max_new or args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed + i, k_max=args.k_max,
                                  repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                                  presence_penalty=args.presence_penalty)

        share = CpuShare()
        runs, costs = run_bench(bundle, prompts, names, params_for, warmup=args.warmup, progress=not args.json,
                                calibrate=not args.no_calibrate)
        busy = share.others()
    except (BundleError, DrafterUnavailable, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    summary = {n: summarise(runs[n], runs["none"]) for n in names}
    base = summary["none"]["tokens_per_s"]
    for n, s in summary.items():
        s["speedup"] = s["tokens_per_s"] / base if base else 0.0
        s["speedup_ci95"] = ratio_ci(runs[n], runs["none"])
        # Against every other drafter too: "faster than ngram" is a claim about this ratio.
        s["ratio_ci95"] = {m: ratio_ci(runs[n], runs[m]) for m in names if m not in (n, "none")}
    # The same runs priced on one verify curve timed after them: the wall
    # times drift by several percent between runs of the same command, the
    # drafters' decisions (how many steps of each length) do not.
    longest = max(len(r["stats"]["drafted_per_position"]) for rs in runs.values() for r in rs)
    ctx = sum(len(p["prompt_ids"]) for p in prompts) // len(prompts) + args.max_new_tokens // 2
    curve = measure_verify_ms(bundle.model, max(longest, 1), ctx, reps=10,
                              advice="the modelled speedups are unreliable; rerun on a quiet machine")
    for rs in runs.values():
        for r in rs:
            r["modelled_s"] = modelled_s(r["stats"], curve)
    for n, s in summary.items():
        t = sum(r["modelled_s"] for r in runs[n])
        s["modelled_speedup"] = sum(r["modelled_s"] for r in runs["none"]) / t if t else 0.0
        s["modelled_ratio_ci95"] = {m: ratio_ci(runs[n], runs[m], time_key="modelled_s")
                                    for m in names if m not in (n, "none")}

    report = {
        "bundle": str(bundle.path), "weights_sha256": bundle.weights_sha256, "suite": args.suite,
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "k_max": args.k_max,
        "repetition_penalty": args.repetition_penalty, "frequency_penalty": args.frequency_penalty,
        "presence_penalty": args.presence_penalty,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "cpu_model": cpu_model(), "python": platform.python_version(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "kernels": kernels.to_dict(),
        # The share of the CPUs other processes kept busy while the drafters ran.
        "busy": None if busy is None else round(busy, 3),
        "calibrated_costs": costs,
        "modelled_verify_ms": curve,
        "drafters": summary,
        "runs": {n: [{k: v for k, v in r.items() if k != "token_ids"} for r in runs[n]] for n in names},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Penalised runs get their own files (and title), beside the plain ones.
    penalties = [(tag, v) for tag, v, off in (("rep", args.repetition_penalty, 1.0), ("freq", args.frequency_penalty, 0.0),
                                               ("pres", args.presence_penalty, 0.0)) if v != off]
    stem = f"{bundle.path.name}-{suite_name}-T{args.temperature:g}" + "".join(f"-{t}{v:g}" for t, v in penalties)
    if kernels.precision != "float32":
        stem += f"-{kernels.precision}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    title = (f"{bundle.path.name} · {kernels.precision} · {suite_name} · T={args.temperature:g} · {len(prompts)} prompts × "
             f"{args.max_new_tokens} tokens" + "".join(f" · {t} {v:g}" for t, v in penalties))
    plot(summary, title, out / f"{stem}.png")

    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(title)
        print(format_table(summary))
        print("modelled (decode steps priced on one verify curve, " + ", ".join(f"{v:.1f}" for v in curve)
              + " ms): " + ", ".join(f"{n} {s['modelled_speedup']:.2f}x" for n, s in summary.items()))
        print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    if busy is not None and busy > BUSY_SHARE:
        print(f"warning: other processes kept {busy:.0%} of the CPUs busy while this ran, so its times are not "
              "this machine's; rerun with nothing else running (docs/performance.md, 'Sharing the CPU')",
              file=sys.stderr)
    mismatched = {n: s["mismatched_prompts"] for n, s in summary.items() if s.get("mismatched_prompts")}
    if mismatched:
        print(f"FAIL: outputs differ from vanilla's with the same seed: {mismatched}", file=sys.stderr)
        return 1
    return 0
