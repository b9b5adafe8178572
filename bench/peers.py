"""treespec side by side with the engines a user would pick instead, on the same weights.

    pip install -e '.[interop]' && CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python
    python bench/peers.py --bundle models/default --data-dir data/default

Engines (``--engines``, comma-separated; the default runs them all):

    treespec:DRAFTER:PRECISION   DRAFTER none|ngram|tree, PRECISION float32|bfloat16|int8
    hf:plain, hf:pld             transformers' GPT2LMHeadModel, fp32; pld = prompt_lookup_num_tokens=10
    llama:TYPE:plain|pld         llama-cpp-python on a GGUF export, TYPE f32|f16|q8_0;
                                 pld = its LlamaPromptLookupDecoding(num_pred_tokens=10)

The Hugging Face and GGUF models are exported from the bundle (``treespec export``) into
``--cache`` once per bundle. Each engine is loaded once, in its own worker process, and only one
runs at a time: for each repetition and prompt the engines go in a rotating order. Reported per
engine: tokens/s (median over repetitions of the suite's total, with the range), the one-token
forward at a mid-length context (median ms), tokens per forward where the engine says, and
greedy agreement with treespec float32 without a drafter. Also the CPU model and flags, the
copy bandwidth (best of the run) and the read bandwidth measured just before each forward timing. JSON and a PNG go to ``--out``.

It is a benchmark, not a test: it lives outside ``make test``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --- engines, each in its own process ---------------------------------------------

class TreespecEngine:
    def __init__(self, bundle: str, drafter: str, precision: str):
        from treespec.draft.registry import make_drafter
        from treespec.model.kernels import load_for_inference

        self.bundle, self.kernels = load_for_inference(bundle, precision)
        self.drafter = make_drafter(drafter, self.bundle, calibrate=True)
        self.model = self.bundle.model
        self.cache = self.model.new_cache()

    def generate(self, prompt, max_new, temperature, seed):
        from treespec.draft.loop import generate_all
        from treespec.draft.types import SamplingParams

        p = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed)
        r = generate_all(self.model, prompt, p, self.drafter, tokenizer=self.bundle.tokenizer, cache=self.cache)
        return r.token_ids, len(r.token_ids) / (r.stats.verify_steps + 1)

    def forward_ms(self, ctx, n):
        import torch

        self.cache.reset()
        self.model.forward_step(torch.tensor([ctx]), 0, self.cache, last_only=True)
        tok, ts = torch.tensor([[ctx[-1]]]), []
        for i in range(n):
            t = time.perf_counter()
            self.model.forward_step(tok, len(ctx) + i, self.cache)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    def info(self):
        return {"kernels": self.kernels.to_dict()}


class HFEngine:
    def __init__(self, hf_dir: str, mode: str):
        import torch
        from transformers import GPT2LMHeadModel

        self.model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
        self.pld = mode == "pld"

    def generate(self, prompt, max_new, temperature, seed):
        import torch

        ids = torch.tensor([prompt])
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new, eos_token_id=50256, pad_token_id=50256,
                  attention_mask=torch.ones_like(ids), top_k=0, top_p=1.0)
        if temperature > 0:
            kw["temperature"] = temperature
            torch.manual_seed(seed)
        if self.pld:
            kw["prompt_lookup_num_tokens"] = 10
        with torch.inference_mode():
            out = self.model.generate(ids, **kw)
        return out[0, len(prompt):].tolist(), None

    def forward_ms(self, ctx, n):
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ctx]), use_cache=True)
            pkv, tok, ts = out.past_key_values, torch.tensor([[ctx[-1]]]), []
            for _ in range(n):
                t = time.perf_counter()
                out = self.model(tok, past_key_values=pkv, use_cache=True)
                ts.append(time.perf_counter() - t)
                pkv = out.past_key_values
        return statistics.median(ts) * 1e3

    def info(self):
        import transformers

        return {"transformers": transformers.__version__}


class LlamaEngine:
    def __init__(self, gguf: str, mode: str, threads: int, n_ctx: int):
        import llama_cpp

        kw = {}
        if mode == "pld":
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=10)
        self.llm = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   verbose=False, **kw)
        self.version = llama_cpp.__version__

    def generate(self, prompt, max_new, temperature, seed):
        self.llm.reset()  # no prefix reuse across runs: every engine prefills every prompt
        if temperature > 0:
            self.llm.set_seed(seed)
        out = []
        for tok in self.llm.generate(prompt, temp=temperature, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                     repeat_penalty=1.0, reset=True):
            out.append(tok)
            if tok == 50256 or len(out) == max_new:
                break
        return out, None

    def forward_ms(self, ctx, n):
        self.llm.reset()
        self.llm.eval(ctx)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            self.llm.eval([ctx[-1]])
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    def info(self):
        return {"llama_cpp_python": self.version}


def _worker(spec: str, paths: dict, threads: int, n_ctx: int, conn) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    kind, *rest = spec.split(":")
    try:
        if kind == "treespec":
            engine = TreespecEngine(paths["bundle"], rest[0], rest[1])
        elif kind == "hf":
            engine = HFEngine(paths["hf"], rest[0])
        else:
            engine = LlamaEngine(paths[f"gguf-{rest[0]}"], rest[1], threads, n_ctx)
        conn.send(("ready", engine.info()))
    except Exception as e:  # noqa: BLE001 - the parent reports it and goes on without this engine
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "quit":
            return
        if msg[0] == "gen":
            _, prompt, max_new, temperature, seed = msg
            t = time.perf_counter()
            tokens, per_fwd = engine.generate(prompt, max_new, temperature, seed)
            conn.send((tokens, time.perf_counter() - t, per_fwd))
        elif msg[0] == "fwd":
            conn.send(engine.forward_ms(msg[1], msg[2]))


# --- the run ---------------------------------------------------------------------

def copy_bandwidth_gbs(threads: int) -> float:
    """Read + write GB/s of a 256 MB copy: the memory bound of a forward."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(64 << 20)
    b = torch.empty_like(a)
    ts = []
    for _ in range(8):
        t = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / min(ts) / 1e9


