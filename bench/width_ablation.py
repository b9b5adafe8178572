"""The compressed-width ablation: does a narrower residual stream, with skip connections to
make up for it, keep the baseline's held-out loss while decoding faster?

    python bench/width_ablation.py --data-dir data/default --out runs/width          # train the rows
    python bench/width_ablation.py --out runs/width --seeds 1338 --rows w384,w256_unet  # second seeds
    python bench/width_ablation.py --out runs/width --speed                          # time them, one machine
    python bench/width_ablation.py --out runs/width --report-only                    # table, JSON, plot

Rows (docs/training.md, "Compressed width"), all 6 blocks with the seed's exits (after
blocks 4, 5, 6; loss weights 0.05/0.15/0.8), the same token budget and seed:

  w384           the default's shape before the retrain: 6 x 384
  w256           compressed width 256, no skips
  w256_embed     w256 + the embedding mixed into every block's input (embed_skip)
  w256_unet      w256 + U-Net skips, block i -> block 7 - i (unet_skip)
  w256_skip_dwa  w256 + whichever of the two skips had the lower held-out loss + DWA
  w384_dwa       w384 + DWA

Each (row, seed) is an ordinary resumable ``treespec train`` in ``OUT/ROW-sSEED``: run the
same command again and interrupted runs resume from their checkpoint. Training runs in fp32
on every CPU (``--autocast_bf16=off``), so a run resumed on another machine computes the same
way. A finished run's summary and metrics are copied to ``RESULTS/ROW-sSEED`` (default
``bench/results/width``, kept in git): a few kilobytes that outlive ``runs/``, so the
ablation goes on, row by row, from any checkout that has them, and the report is built from
them alone.

``--speed`` times every finished row on this machine, interleaved with rotating order:
the trainer's own step (tokens/s, as ``bench/train_throughput.py``) and ``treespec bench``
with no drafter at each ``--dtype`` (vanilla tokens/s and the one-token forward). The
training summaries' own tokens/s come from whichever machine trained each run, so the
comparable figures are these. A row whose bundle is not in ``OUT`` (trained in another
checkout) is timed on a bundle of its configuration with fresh random weights: the time of a
forward depends on the shapes, not on the values (denormals are flushed). Results go to
``RESULTS/speed.json``; the report to ``RESULTS/width.json``, ``RESULTS/width.png`` and a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import train_row  # noqa: E402

from treespec.model.config import default_exit_weights, seed_exit_layers  # noqa: E402

ROWS = {
    "w384": "6 × 384 (the default's shape before the retrain)",
    "w256": "6 × 256, no skips",
    "w256_embed": "6 × 256 + embedding skip",
    "w256_unet": "6 × 256 + U-Net skips",
    "w256_skip_dwa": "6 × 256 + better skip + DWA",
    "w384_dwa": "6 × 384 + DWA",
}
SKIP_ROWS = ("w256_embed", "w256_unet")
N_LAYER, HEAD_DIM = 6, 64


def run_dir(out: Path, row: str, seed: int) -> Path:
    return out / f"{row}-s{seed}"


KEPT = ("training_summary.json", "metrics.jsonl")  # what outlives a run's folder


def keep_finished(out: Path, results: Path) -> None:
    """Copy each finished run's summary and metrics from OUT to RESULTS, once."""
    for summary in sorted(out.glob("*-s*/training_summary.json")):
        dest = results / summary.parent.name
        if not (dest / KEPT[0]).exists():
            dest.mkdir(parents=True, exist_ok=True)
            for name in reversed(KEPT):  # the summary last: its presence marks a complete copy
                shutil.copyfile(summary.parent / name, dest / name)
            print(f"kept {dest}", flush=True)


def finished(results: Path, row: str) -> dict[int, dict]:
    """seed -> training summary, for the row's finished runs."""
    runs = {}
    for d in sorted(results.glob(f"{row}-s*")):
        summary = d / "training_summary.json"
        if d.name[len(row) + 2:].isdigit() and summary.exists():
            runs[int(d.name[len(row) + 2:])] = json.loads(summary.read_text())
    return runs


