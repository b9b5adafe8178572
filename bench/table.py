"""The markdown table in docs/speculative.md, from `treespec bench` JSON files.

    python bench/table.py bench/results/default-{code,prose}-T0.json bench/results/default-{code,prose}-T0.8.json \
        --versus tree:ngram

Prints one row per drafter per file, in the files' order, so the docs quote
what the benchmark wrote rather than numbers copied by hand. ``--versus``
lines also give the modelled ratio where the JSON has one: the runs' steps
priced on one verify curve (``treespec.cli.bench.modelled_s``), free of the
machine's drift between runs. The intervals are recomputed from the per-prompt
runs each file holds (``treespec.cli.bench.ratio_ci``), so a file written
before a fix to that statistic prints the fixed interval.
"""

from __future__ import annotations

import argparse
import json

from treespec.cli.bench import ratio_ci

HEAD = ("suite", "T", "drafter", "tok/s", "speedup", "95% CI", "τ", "acc@1", "acc@2", "acc@3", "draft%", "ms/draft",
        "ms/verify", "identical to vanilla")


def rows(result: dict) -> list[list[str]]:
    out = []
    for name in result["runs"]:
        r = result["drafters"][name]
        acc = r.get("acceptance_per_position") or []
        cells = [f"{acc[j]:.2f}" if j < len(acc) and name != "none" else "–" for j in range(3)]
        ci = r.get("speedup_ci95")
        ci = f"{ci[0]:.2f}–{ci[1]:.2f}×" if ci and name != "none" else "–"
        out.append([result["suite"], f"{result['temperature']:g}", name, f"{r['tokens_per_s']:.1f}",
                    f"{r['speedup']:.2f}×", ci, f"{r['tau']:.2f}", *cells, f"{100 * r['drafter_share']:.1f}%",
                    f"{r['drafter_ms_per_step']:.2f}", f"{r['verify_ms_per_step']:.2f}",
                    "n/a" if r.get("identical") is None else f"{r['identical']}/{r['prompts']}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="JSON files written by `treespec bench --out`")
    ap.add_argument("--versus", action="append", default=[], metavar="A:B",
                    help="also list drafter A's speed over drafter B's per file, with its 95%% interval")
    args = ap.parse_args()
    results = []
    for path in args.files:
        with open(path) as f:
            results.append(json.load(f))
    lines = ["| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
    for result in results:
        lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    for pair in args.versus:
        a, _, b = pair.partition(":")
        lines.append("")
        for result in results:
            d = result["drafters"]
            if a in d and b in d and b in d[a].get("ratio_ci95", {}):
                runs = result.get("runs", {})
                lo, hi = ratio_ci(runs[a], runs[b]) if a in runs and b in runs else d[a]["ratio_ci95"][b]
                line = (f"- {result['suite']}, T = {result['temperature']:g}: {a} / {b} = "
                        f"{d[a]['tokens_per_s'] / d[b]['tokens_per_s']:.2f}× (95% interval {lo:.2f}–{hi:.2f})")
                if "modelled_speedup" in d[a] and b in d[a].get("modelled_ratio_ci95", {}):
                    mlo, mhi = (ratio_ci(runs[a], runs[b], time_key="modelled_s") if a in runs and b in runs
                                else d[a]["modelled_ratio_ci95"][b])
                    line += (f"; modelled {d[a]['modelled_speedup'] / d[b]['modelled_speedup']:.2f}× "
                             f"({mlo:.2f}–{mhi:.2f})")
                lines.append(line)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
