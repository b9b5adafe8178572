"""Ablation: does each seed idea pay? Same small model, same token budget, one `treespec train` per row.

    python bench/ablation.py --data-dir data/default --out runs/ablation

Rows (docs/training.md, "Ablation"):

  single_exit               baseline: one exit, the final block only
  multi_exit                exits at the seed's 8/10/12-of-12 positions, weights 0.05/0.15/0.8, cosine LR
  multi_exit_dwa            multi_exit + DenseFormer depth-weighted averaging
  multi_exit_hypergradient  multi_exit with the hypergradient LR instead of cosine

Each row trains into ``OUT/ROW`` and is resumable: run the same command again
and finished rows are skipped, interrupted ones continue from their
checkpoint (``--resume``). Then it writes ``OUT/ablation.json`` (every row's
command, held-out val loss per exit per domain, tokens/s), ``OUT/ablation.png``
and prints a markdown table. ``--report-only`` redraws those from finished rows.
Anything after ``--`` is passed to every row as ``--key=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

from treespec.model.config import default_exit_weights, seed_exit_layers

ROWS = {
    "single_exit": "baseline: single exit",
    "multi_exit": "multi-exit, cosine LR",
    "multi_exit_dwa": "multi-exit + DWA",
    "multi_exit_hypergradient": "multi-exit + hypergradient LR",
}


def row_overrides(row: str, n_layer: int) -> list[str]:
    """What distinguishes a row; everything else is shared."""
    if row == "single_exit":
        return [f"--model.exit_layers=[{n_layer}]", "--model.exit_loss_weights=[1.0]"]
    # The seed's exits (8/10/12 of 12) scaled to n_layer, and its weights
    # (0.05/0.15/0.8 when that gives three exits).
    layers = seed_exit_layers(n_layer)
    weights = default_exit_weights(len(layers))
    multi = [f"--model.exit_layers={json.dumps(list(layers), separators=(',', ':'))}",
             f"--model.exit_loss_weights={json.dumps([round(w, 6) for w in weights], separators=(',', ':'))}"]
    return multi + {"multi_exit": [], "multi_exit_dwa": ["--model.dwa=true"],
                    "multi_exit_hypergradient": ["--lr_schedule=hypergradient"]}[row]


def shared_overrides(args) -> list[str]:
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    steps = max(1, math.ceil(args.tokens / tokens_per_step))
    return [
        f"--model.n_layer={args.n_layer}", f"--model.n_embd={args.n_embd}", f"--model.n_head={args.n_head}",
        f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}", f"--grad_accum={args.grad_accum}",
        f"--max_steps={steps}", f"--warmup_steps={max(1, round(0.05 * steps))}",
        f"--eval_interval={max(1, steps // args.evals)}", f"--ckpt_interval={args.ckpt_interval}",
        f"--data_dir={args.data_dir}", f"--seed={args.seed}",
    ]


def row_command(args, row: str, extra: list[str]) -> list[str]:
    """`treespec train ...` for one row (without --resume)."""
    return ["treespec", "train", "--preset", "cpu-default", *shared_overrides(args),
            *row_overrides(row, args.n_layer), f"--out_dir={Path(args.out) / row}", *extra]


def run_row(args, row: str, extra: list[str]) -> None:
    train_row(Path(args.out) / row, row_command(args, row, extra), args.dry_run, row)


def train_row(out: Path, cmd: list[str], dry_run: bool, row: str) -> None:
    """Run ``treespec train`` (``cmd``) into ``out`` unless it finished there;
    resume it from its checkpoint if it was interrupted."""
    if (out / "training_summary.json").exists():
        print(f"[{row}] done already: {out / 'training_summary.json'}")
        return
    resume = (out / "ckpt.pt").exists()
    print(f"[{row}] {'resuming' if resume else 'starting'}: {shlex.join(cmd)}", flush=True)
    if dry_run:
        return
    argv = [sys.executable, "-m", "treespec.cli", *cmd[1:], *(["--resume"] if resume else [])]
    proc = subprocess.Popen(argv)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the trainer too: it finishes its step and checkpoints.
        # (subprocess.run would kill it 0.25 s later, losing that checkpoint.)
        print(f"[{row}] interrupted: waiting for the trainer to save its checkpoint (Ctrl-C again to kill it)")
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            raise
    if rc != 0:
        raise SystemExit(f"[{row}] treespec train exited with {rc}; rerun this command to resume it")
    if not (out / "training_summary.json").exists():  # stopped by a signal: checkpointed
        raise SystemExit(f"[{row}] stopped before the end; rerun this command to resume it")


# --- report -------------------------------------------------------------------------

def collect(args, rows: list[str], extra: list[str]) -> list[dict]:
    table = []
    for row in rows:
        out = Path(args.out) / row
        summary_path = out / "training_summary.json"
        if not summary_path.exists():
            continue
        s = json.loads(summary_path.read_text())
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        final_exit = f"exit_{s['model_config']['n_layer']}"
        table.append({
            "row": row, "description": ROWS[row], "command": shlex.join(row_command(args, row, extra)),
            "exit_layers": s["model_config"]["exit_layers"], "dwa": s["model_config"]["dwa"],
            "lr_schedule": s["train_config"]["lr_schedule"], "parameters": s["parameters"],
            "tokens_seen": s["tokens_seen"], "wall_time_s": s["wall_time_s"], "tokens_per_s": s["tokens_per_s"],
            "final_exit": final_exit, "val_loss": s["final_val_loss"],
            "val_curve": [{"tokens": r["tokens"], **r["val"][final_exit]} for r in recs if "val" in r],
            "lr_curve": [[r["tokens"], r["lr"]] for r in recs if "lr" in r],
            "hardware": s["hardware"],
        })
    return table


# Each idea is measured against the row without it.
REFERENCE = {"multi_exit": "single_exit", "multi_exit_dwa": "multi_exit", "multi_exit_hypergradient": "multi_exit"}


def markdown(table: list[dict]) -> str:
    domains = sorted({d for t in table for d in t["val_loss"][t["final_exit"]]})
    by_row = {t["row"]: t for t in table}
    head = ["row", *[f"val {d} (final exit)" for d in domains], "Δ final exit vs the row without the idea",
            "intermediate exits' val loss", "tokens/s", "tokens", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for t in table:
        final = t["val_loss"][t["final_exit"]]
        cells = [t["description"], *[f"{final[d]:.3f}" for d in domains]]
        ref = by_row.get(REFERENCE.get(t["row"], ""))
        if ref:
            rf = ref["val_loss"][ref["final_exit"]]
            cells.append(f"vs {ref['description']}: " + ", ".join(f"{d} {final[d] - rf[d]:+.3f}" for d in domains))
        else:
            cells.append("–")
        inter = [f"{e}: " + ", ".join(f"{d} {v:.3f}" for d, v in sorted(l.items()))
                 for e, l in t["val_loss"].items() if e != t["final_exit"]]
        cells += ["; ".join(inter) or "–", f"{t['tokens_per_s']:.0f}", f"{t['tokens_seen']:,}",
                  f"{t['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({d for t in table for d in t["val_loss"][t["final_exit"]]})
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_curve, ax_bar), (ax_lr, ax_tps) = axes

    for i, t in enumerate(table):
        for j, d in enumerate(domains):
            pts = [(p["tokens"], p[d]) for p in t["val_curve"] if d in p]
            if pts:
                ax_curve.plot(*zip(*pts), color=colors[i % len(colors)], ls=styles[j % len(styles)], marker="o",
                              ms=2, label=f"{t['description']} · {d}")
        ax_lr.plot(*zip(*t["lr_curve"]), color=colors[i % len(colors)], label=t["description"])
    ax_curve.set(title="held-out val loss, final exit", xlabel="tokens seen", ylabel="nats/token")
    ax_curve.legend(fontsize=7)
    ax_lr.set(title="learning rate", xlabel="tokens seen")
    ax_lr.legend(fontsize=7)

    width = 0.8 / max(1, len(table))
    for i, t in enumerate(table):
        vals = [t["val_loss"][t["final_exit"]].get(d, float("nan")) for d in domains]
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(domains))]
        bars = ax_bar.bar(xs, vals, width, color=colors[i % len(colors)], label=t["description"])
        ax_bar.bar_label(bars, fmt="%.3f", fontsize=7)
    ax_bar.set_xticks(range(len(domains)), domains)
    ax_bar.set(title="final val loss, final exit (lower is better)", ylabel="nats/token")
    lo = min(v for t in table for v in t["val_loss"][t["final_exit"]].values())
    hi = max(v for t in table for v in t["val_loss"][t["final_exit"]].values())
    ax_bar.set_ylim(max(0.0, lo - 0.25 * (hi - lo + 0.1)), hi + 0.25 * (hi - lo + 0.1))
    ax_bar.legend(fontsize=7)

    bars = ax_tps.bar(range(len(table)), [t["tokens_per_s"] for t in table],
                      color=[colors[i % len(colors)] for i in range(len(table))])
    ax_tps.bar_label(bars, fmt="%.0f", fontsize=7)
    ax_tps.set_xticks(range(len(table)), [t["description"] for t in table], rotation=15, fontsize=7)
    ax_tps.set(title="training throughput", ylabel="tokens/s")
    hw = table[0]["hardware"]
    fig.suptitle(f"ablation: {table[0]['tokens_seen']:,} tokens per row on {hw['device']} "
                 f"({hw.get('gpu') or hw.get('cpu')}, {hw.get('threads')} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data-dir", default="data/default", help="from `treespec prepare-data`")
    ap.add_argument("--out", default="runs/ablation", help="one sub-folder per row")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    ap.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per row")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--evals", type=int, default=10, help="val evaluations per row (for the curves)")
    ap.add_argument("--ckpt-interval", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--dry-run", action="store_true", help="print each row's command, train nothing")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the table and plot")
    if argv is None:
        argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")

    if not args.report_only:
        for row in rows:
            run_row(args, row, extra)
        if args.dry_run:
            return 0
    table = collect(args, rows, extra)
    if not table:
        print("no finished rows yet", file=sys.stderr)
        return 1
    out = Path(args.out)
    (out / "ablation.json").write_text(json.dumps({"rows": table}, indent=1) + "\n")
    plot(table, out / "ablation.png")
    print()
    print(markdown(table))
    print(f"\nwrote {out / 'ablation.json'} and {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