def read_bandwidth_gbs(threads: int) -> float:
    """GB/s of reading 256 MB (a sum, which a forward's weight stream resembles more than a
    copy does), best of three: timed right before each engine's forward timing, so each
    forward is held to the bandwidth of its own moment on a machine whose neighbours come
    and go (a best-of-run copy flatters no one but can sit 1.6x above a busy spell)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(64 << 20)
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t)
    return a.numel() * 4 / min(ts) / 1e9


def weights_read_mb(model) -> dict[str, float]:
    """MB of weights one decode step reads at each precision: every matrix of the
    blocks and the head (the embedding is one row, the norms and biases stay fp32)."""
    from treespec.model.gpt import Linear

    mats = [m.weight.numel() for m in model.blocks.modules() if isinstance(m, Linear)]
    n = sum(mats) + model.exit_heads[-1].weight.numel()
    small = sum(p.numel() for name, p in model.blocks.named_parameters() if p.ndim == 1)
    return {p: round((n * b + small * 4) / 1e6, 1) for p, b in (("float32", 4), ("bfloat16", 2), ("int8", 1), ("w8a8", 1))}


def export_models(bundle: str, cache: Path, needed: set[str]) -> dict:
    from treespec.model import load_bundle
    from treespec.model.gguf_export import export_gguf
    from treespec.model.interop import export_hf

    sha = load_bundle(bundle).weights_sha256[:12]
    root = cache / f"{Path(bundle).resolve().name}-{sha}"
    paths = {"bundle": bundle, "hf": str(root / "hf")}
    if "hf" in needed and not (root / "hf").is_dir():
        export_hf(bundle, root / "hf", log=lambda m: None)
    for q in ("f32", "f16", "q8_0"):
        paths[f"gguf-{q}"] = str(root / f"model-{q}.gguf")
        if f"gguf-{q}" in needed and not (root / f"model-{q}.gguf").is_file():
            export_gguf(bundle, root / f"model-{q}.gguf", q, log=lambda m: None)
    return paths


def default_engines(has_tree: bool) -> list[str]:
    drafters = ["none", "ngram"] + (["tree"] if has_tree else [])
    return ([f"treespec:{d}:{p}" for p in ("float32", "bfloat16", "int8", "w8a8") for d in drafters]
            + ["hf:plain", "hf:pld"] + [f"llama:{q}:{m}" for q in ("f32", "f16", "q8_0") for m in ("plain", "pld")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/default")
    ap.add_argument("--data-dir", default="data/default", help="prepared corpus; prompts from its test split")
    ap.add_argument("--engines", default=None, help="comma-separated (default: all; see the docstring)")
    ap.add_argument("--n", type=int, default=8, help="prompts per suite (code and prose)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the whole suite")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=256, help="prompt length in tokens (64 to this)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forward-ctx", type=int, default=256, help="context of the one-token forward timing")
    ap.add_argument("--cache", default=str(REPO / ".cache" / "peers"), help="where the exports are kept")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--tag", default="", help="suffix for the result files (a subset of engines should not "
                    "overwrite the full run's)")
    ap.add_argument("--summarize", metavar="JSON", help="print the table and targets of an earlier run's JSON")
    ap.add_argument("--markdown", action="store_true", help="with --summarize: the tables as docs/performance.md has them")
    args = ap.parse_args(argv)
    if args.summarize:
        report = json.loads(Path(args.summarize).read_text())
        if "weights_read_mb" not in report:
            from treespec.model import load_bundle
            report["weights_read_mb"] = weights_read_mb(load_bundle(report["bundle"]).model)
        report["targets"] = targets(report)
        Path(args.summarize).write_text(json.dumps(report, indent=1) + "\n")
        print(markdown(report) if args.markdown else table(report))
        return 0

    from treespec.cli.bench import corpus_suite
    from treespec.model import load_bundle
    from treespec.model.kernels import cpu_slug, cpu_summary

    bundle = load_bundle(args.bundle)
    has_tree = (bundle.draft_dir / "meta.json").is_file()
    engines = args.engines.split(",") if args.engines else default_engines(has_tree)
    needed = {"hf" if e.startswith("hf:") else f"gguf-{e.split(':')[1]}" for e in engines if not e.startswith("treespec")}
    print(f"exporting {sorted(needed) or 'nothing'} into {args.cache} (once per bundle)", file=sys.stderr)
    paths = export_models(args.bundle, Path(args.cache), needed)
    max_prompt = min(args.max_prompt, bundle.config.block_size - args.max_new_tokens)
    prompts = {kind: corpus_suite(kind, args.data_dir, args.n, bundle.tokenizer, max_prompt)
               for kind in ("code", "prose")}
    items = [(kind, i, p["prompt_ids"]) for kind in prompts for i, p in enumerate(prompts[kind])]
    # Measured before the loads and after every repetition, best kept: a copy timed
    # while another tenant of the machine was busy reads low, and a low bound
    # flatters every engine.
    bandwidths = [copy_bandwidth_gbs(args.threads)]

    ctx = mp.get_context("spawn")
    workers, info, failed = {}, {}, {}
    for e in engines:  # load one at a time, so loads do not contend
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(e, paths, args.threads, bundle.config.block_size, child), daemon=True)
        proc.start()
        status, detail = parent.recv()
        if status == "ready":
            workers[e], info[e] = (proc, parent), detail
            print(f"loaded {e}", file=sys.stderr)
        else:
            failed[e] = detail
            print(f"skipped {e}: {detail}", file=sys.stderr)
            proc.join()
    names = list(workers)

    def run(e, msg):
        workers[e][1].send(msg)
        return workers[e][1].recv()

    for e in names:  # warm-up: one short generation each
        run(e, ("gen", items[0][2], 8, args.temperature, 0))
    per_rep = {e: {kind: [] for kind in prompts} for e in names}  # [rep] -> (tokens, wall)
    outputs = {e: {} for e in names}  # (kind, i) -> tokens of the first repetition
    per_fwd = {e: [] for e in names}
    k = 0
    for rep in range(args.reps):
        totals = {e: {kind: [0, 0.0] for kind in prompts} for e in names}
        for kind, i, prompt in items:
            order = names[k % len(names):] + names[:k % len(names)]
            k += 1
            for e in order:
                tokens, wall, tpf = run(e, ("gen", prompt, args.max_new_tokens, args.temperature, 1000 + i))
                totals[e][kind][0] += len(tokens)
                totals[e][kind][1] += wall
                if rep == 0:
                    outputs[e][(kind, i)] = tokens
                    if tpf is not None:
                        per_fwd[e].append(tpf)
        for e in names:
            for kind in prompts:
                per_rep[e][kind].append(totals[e][kind])
        bandwidths.append(copy_bandwidth_gbs(args.threads))
        print(f"repetition {rep + 1}/{args.reps}: " + ", ".join(
            f"{e} {sum(t for t, _ in totals[e].values()) / sum(w for _, w in totals[e].values()):.0f}"
            for e in names), file=sys.stderr)
    fwd_ctx = items[0][2][: min(args.forward_ctx, len(items[0][2]))]
    while len(fwd_ctx) < min(args.forward_ctx, bundle.config.block_size - 64):
        fwd_ctx = fwd_ctx + items[(len(fwd_ctx) // 7) % len(items)][2]
    fwd_ctx = fwd_ctx[: min(args.forward_ctx, bundle.config.block_size - 64)]
    forward = {e: [] for e in names}
    read_bw = {e: [] for e in names}  # GB/s read just before each of the engine's forward timings
    for rep in range(3):  # interleaved too
        for e in names[rep % len(names):] + names[:rep % len(names)]:
            read_bw[e].append(read_bandwidth_gbs(args.threads))
            forward[e].append(run(e, ("fwd", fwd_ctx, 30)))
    for e in names:
        workers[e][1].send(("quit",))
        workers[e][0].join()

    ref = "treespec:none:float32"
    report_engines = {}
    for e in names:
        rates = {kind: [t / w for t, w in per_rep[e][kind]] for kind in prompts}
        both = [sum(per_rep[e][kd][r][0] for kd in prompts) / sum(per_rep[e][kd][r][1] for kd in prompts)
                for r in range(args.reps)]
        entry = {"tokens_per_s": statistics.median(both), "tokens_per_s_range": [min(both), max(both)],
                 "by_suite": {kind: {"tokens_per_s": statistics.median(v), "range": [min(v), max(v)]}
                              for kind, v in rates.items()},
                 "forward_ms": statistics.median(forward[e]), "forward_ms_all": forward[e],
                 "read_bandwidth_gbs_before": [round(b, 1) for b in read_bw[e]],
                 "tokens_per_forward": statistics.mean(per_fwd[e]) if per_fwd[e] else None, **info[e]}
        if ref in outputs and args.temperature == 0:
            same, prefix = 0, []
            for key, toks in outputs[e].items():
                want = outputs[ref][key]
                n = next((j for j, (a, b) in enumerate(zip(toks, want)) if a != b), min(len(toks), len(want)))
                same += toks == want
                prefix.append(n / max(len(want), 1))
            entry["greedy_identical_prompts"] = f"{same}/{len(outputs[e])}"
            entry["greedy_common_prefix"] = statistics.mean(prefix)
        report_engines[e] = entry
    report = {
        "bundle": args.bundle, "weights_sha256": bundle.weights_sha256, "cpu": cpu_summary(),
        "threads": args.threads, "copy_bandwidth_gbs": round(max(bandwidths), 1),
        "copy_bandwidth_gbs_all": [round(b, 1) for b in bandwidths],
        "prompts": {kind: len(v) for kind, v in prompts.items()},
        "prompt_tokens": [min(len(p) for *_, p in items), max(len(p) for *_, p in items)],
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "reps": args.reps,
        "forward_ctx": len(fwd_ctx), "engines": report_engines, "failed": failed,
        "weights_read_mb": weights_read_mb(bundle.model),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
    }
    report["targets"] = targets(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = cpu_slug()
    # not Path.with_suffix: "T0.8" would lose its ".8"
    stem = out / (f"peers-{Path(args.bundle).name}-{slug}-T{args.temperature:g}" + (f"-{args.tag}" if args.tag else ""))
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, Path(f"{stem}.png"))
    print(table(report))
    print(f"wrote {stem}.json and {stem}.png")
    return 0


PAIRS = (("float32", "f32"), ("bfloat16", "f16"), ("int8", "q8_0"), ("w8a8", "q8_0"))


def targets(report: dict) -> dict:
    """The issue's targets, per precision class, from one run: treespec's one-token forward
    against llama.cpp's and the memory bound; vanilla against llama.cpp plain and HF; the tree
    against llama.cpp's best mode (plain or prompt lookup), geometric mean over code and prose."""
    import math

    E = report["engines"]

    def tps(e, suite=None):
        return E[e]["tokens_per_s"] if suite is None else E[e]["by_suite"][suite]["tokens_per_s"]

    out = {}
    for p, q in PAIRS:
        mine, theirs = f"treespec:none:{p}", f"llama:{q}:plain"
        if mine not in E or theirs not in E:
            continue
        t = {"forward_ms": E[mine]["forward_ms"], "llama_forward_ms": E[theirs]["forward_ms"],
             "forward_vs_llama": E[mine]["forward_ms"] / E[theirs]["forward_ms"],
             "vanilla_vs_llama_plain": tps(mine) / tps(theirs)}
        if "weights_read_mb" in report:
            mb = report["weights_read_mb"][p]
            bound = mb / report["copy_bandwidth_gbs"]  # ms: MB over GB/s of a copy (bytes read + written)
            t["memory_bound_ms"] = bound
            t["forward_vs_bound"] = E[mine]["forward_ms"] / bound
            if E[mine].get("read_bandwidth_gbs_before"):  # each forward against the read bandwidth of its moment
                t["forward_vs_adjacent_read_bound"] = statistics.median(
                    f / (mb / bw) for f, bw in zip(E[mine]["forward_ms_all"], E[mine]["read_bandwidth_gbs_before"]))
        modes = [e for e in (f"llama:{q}:plain", f"llama:{q}:pld") if e in E]
        tree = f"treespec:tree:{p}"
        if tree in E and modes:
            best = max(modes, key=tps)
            t["tree_vs_best_llama"] = {"llama": best, "geomean_code_prose": math.sqrt(
                tps(tree, "code") / tps(best, "code") * tps(tree, "prose") / tps(best, "prose"))}
        out[p] = t
    if "treespec:none:float32" in E and "hf:plain" in E:
        out["vanilla_float32_vs_hf_plain"] = tps("treespec:none:float32") / tps("hf:plain")
    return out


