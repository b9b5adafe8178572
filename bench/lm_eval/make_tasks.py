"""Offline lm-eval tasks from a prepared corpus's test split, to drive the server's
/v1/completions with lm-eval's ``local-completions`` model (docs/serving.md).

    python bench/lm_eval/make_tasks.py --data-dir data/default --out runs/lm_eval_tasks
    lm_eval --model local-completions --tasks treespec_next_line,treespec_line_completion \\
        --include_path runs/lm_eval_tasks --model_args \\
        model=default,base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=remote,batch_size=8

Two tasks, each over ``--n`` windows of the test documents (code and prose alike):
``treespec_next_line`` scores the next line given the lines before it (loglikelihood:
echo + logprobs, what lm-eval's multiple-choice and perplexity tasks send), and
``treespec_line_completion`` asks for the rest of a line greedily (generate_until "\\n",
exact match). lm-eval would download its stock datasets; these need no network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = {
    "treespec_next_line": """task: treespec_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
target_delimiter: ""
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{next_line}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "treespec_line_completion": """task: treespec_line_completion
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
target_delimiter: ""
doc_to_text: "{{{{context_with_start}}}}"
doc_to_target: "{{{{line_rest}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="data/default")
    ap.add_argument("--out", default="runs/lm_eval_tasks")
    ap.add_argument("--n", type=int, default=64, help="windows")
    ap.add_argument("--context-chars", type=int, default=600)
    args = ap.parse_args(argv)

    from treespec.model import Tokenizer
    from treespec.training.data import load_meta, load_split

    meta, tokens = load_meta(args.data_dir), load_split(args.data_dir, "test")
    tok = Tokenizer()
    docs = [tok.decode(tokens[d["start"]:d["end"]].tolist()) for d in meta["splits"]["test"]["document_list"]]
    rows = []
    for i in range(args.n):
        text = docs[i % len(docs)]
        lines = text.splitlines(keepends=True)
        j = 3 + (i * 7919) % max(1, len(lines) - 4)  # a line well inside the document
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines):
            continue
        context = "".join(lines[:j])[-args.context_chars:]
        line = lines[j].rstrip("\n")
        cut = max(1, len(line) // 3)
        rows.append({"context": context, "next_line": line, "context_with_start": context + line[:cut],
                     "line_rest": line[cut:]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "windows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in TASKS.items():
        (out / f"{name}.yaml").write_text(text.format(data=data.resolve()))
    print(f"wrote {len(rows)} windows and {len(TASKS)} tasks to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
