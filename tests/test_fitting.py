"""Fitting apart from serving: the settings choice on synthetic simulations
(no LightGBM), and the drafter's meta.json as typed data."""

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from treespec.draft.artifact import META_FILE, DrafterError, read
from treespec.draft.simulation import HeldOut, Option, TreeView, make_grid, select, simulate_options

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "default" / "draft"


# --- select -----------------------------------------------------------------

def _option(speed=1.0, **kw) -> Option:
    base = dict(rounds=40, k_max=4, rule="lookahead", copy_through=False, p_min=0.05, trust_match=0, copy_k=0,
                copy_table=False, trusted_share=0.0, predict_ms=0.1, est_speedup=speed, tau=2.0,
                drafted_per_step=2.0)
    return Option(**{**base, **kw})


def test_select_keeps_the_fastest_setting():
    slow, fast = _option(2.0, p_min=0.05), _option(2.5, p_min=0.6, rule="myopic", trust_match=2, copy_k=3)
    assert select([slow, fast, _option(1.0)]) is fast


@pytest.mark.parametrize("plain, fancy", [
    # Within the noise (0.5%) of the best, the plainer setting wins, in this order:
    (dict(trust_match=0, copy_k=0), dict(trust_match=1, copy_k=4)),  # the tree deciding every step
    (dict(copy_through=False), dict(copy_through=True)),  # the plain __MODEL__ handback
    (dict(trust_match=1, copy_k=4), dict(trust_match=1, copy_k=4, copy_table=True)),  # a fixed copy length
    (dict(rule="lookahead"), dict(rule="myopic")),  # then the more permissive: lookahead,
    (dict(k_max=6), dict(k_max=5)),  # the longest drafts,
    (dict(p_min=0.1), dict(p_min=0.15)),  # the lowest p_min,
    (dict(rounds=20), dict(rounds=40)),  # the cheaper model,
    (dict(trust_match=1, copy_k=4), dict(trust_match=1, copy_k=3)),  # the longer copy
])
def test_select_breaks_near_ties_towards_the_plainer_setting(plain, fancy):
    a, b = _option(3.0, **plain), _option(3.0 / 0.996, **fancy)  # b is faster, but within 0.5%
    assert select([b, a]) is a and select([a, b]) is a
    assert select([a, _option(3.0 / 0.99, **fancy)]).est_speedup > 3.0  # clearly faster: it wins


def test_select_gives_exact_ties_to_the_first_candidate():
    # Trusting a 1-token or a 2-token match can copy the very same steps.
    one, two = _option(3.0, trust_match=1, copy_k=4), _option(3.0, trust_match=2, copy_k=4)
    assert select([one, two]) is one and select([two, one]) is two


def _old_select(options: list[dict]) -> dict:
    # The kept-setting rule written out over meta.json's option dicts (fit.simulation.options),
    # to check select against on many random near-ties and exact ties.
    top = max(o["est_speedup"] for o in options)
    return min((o for o in options if o["est_speedup"] >= top * 0.995),
               key=lambda o: (o["trust_match"] > 0, o["copy_through"], o["copy_table"], o["rule"] != "lookahead",
                              -o["k_max"], o["p_min"], o["rounds"], -o["copy_k"]))


def test_select_agrees_with_the_rule_over_option_dicts_on_random_simulations():
    rng = np.random.default_rng(0)
    for _ in range(200):
        options = [_option(float(rng.choice([2.0, 2.004, 2.008, 2.02])), rounds=int(rng.choice([10, 20])),
                           k_max=int(rng.integers(1, 4)), rule=str(rng.choice(["myopic", "lookahead"])),
                           copy_through=bool(rng.integers(2)), p_min=float(rng.choice([0.05, 0.1])),
                           trust_match=int(rng.integers(3)), copy_k=int(rng.integers(1, 4)),
                           copy_table=bool(rng.integers(2))) for _ in range(30)]
        old = _old_select([asdict(o) for o in options])
        assert asdict(select(options)) == old
        assert options.index(select(options)) == [asdict(o) for o in options].index(old)


# --- the grid and the simulation ---------------------------------------------

def test_the_grid_is_simulated_in_the_order_of_the_old_nested_loops():
    grid = make_grid(k_max=3, best_rounds=12, ngram_max_n=3)
    assert grid.rounds == [5, 10, 12] and grid.copy_through == (False, True) and grid.trust_match == [0, 1, 2, 3]
    want = [(k, rule, ct, pm) for k in range(1, 4) for rule in ("myopic", "lookahead") for ct in (False, True)
            for pm in grid.p_min]
    assert [(r.k_max, r.rule, r.copy_through, r.p_min) for r in grid.tree_rules()] == want
    cuts = [(m, kc) for m in range(4) for kc in ([1, 2, 3, None] if m else [0])]
    assert [(s.trust_match, s.copy_k) for s in grid.shortcuts()] == cuts
    assert grid.p_min[0] == 0.05 and grid.p_min[-1] == 0.95 and len(grid.p_min) == 19
    fixed = make_grid(k_max=3, best_rounds=400, ngram_max_n=3, p_min=0.3, copy_through=True, trust_match=0)
    assert fixed.rounds == [5, 10, 20, 40, 80, 160, 320, 400]
    assert (fixed.p_min, fixed.copy_through, fixed.trust_match) == ([0.3], (True,), [0])
    assert [(s.trust_match, s.copy_k) for s in fixed.shortcuts()] == [(0, 0)]