def mean_final_loss(runs: dict[int, dict]) -> float:
    """Held-out val loss of the final exit, averaged over domains and seeds."""
    vals = [v for s in runs.values() for v in s["final_val_loss"][f"exit_{N_LAYER}"].values()]
    return sum(vals) / len(vals)


def better_skip(results: Path) -> str:
    """The skip row (embedding or U-Net) with the lower held-out loss, from its finished runs."""
    done = {row: finished(results, row) for row in SKIP_ROWS}
    missing = [row for row, runs in done.items() if not runs]
    if missing:
        raise SystemExit(f"w256_skip_dwa takes the better of {', '.join(SKIP_ROWS)}: train {', '.join(missing)} first")
    return min(SKIP_ROWS, key=lambda row: mean_final_loss(done[row]))


def row_overrides(row: str, args, results: Path) -> list[str]:
    width = args.wide if row.startswith("w384") else args.narrow
    layers = seed_exit_layers(N_LAYER)
    weights = default_exit_weights(len(layers))
    flags = [f"--model.n_layer={N_LAYER}", f"--model.n_embd={width}", f"--model.n_head={width // HEAD_DIM}",
             f"--model.exit_layers={json.dumps(list(layers), separators=(',', ':'))}",
             f"--model.exit_loss_weights={json.dumps([round(w, 6) for w in weights], separators=(',', ':'))}"]
    skip = better_skip(results) if row == "w256_skip_dwa" else row
    flags += {"w256_embed": ["--model.embed_skip=true"], "w256_unet": ["--model.unet_skip=true"]}.get(skip, [])
    if row.endswith("_dwa"):
        flags.append("--model.dwa=true")
    return flags


def shared_overrides(args, seed: int) -> list[str]:
    steps = max(1, math.ceil(args.tokens / (args.batch_size * args.seq_len)))
    return [f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}", "--grad_accum=1",
            f"--max_steps={steps}", f"--warmup_steps={max(1, round(0.05 * steps))}",
            f"--eval_interval={max(1, steps // args.evals)}", f"--ckpt_interval={args.ckpt_interval}",
            f"--data_dir={args.data_dir}", f"--seed={seed}", "--autocast_bf16=off", "--progress=false"]


def row_command(args, row: str, seed: int, extra: list[str]) -> list[str]:
    return ["treespec", "train", "--preset", "cpu-default", *shared_overrides(args, seed),
            *row_overrides(row, args, Path(args.results)), f"--out_dir={run_dir(Path(args.out), row, seed)}", *extra]


# --- speed: every finished row timed on this machine ------------------------------------

def time_training(summary: dict, steps: int, warmup: int) -> float:
    """tokens/s of the trainer's step for this run's configuration, on random tokens."""
    from train_throughput import build, fake_data_dir, summary as throughput, time_interleaved

    from treespec.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**{**summary["train_config"], "progress": False})
        n = max(4 * cfg.batch_size * (cfg.seq_len + 1), 65536)
        cfg = replace(cfg, data_dir=str(fake_data_dir(Path(tmp), n)), out_dir=str(Path(tmp) / "out"), max_steps=10**6)
        mode = build(cfg, bf16=False, loss="fused")
        time_interleaved([mode], steps, warmup)
        return throughput(mode, cfg)["tokens_per_s"]