def table(report: dict) -> str:
    lines = [f"{'engine':<28} {'tok/s':>7} {'range':>13} {'code':>6} {'prose':>6} {'fwd ms':>7} {'tok/fwd':>7} {'greedy=':>8}"]
    for e, s in sorted(report["engines"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
        lo, hi = s["tokens_per_s_range"]
        tpf = f"{s['tokens_per_forward']:.2f}" if s["tokens_per_forward"] else "-"
        lines.append(f"{e:<28} {s['tokens_per_s']:7.0f} {f'{lo:.0f}-{hi:.0f}':>13} "
                     f"{s['by_suite']['code']['tokens_per_s']:6.0f} {s['by_suite']['prose']['tokens_per_s']:6.0f} "
                     f"{s['forward_ms']:7.2f} {tpf:>7} {s.get('greedy_identical_prompts', '-'):>8}")
    c = report["cpu"]
    lines.append(f"{c['model']} ({', '.join(c['flags'])}), {report['threads']} threads, "
                 f"copy {report['copy_bandwidth_gbs']} GB/s; T={report['temperature']:g}")
    for p, t in report.get("targets", {}).items():
        if not isinstance(t, dict):
            lines.append(f"{p}: {t:.2f}x")
            continue
        bits = [f"forward {t['forward_ms']:.2f} ms = {t['forward_vs_llama']:.2f}x llama.cpp's"]
        if "memory_bound_ms" in t:
            bits.append(f"{t['forward_vs_bound']:.2f}x the memory bound ({t['memory_bound_ms']:.2f} ms)")
        if "forward_vs_adjacent_read_bound" in t:
            bits.append(f"{t['forward_vs_adjacent_read_bound']:.2f}x the bound at the read bandwidth measured just before")
        bits.append(f"vanilla {t['vanilla_vs_llama_plain']:.2f}x llama.cpp plain")
        if "tree_vs_best_llama" in t:
            bits.append(f"tree {t['tree_vs_best_llama']['geomean_code_prose']:.2f}x {t['tree_vs_best_llama']['llama']}")
        lines.append(f"{p}: " + "; ".join(bits))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    rows = ["| engine | tokens/s | range | code | prose | one-token forward | tokens/forward | greedy = treespec fp32 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e, s in sorted(report["engines"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
        lo, hi = s["tokens_per_s_range"]
        tpf = f"{s['tokens_per_forward']:.2f}" if s["tokens_per_forward"] else ""
        rows.append(f"| {e} | {s['tokens_per_s']:.0f} | {lo:.0f}-{hi:.0f} | {s['by_suite']['code']['tokens_per_s']:.0f} | "
                    f"{s['by_suite']['prose']['tokens_per_s']:.0f} | {s['forward_ms']:.2f} ms | {tpf} | "
                    f"{s.get('greedy_identical_prompts', '')} |")
    rows += ["", "| precision class | forward vs llama.cpp | forward vs memory bound | vanilla vs llama.cpp plain | "
                 "tree vs llama.cpp's best mode (geomean code, prose) |", "| --- | --- | --- | --- | --- |"]
    for (p, q) in PAIRS:
        t = report["targets"].get(p)
        if not t:
            continue
        tree = t.get("tree_vs_best_llama")
        rows.append(f"| {p} / {q} | {t['forward_vs_llama']:.2f}× ({t['forward_ms']:.2f} / {t['llama_forward_ms']:.2f} ms) | "
                    f"{t['forward_vs_bound']:.2f}× ({t['memory_bound_ms']:.2f} ms) | {t['vanilla_vs_llama_plain']:.2f}× | "
                    + (f"{tree['geomean_code_prose']:.2f}× ({tree['llama'].split(':')[-1]}) |" if tree else "|"))
    if "vanilla_float32_vs_hf_plain" in report["targets"]:
        rows.append(f"\nVanilla fp32 vs HF transformers fp32: {report['targets']['vanilla_float32_vs_hf_plain']:.2f}×; "
                    f"copy bandwidth {report['copy_bandwidth_gbs']} GB/s; weights read per token "
                    + ", ".join(f"{k} {v} MB" for k, v in report["weights_read_mb"].items()))
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(report["engines"].items(), key=lambda kv: kv[1]["tokens_per_s"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 0.35 * len(items) + 1.8), sharey=True)
    ys = range(len(items))
    colors = ["tab:green" if e.startswith("treespec") else "tab:orange" if e.startswith("llama") else "tab:blue"
              for e, _ in items]
    v = [s["tokens_per_s"] for _, s in items]
    err = [[s["tokens_per_s"] - s["tokens_per_s_range"][0] for _, s in items],
           [s["tokens_per_s_range"][1] - s["tokens_per_s"] for _, s in items]]
    a1.barh(ys, v, xerr=err, color=colors)
    a1.set_yticks(list(ys), [e for e, _ in items], fontsize=8)
    a1.set_xlabel("tokens/s (median over repetitions; bars: range)")
    a2.barh(ys, [s["forward_ms"] for _, s in items], color=colors)
    a2.set_xlabel(f"one-token forward, ms (context {report['forward_ctx']})")
    c = report["cpu"]
    fig.suptitle(f"{Path(report['bundle']).name} · {c['model']} · {report['threads']} threads · "
                 f"T={report['temperature']:g} · {sum(report['prompts'].values())} prompts × "
                 f"{report['max_new_tokens']} tokens × {report['reps']} reps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