def _two_steps(table_len=(0, 0)) -> HeldOut:
    # Step 0 has a 2-token match whose copy the model accepts whole; step 1
    # has nothing to copy. The verify costs the same for 1 to 3 positions.
    return HeldOut(valid=np.ones((2, 2), bool), target=np.array([[5, 6], [7, 8]]), cand=np.full((2, 2), -1),
                   match0=np.array([2, 0]), copy_len=np.array([2, 0]), copy_run=np.array([2, 0]),
                   table_len=np.asarray(table_len), verify_ms=np.array([1.0, 1.0, 1.0]), state_ms=0.0, copy_ms=0.0)


def test_simulated_options_on_a_synthetic_held_out_set():
    never = np.full((2, 2), -1)  # a tree that always says __MODEL__
    view = TreeView(rounds=7, probs=np.zeros((4, 3)), token=never, p=np.zeros((2, 2)), p_cand=np.zeros((2, 2)),
                    predict_ms=0.0)
    grid = replace(make_grid(k_max=2, best_rounds=7, ngram_max_n=2), p_min=[0.5])
    options = simulate_options(_two_steps(), view, grid)
    assert len(options) == len(grid.tree_rules()) * len(grid.shortcuts())
    by = {(o.k_max, o.rule, o.copy_through, o.trust_match, o.copy_k, o.copy_table): o for o in options}
    # The tree alone drafts nothing: one token per step.
    plain = by[(2, "lookahead", False, 0, 0, False)]
    assert (plain.est_speedup, plain.tau, plain.drafted_per_step, plain.trusted_share) == (1.0, 1.0, 0.0, 0.0)
    # Trusting the match copies 2 tokens at step 0, both accepted: 3 + 1 tokens in 2 forwards.
    copy = by[(2, "lookahead", False, 1, 2, False)]
    assert (copy.est_speedup, copy.tau, copy.drafted_per_step, copy.trusted_share) == (2.0, 2.0, 1.0, 0.5)
    assert by[(1, "lookahead", False, 1, 2, False)].est_speedup == 1.5  # a request drafts at most k_max
    assert by[(2, "lookahead", False, 1, 2, True)].est_speedup == 1.0  # the table says 0 there: the tree decides
    # A 1-token and a 2-token trusted match copy the same steps: the first is kept.
    best = select(options)
    assert (best.k_max, best.rule, best.trust_match, best.copy_k, best.copy_table) == (2, "lookahead", 1, 2, False)
    assert (best.rounds, best.predict_ms) == (7, 0.0)
    table = simulate_options(_two_steps(table_len=(2, 0)), view, grid)
    assert select(table).est_speedup == 2.0


# --- the artifact -----------------------------------------------------------

def test_the_shipped_meta_json_reads_and_writes_back_byte_for_byte(tmp_path):
    meta = read(SHIPPED / META_FILE)
    s = meta.settings
    assert (s.k_max, s.p_min, s.rule, s.lookahead, s.trust_match, s.copy_k) == (8, 0.05, "lookahead", True, 1, 8)
    assert s.copy_lengths is not None and s.corpus_bigram.file == "bigram.safetensors"
    assert meta.features.K == len(meta.classes["tokens"]) and meta.context_len == (32 + 384) // 2
    meta.write(tmp_path / META_FILE)
    assert (tmp_path / META_FILE).read_bytes() == (SHIPPED / META_FILE).read_bytes()


@pytest.fixture
def draft_copy(tmp_path):
    """The shipped drafter's folder, to break: (meta.json path, its contents)."""
    d = tmp_path / "draft"
    shutil.copytree(SHIPPED, d)
    return d / META_FILE, json.loads((d / META_FILE).read_text())


def test_unknown_keys_survive_a_rewrite_after_the_known_ones(draft_copy):
    path, m = draft_copy
    m["fitted_by"] = "a newer treespec"
    m["settings"]["new_knob"] = {"on": True}
    path.write_text(json.dumps(m, indent=1) + "\n")
    meta = read(path)
    assert meta.extra == {"fitted_by": "a newer treespec"} and meta.settings.extra == {"new_knob": {"on": True}}
    again = path.with_name("again.json")
    meta.write(again)
    assert again.read_text() == path.read_text()
    assert list(read(again).to_dict())[-1] == "fitted_by"