def time_decoding(bundle: Path, dtype: str, args) -> dict:
    """`treespec bench` with no drafter: vanilla tokens/s and the one-token forward (ms)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "treespec.cli", "bench", "--bundle", str(bundle), "--drafters", "none",
               "--suite", "code", "--n", str(args.bench_prompts), "--max-new-tokens", str(args.bench_tokens),
               "--data-dir", args.data_dir, "--dtype", dtype, "--threads", str(args.threads), "--json", "--out", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"treespec bench failed on {bundle}: {proc.stderr.strip()[-500:]}")
        report = json.loads(proc.stdout)
    return {"tokens_per_s": report["drafters"]["none"]["tokens_per_s"], "forward_ms": report["modelled_verify_ms"][0],
            "precision": report["kernels"]["precision"]}


def timing_bundle(out: Path, row: str, seed: int, summary: dict, scratch: Path) -> Path:
    """The run's own bundle if this checkout trained it, else one of its configuration with
    fresh random weights (a forward's time depends on the shapes, not the values)."""
    bundle = run_dir(out, row, seed) / "bundle"
    if (bundle / "config.json").exists():
        return bundle
    from treespec.model.bundle import save_bundle
    from treespec.model.config import GPTConfig
    from treespec.model.gpt import GPT

    bundle = scratch / f"{row}-random"
    if not (bundle / "config.json").exists():
        save_bundle(bundle, GPT(GPTConfig(**summary["model_config"])).eval())
        print(f"{row}: no trained bundle in {out}; timing random weights of its shape ({bundle})", flush=True)
    return bundle


def speed(args, out: Path, results: Path, rows: list[str]) -> dict:
    import torch

    from treespec.model.kernels import cpu_summary

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    seed = {row: min(finished(results, row)) for row in rows if finished(results, row)}
    rows = [r for r in rows if r in seed]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    train = {r: [] for r in rows}
    decode = {r: {d: [] for d in dtypes} for r in rows}
    scratch = Path(tempfile.mkdtemp(prefix="width-speed-"))
    summaries = {row: finished(results, row)[seed[row]] for row in rows}
    bundles = {row: timing_bundle(out, row, seed[row], summaries[row], scratch) for row in rows}
    for rep in range(args.reps):
        order = rows[rep % len(rows):] + rows[:rep % len(rows)]  # a new first row each repetition
        for row in order:
            train[row].append(time_training(summaries[row], args.train_steps, 1))
            for d in dtypes:
                decode[row][d].append(time_decoding(bundles[row], d, args))
            print(f"[speed {rep + 1}/{args.reps}] {row}: train {train[row][-1]:.0f} tokens/s; "
                  + "; ".join(f"{d} {decode[row][d][-1]['forward_ms']:.2f} ms/forward, "
                              f"{decode[row][d][-1]['tokens_per_s']:.0f} tokens/s" for d in dtypes), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    result = {"cpu": cpu_summary(), "threads": args.threads, "reps": args.reps, "seed_timed": seed,
              "weights_timed": {row: "trained" if b.parent != scratch else "random, same shape"
                                for row, b in bundles.items()}, "rows": {}}
    for row in rows:
        result["rows"][row] = {
            "train_tokens_per_s": {"median": statistics.median(train[row]), "runs": train[row]},
            "decode": {d: {"forward_ms": statistics.median(x["forward_ms"] for x in v),
                           "tokens_per_s": statistics.median(x["tokens_per_s"] for x in v),
                           "precision": v[0]["precision"], "runs": v} for d, v in decode[row].items()}}
    return result


# --- report ----------------------------------------------------------------------------

REFERENCE = {"w256": "w384", "w256_embed": "w256", "w256_unet": "w256", "w384_dwa": "w384"}


def collect(results: Path, rows: list[str]) -> list[dict]:
    speeds = json.loads((results / "speed.json").read_text())["rows"] if (results / "speed.json").exists() else {}
    table = []
    for row in rows:
        runs = finished(results, row)
        if not runs:
            continue
        first = runs[min(runs)]
        final = f"exit_{N_LAYER}"
        domains = sorted(first["final_val_loss"][final])
        val = {e: {d: statistics.mean(s["final_val_loss"][e][d] for s in runs.values()) for d in domains}
               for e in first["final_val_loss"]}
        recs = [json.loads(l) for l in (run_dir(results, row, min(runs)) / "metrics.jsonl").read_text().splitlines() if l.strip()]
        mc = first["model_config"]
        table.append({
            "row": row, "description": ROWS[row], "seeds": sorted(runs),
            "n_embd": mc["n_embd"], "embed_skip": mc.get("embed_skip", False), "unet_skip": mc.get("unet_skip", False),
            "dwa": mc["dwa"], "parameters": first["parameters"], "tokens_seen": first["tokens_seen"],
            "val_loss": val, "val_loss_per_seed": {s: r["final_val_loss"][final] for s, r in runs.items()},
            "test_loss": {d: statistics.mean(s["final_test_loss"][final][d] for s in runs.values()) for d in domains},
            "train_tokens_per_s_as_trained": {s: r["tokens_per_s"] for s, r in runs.items()},
            "hardware_as_trained": {s: r["hardware"] for s, r in runs.items()},
            "val_curve": [{"tokens": r["tokens"], **r["val"][final]} for r in recs if "val" in r],
            "speed": speeds.get(row),
        })
    by_row = {t["row"]: t for t in table}
    if all(r in by_row for r in SKIP_ROWS) and "w256_skip_dwa" in by_row:
        REFERENCE["w256_skip_dwa"] = next(r for r in SKIP_ROWS if by_row[r]["embed_skip"] == by_row["w256_skip_dwa"]["embed_skip"])
    return table


def markdown(table: list[dict]) -> str:
    final = f"exit_{N_LAYER}"
    domains = sorted({d for t in table for d in t["val_loss"][final]})
    dtypes = sorted({d for t in table if t["speed"] for d in t["speed"]["decode"]})
    head = ["row", "params", "seeds", *[f"val {d}" for d in domains], "Δ vs reference",
            "exits 4 / 5 (mean of domains)", "train tokens/s",
            *[f"{d}: forward ms, tokens/s" for d in dtypes]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by_row = {t["row"]: t for t in table}
    for t in table:
        v = t["val_loss"][final]
        spread = {d: [s[d] for s in t["val_loss_per_seed"].values()] for d in domains}
        cells = [t["description"], f"{t['parameters'] / 1e6:.1f}M", ", ".join(map(str, t["seeds"])),
                 *[f"{v[d]:.3f}" + (f" ({'/'.join(f'{x:.3f}' for x in spread[d])})" if len(spread[d]) > 1 else "")
                   for d in domains]]
        ref = by_row.get(REFERENCE.get(t["row"], ""))
        cells.append(f"vs {ref['description']}: " + ", ".join(f"{d} {v[d] - ref['val_loss'][final][d]:+.3f}"
                                                              for d in domains) if ref else "–")
        cells.append("; ".join(f"{e.split('_')[1]}: {statistics.mean(l.values()):.3f}"
                               for e, l in t["val_loss"].items() if e != final))
        sp = t["speed"]
        cells.append(f"{sp['train_tokens_per_s']['median']:.0f}" if sp else "–")
        for d in dtypes:
            x = sp["decode"].get(d) if sp else None
            cells.append(f"{x['forward_ms']:.2f}, {x['tokens_per_s']:.0f}" if x else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], speeds: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = f"exit_{N_LAYER}"
    domains = sorted({d for t in table for d in t["val_loss"][final]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ((ax_curve, ax_bar), (ax_fwd, ax_trade)) = plt.subplots(2, 2, figsize=(13, 9))
    for i, t in enumerate(table):
        for j, d in enumerate(domains):
            pts = [(p["tokens"], p[d]) for p in t["val_curve"] if d in p]
            ax_curve.plot(*zip(*pts), color=colors[i % len(colors)], ls=["-", "--"][j % 2], marker="o", ms=2,
                          label=f"{t['description']} · {d}")
    ax_curve.set(title=f"held-out val loss, final exit (seed {table[0]['seeds'][0]})", xlabel="tokens seen",
                 ylabel="nats/token")
    ax_curve.legend(fontsize=6)

    width = 0.8 / len(table)
    for i, t in enumerate(table):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(domains))]
        bars = ax_bar.bar(xs, [t["val_loss"][final][d] for d in domains], width, color=colors[i % len(colors)],
                          label=t["description"])
        ax_bar.bar_label(bars, fmt="%.3f", fontsize=6)
        for x, d in zip(xs, domains):  # each seed's own value
            ax_bar.plot([x] * len(t["val_loss_per_seed"]), [s[d] for s in t["val_loss_per_seed"].values()], "k.", ms=3)
    vals = [t["val_loss"][final][d] for t in table for d in domains]
    ax_bar.set_ylim(min(vals) - 0.15, max(vals) + 0.1)
    ax_bar.set_xticks(range(len(domains)), domains)
    ax_bar.set(title="final val loss (bars: mean over seeds; dots: each seed)", ylabel="nats/token")
    ax_bar.legend(fontsize=6)

    timed = [t for t in table if t["speed"]]
    if timed:
        dtypes = sorted(timed[0]["speed"]["decode"])
        w = 0.8 / len(dtypes)
        for k, d in enumerate(dtypes):
            bars = ax_fwd.bar([i + (k - (len(dtypes) - 1) / 2) * w for i in range(len(timed))],
                              [t["speed"]["decode"][d]["forward_ms"] for t in timed], w, label=d)
            ax_fwd.bar_label(bars, fmt="%.2f", fontsize=6)
        ax_fwd.set_xticks(range(len(timed)), [t["description"] for t in timed], rotation=15, fontsize=6)
        cpu = speeds["cpu"] if speeds else {}
        ax_fwd.set(title=f"one-token forward, treespec bench ({cpu.get('model', '?')}, {speeds.get('threads')} threads)",
                   ylabel="ms")
        ax_fwd.legend(fontsize=7)
        d0 = dtypes[0]
        for i, t in enumerate(timed):
            ax_trade.scatter(t["speed"]["decode"][d0]["forward_ms"], statistics.mean(t["val_loss"][final].values()),
                             color=colors[table.index(t) % len(colors)], label=t["description"])
        ax_trade.set(title=f"quality against speed ({d0})", xlabel="one-token forward (ms)",
                     ylabel="val loss, mean of domains")
        ax_trade.legend(fontsize=6)
    else:
        for ax in (ax_fwd, ax_trade):
            ax.text(0.5, 0.5, "not timed yet: --speed", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"compressed width: {table[0]['tokens_seen']:,} training tokens per run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data-dir", default="data/default", help="from `treespec prepare-data`")
    ap.add_argument("--out", default="runs/width", help="one sub-folder per row and seed")
    ap.add_argument("--results", default="bench/results/width",
                    help="finished runs' summaries and metrics (kept in git), speed.json and the report")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows, in training order")
    ap.add_argument("--seeds", default="1337", help="comma-separated training seeds")
    ap.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per run")
    ap.add_argument("--wide", type=int, default=384, help="the baseline's width")
    ap.add_argument("--narrow", type=int, default=256, help="the compressed width")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--evals", type=int, default=10, help="val evaluations per run (for the curves)")
    ap.add_argument("--ckpt-interval", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print each run's command, train nothing")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the table and plot")
    ap.add_argument("--speed", action="store_true", help="time every finished row on this machine, then report")
    ap.add_argument("--reps", type=int, default=3, help="--speed: repetitions, rotating the order")
    ap.add_argument("--dtype", default="float32,w8a8", help="--speed: precisions for treespec bench")
    ap.add_argument("--train-steps", type=int, default=3, help="--speed: timed training steps per repetition")
    ap.add_argument("--bench-prompts", type=int, default=4)
    ap.add_argument("--bench-tokens", type=int, default=64)
    if argv is None:
        argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    out, results = Path(args.out), Path(args.results)
    if args.narrow % HEAD_DIM or args.wide % HEAD_DIM:
        ap.error(f"widths must be multiples of the head size {HEAD_DIM}")

    keep_finished(out, results)
    if args.speed:
        results.mkdir(parents=True, exist_ok=True)
        (results / "speed.json").write_text(json.dumps(speed(args, out, results, rows), indent=1) + "\n")
    elif not args.report_only:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for row in rows:
                if seed in finished(results, row):
                    print(f"[{row} seed {seed}] done already: {run_dir(results, row, seed)}")
                    continue
                if args.dry_run and row == "w256_skip_dwa" and not all(finished(results, r) for r in SKIP_ROWS):
                    print(f"[{row} seed {seed}] waits for {' and '.join(SKIP_ROWS)}: it takes the better skip")
                    continue
                train_row(run_dir(out, row, seed), row_command(args, row, seed, [f"--threads={args.threads}", *extra]),
                          args.dry_run, f"{row} seed {seed}")
                keep_finished(out, results)
        if args.dry_run:
            return 0
    table = collect(results, list(ROWS))
    if not table:
        print("no finished runs yet", file=sys.stderr)
        return 1
    speeds = json.loads((results / "speed.json").read_text()) if (results / "speed.json").exists() else None
    (results / "width.json").write_text(json.dumps({"rows": table, "speed": speeds}, indent=1) + "\n")
    plot(table, speeds, results / "width.png")
    print()
    print(markdown(table))
    print(f"\nwrote {results / 'width.json'} and {results / 'width.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