def test_settings_a_file_lacks_default_to_the_drafter_without_them(draft_copy):
    path, m = draft_copy
    m["settings"] = {k: m["settings"][k] for k in ("k_max", "p_min", "verify_ms", "predict_ms")}
    path.write_text(json.dumps(m))
    s = read(path).settings
    assert (s.rule, s.copy_through, s.trust_match, s.copy_k, s.copy_lengths, s.corpus_bigram) == \
        ("myopic", False, 0, 0, None, None)
    assert s.proposal_ms is None and "proposal_ms" not in s.to_dict()  # never measured: not written


def _bundle_for(m: dict, **kw) -> SimpleNamespace:
    f = m["features"]
    config = SimpleNamespace(n_embd=len(f["pca_mean"]), exit_layers=list(range(f["n_exits"] + 1)))
    return SimpleNamespace(path=Path("/bundles/b"), weights_sha256=m["weights_sha256"], config=config, **kw)


def _break(m: dict, how: str) -> dict | str:
    m = json.loads(json.dumps(m))
    if how == "json":
        return "{not json"
    if how == "format":
        m["format"] = "something-else"
    elif how == "format_version":
        m["format_version"] = 2
    elif how == "feature_version":
        m["feature_version"] = 1
    elif how == "model_file":
        m["model_file"] = "gone.txt"
    elif how == "model_sha256":
        m["model_sha256"] = "0" * 64
    elif how == "features":
        del m["features"]["pca_components"]
    elif how == "settings":
        del m["settings"]
    elif how == "k_max":
        del m["settings"]["k_max"]
    elif how == "verify_ms":
        m["settings"]["verify_ms"] = "fast"
    elif how == "rule":
        m["settings"]["rule"] = "greedy"
    elif how == "copy_lengths":
        m["settings"]["copy_lengths"]["seen"] = [[0] * 4]
    elif how == "corpus_bigram":
        m["settings"]["corpus_bigram"] = {"sha256": "00"}
    return m


@pytest.mark.parametrize("how, says", [
    ("json", "not valid JSON"),
    ("format", "not a treespec tree drafter of format version 1"),
    ("format_version", "version 2"),
    ("feature_version", r"fitted with feature version 1, .*refit it with `treespec draft-fit --bundle /bundles/b`"),
    ("model_file", "gone.txt: missing LightGBM model file"),
    ("model_sha256", "tree.txt: checksum does not match meta.json"),
    ("features", "bad feature spec"),
    ("settings", "no settings"),
    ("k_max", "settings lack 'k_max'"),
    ("verify_ms", "bad settings"),
    ("rule", "unknown stopping rule 'greedy'"),
    ("copy_lengths", "bad copy-length table"),
    ("corpus_bigram", "bad corpus bigram"),
])
def test_a_broken_meta_json_is_refused_with_what_is_wrong(draft_copy, how, says):
    path, m = draft_copy
    broken = _break(m, how)
    path.write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(DrafterError, match=says) as e:
        read(path, _bundle_for(m))
    assert str(e.value).startswith(str(path.parent))  # names the file


def test_a_drafter_for_other_weights_or_another_shape_is_refused(draft_copy):
    path, m = draft_copy
    with pytest.raises(DrafterError, match=r"no fitted tree drafter in this bundle; run `treespec draft-fit"):
        read(path.parent / "missing.json", _bundle_for(m))
    other = _bundle_for(m)
    other.weights_sha256 = "f" * 64
    with pytest.raises(DrafterError, match="fitted against model weights with sha256") as e:
        read(path, other)
    assert m["weights_sha256"] in str(e.value) and "f" * 64 in str(e.value)
    wider = _bundle_for(m)
    wider.config.n_embd += 1
    with pytest.raises(DrafterError, match="feature spec is for a model with n_embd"):
        read(path, wider)
    assert read(path).weights_sha256 == m["weights_sha256"]  # without a bundle: only the file's own checks


def test_tree_drafter_refuses_an_unreadable_model_file(tmp_path):
    from treespec.draft.tree import TreeDrafter
    from treespec.model import load_bundle
    from treespec.model.tokenizer import sha256_file

    bundle = load_bundle(REPO / "models" / "default")
    shutil.copytree(SHIPPED, tmp_path / "draft")
    m = json.loads((tmp_path / "draft" / META_FILE).read_text())
    (tmp_path / "draft" / "tree.txt").write_text("not a LightGBM model\n")
    m["model_sha256"] = sha256_file(tmp_path / "draft" / "tree.txt")
    (tmp_path / "draft" / META_FILE).write_text(json.dumps(m))
    with pytest.raises(DrafterError, match="unreadable LightGBM model"):
        TreeDrafter.load(replace(bundle, path=tmp_path))  # its weights, with the draft folder here
