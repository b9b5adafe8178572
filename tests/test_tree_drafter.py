"""The tree drafter: features, fitting, loading and the drafting rule, on tiny models."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import DRAFT_K_MAX as K_MAX
from conftest import tiny_model
from treespec.draft.features import FEATURE_VERSION, features_for, top_indices
from treespec.draft.collect import build_rows, collect, windows
from treespec.draft.copylen import CopyLengths
from treespec.draft.corpus import CorpusBigram
from treespec.draft.ngram import ngram_candidate, ngram_continuation, ngram_copy_evidence
from treespec.draft.tree import DrafterError, TreeDrafter, choose
from treespec.draft.types import ModelFeatures, SamplingParams
from treespec.model import load_bundle, save_bundle
from treespec.training.data import load_split


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """The timing tests here simulate a busy or quiet machine with sleeping
    stubs; how busy the machine running the suite is must not count (a test
    that wants a busy one sets its own CpuShare)."""
    from treespec.draft import costs

    class Quiet:
        def others(self):
            return 0.0

    monkeypatch.setattr(costs, "CpuShare", Quiet)


def _engine_features(out, row: int, n_vocab: int) -> ModelFeatures:
    # What the decode loop hands the drafter after a forward: one position's view.
    return ModelFeatures(logits=out.logits[0, row, :n_vocab], hidden=out.hidden[0, row],
                         exit_hidden=[h[0, row] for h in out.exit_hidden])


def test_draft_fit_writes_a_drafter_that_loads(fitted):
    path, log = fitted
    assert "__MODEL__: precision" in log and "depth" in log
    files = sorted(p.name for p in (path / "draft").iterdir())
    assert files == ["bigram.safetensors", "meta.json", "tree.txt"]  # LightGBM text, safetensors + JSON, never a pickle
    bundle = load_bundle(path)
    meta = json.loads((path / "draft" / "meta.json").read_text())
    assert meta["weights_sha256"] == bundle.weights_sha256
    assert meta["feature_version"] == FEATURE_VERSION
    assert 0 < len(meta["classes"]["tokens"]) <= 12
    assert len(meta["features"]["pca_components"]) == 4
    drafter = TreeDrafter.load(bundle)
    assert 1 <= drafter.k_max <= K_MAX and drafter.name == "tree"  # draft-fit picks k_max up to --k-max
    assert meta["fit"]["k_max_considered"] == K_MAX and drafter.k_max == meta["settings"]["k_max"]
    assert TreeDrafter.load(bundle, k_max=2, p_min=0.75).p_min == 0.75
    # The kept setting is the simulation's best (near-ties aside), and loads as fitted.
    st, sim = meta["settings"], meta["fit"]["simulation"]
    assert sim["tree"]["est_speedup"] >= 0.995 * max(o["est_speedup"] for o in sim["options"])
    assert (drafter.copy_through, drafter.trust_match) == (st["copy_through"], st["trust_match"])
    assert 0 <= st["trust_match"] <= 3 and (st["trust_match"] == 0 or 1 <= st["copy_k"] <= K_MAX)
    assert "trust" in log and "copy-through" in log
    # The single-row C fast path computes what Booster.predict computes.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, len(drafter.spec.names())))
    X[:, drafter.spec.categorical()] = rng.integers(0, drafter.spec.K + 2, size=(20, len(drafter.spec.categorical())))
    want = drafter.booster.predict(X, num_threads=1)
    got = np.stack([drafter.predict(x) for x in X])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("V", [50257, 2049, 1024, 100, 7])
def test_top_indices_is_an_exact_top_a(V):
    rng = np.random.default_rng(V)
    x = rng.standard_normal((6, V)).astype(np.float32)
    x[0] = np.round(x[0])  # many ties: the values must still be the top ones
    x[1, -1] = 50.0  # the largest in the last, partial group
    for a in (2, 4):
        got = top_indices(x, a)
        ref = np.argsort(-x, axis=1, kind="stable")[:, :a]
        assert np.array_equal(np.take_along_axis(x, got, 1), np.take_along_axis(x, ref, 1))
        assert np.array_equal(got[1:], ref[1:])  # without ties, the very same columns
        for r in range(len(x)):  # a row gives the same answer alone as in a batch
            assert np.array_equal(top_indices(x[r:r + 1], a)[0], got[r])


def test_features_identical_at_fit_and_serve_time(fitted, draft_corpus):
    path, _ = fitted
    bundle = load_bundle(path)
    drafter = TreeDrafter.load(bundle)
    spec, model, n_vocab = drafter.spec, bundle.model, bundle.tokenizer.n_vocab
    data = load_split(draft_corpus, "train")
    steps = 6
    batches = windows([(0, len(data))], 4, 4, 10, 20, np.random.default_rng(5))
    col = collect(model, spec, data, batches, steps, K_MAX, progress=False)
    rows = build_rows(col, spec, threshold=0.0, eot=bundle.tokenizer.eot_id)
    K = spec.K
    # Labels follow the rule: __COPY__ iff the n-gram candidate is the model's
    # token, a token class only for that very token.
    assert np.array_equal(rows.y == K, rows.cand == rows.target)
    tok_rows = rows.y < K
    assert np.array_equal(np.asarray(spec.classes)[rows.y[tok_rows]], rows.target[tok_rows])

    cat = spec.categorical() + [len(spec.names()) - 2, len(spec.names()) - 1]  # + ngram_len, depth
    checked = 0
    for s in range(len(col.tokens)):
        toks, L = col.tokens[s], col.prompt_len[s]
        # Serving: one sequence, the prompt prefilled, then one token per forward.
        cache = model.new_cache(batch_size=1)
        out = model.forward_step(torch.tensor([toks[:L]]), 0, cache)
        states = [drafter.state(_engine_features(out, L - 1, n_vocab))]
        for t in range(steps - 1):
            out = model.forward_step(torch.tensor([[toks[L + t]]]), L + t, cache)
            states.append(drafter.state(_engine_features(out, 0, n_vocab)))
        for r in np.flatnonzero(rows.seq == s):
            i, j = int(rows.step[r]), int(rows.depth[r])
            ctx = toks[:L + i + j + 1]
            serve = features_for(spec, states[i], [ctx], [j])[0]
            fit = rows.X[r]
            np.testing.assert_array_equal(serve[cat], fit[cat])
            np.testing.assert_allclose(serve, fit, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == len(rows.y) > 0


def test_drafter_fitted_to_other_weights_is_refused(fitted, tmp_path, ranks_path):
    path, _ = fitted
    other = save_bundle(tmp_path / "other", tiny_model(seed=1), ranks_path)
    shutil.copytree(path / "draft", other / "draft")
    theirs, ours = load_bundle(other), load_bundle(path)
    with pytest.raises(DrafterError) as e:
        TreeDrafter.load(theirs)
    assert theirs.weights_sha256 in str(e.value) and ours.weights_sha256 in str(e.value)

    meta_path = tmp_path / "copy" / "draft" / "meta.json"
    shutil.copytree(path, tmp_path / "copy")
    meta = json.loads(meta_path.read_text())
    meta["feature_version"] = FEATURE_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DrafterError, match="feature version"):
        TreeDrafter.load(load_bundle(tmp_path / "copy"))

    shutil.rmtree(tmp_path / "copy" / "draft")
    with pytest.raises(DrafterError, match="draft-fit"):
        TreeDrafter.load(load_bundle(tmp_path / "copy"))


def test_a_copy_length_table_in_meta_loads_and_a_broken_one_is_refused(fitted, tmp_path):
    path, _ = fitted
    shutil.copytree(path, tmp_path / "b")
    meta_path = tmp_path / "b" / "draft" / "meta.json"
    meta = json.loads(meta_path.read_text())
    table = CopyLengths.count([(32, 8)] * 40 + [(3, 0)] * 40, runs=[4] * 40 + [0] * 40, drafted=[4] * 80, depths=4)
    meta["settings"].update(trust_match=1, copy_k=4, copy_lengths=table.to_meta())
    meta_path.write_text(json.dumps(meta))
    d = TreeDrafter.load(load_bundle(tmp_path / "b"))
    assert d.copy_lengths is not None and len(d.copy_lengths.lengths) == len(table.seen)
    # Fitted to the drafter's own verify curve at load, and refitted by calibration.
    want = CopyLengths.from_meta(table.to_meta()).fit_lengths(d.verify_ms, 4)
    assert d.copy_lengths.lengths == want
    d.calibrate(reps=1)
    assert d.copy_lengths.lengths == CopyLengths.from_meta(table.to_meta()).fit_lengths(d.verify_ms, 4)
    meta["settings"]["copy_lengths"]["seen"] = [[0] * 4]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DrafterError, match="copy-length table"):
        TreeDrafter.load(load_bundle(tmp_path / "b"))


class _Scripted:
    """Class probabilities by draft depth (the last feature), in place of the tree."""

    def __init__(self, K, script):
        self.K, self.script, self.calls = K, script, []

    def __call__(self, x):
        depth = int(x.reshape(-1)[-1])
        self.calls.append(depth)
        p = np.full(self.K + 2, 0.0)
        for cls, v in self.script[min(depth, len(self.script) - 1)].items():
            p[{"copy": self.K, "model": self.K + 1}.get(cls, cls)] = v
        return p


def _drafter(bundle, script, k_max=4, p_min=0.3, verify_ms=(1.0, 1.0, 1.0, 1.0, 1.0, 1.0), lookahead=False,
             copy_through=False):
    base = TreeDrafter.load(bundle)
    d = TreeDrafter(bundle.model, base.booster, base.spec, k_max=k_max, p_min=p_min,
                    verify_ms=list(verify_ms), predict_ms=0.0, lookahead=lookahead, copy_through=copy_through)
    d.predict = _Scripted(base.spec.K, script)
    return d


def test_proposals_follow_the_drafting_rule(fitted):
    path, _ = fitted
    bundle = load_bundle(path)
    model, n_vocab = bundle.model, bundle.tokenizer.n_vocab
    spec = TreeDrafter.load(bundle).spec
    c0, c1 = spec.classes[0], spec.classes[1]
    # A copy path A B C A B ... of tokens that are not the tree's first classes, so a
    # token class and the copy candidate never coincide.
    A, B, C = [t for t in range(11, 40) if t not in (c0, c1)][:3]
    context = [A, B, C, A, B]  # the n-gram candidate after "A B" is C
    assert ngram_candidate(context) == (C, 2)
    out = model.forward_step(torch.tensor([context]), 0, model.new_cache(batch_size=1))
    feats = _engine_features(out, len(context) - 1, n_vocab)

    # Tokens while confident, then __MODEL__: stop there and hand back.
    d = _drafter(bundle, [{0: 0.9, "model": 0.1}, {1: 0.8, "model": 0.2}, {"model": 0.9, 0: 0.1}])
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == [c0, c1] and draft.handback
    # Rows come in rounds along the copy path (C A B C ...), the first
    # row alone; a token off that path makes the later rows stale, so the
    # next round starts after it: here every round ends at its first row.
    assert d.predict.calls == [0, 1, 2]

    # Confident all the way: k_max tokens, no handback.
    d = _drafter(bundle, [{0: 0.9, "model": 0.1}])
    draft = d.open().propose(context, feats, 3)
    assert draft.tokens == [c0] * 3 and not draft.handback

    # __COPY__ proposes the n-gram candidate; each depth looks it up again in
    # the context grown by the drafted tokens, so the copy runs on.
    d = _drafter(bundle, [{"copy": 0.9, "model": 0.1}, {"model": 0.9}])
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == [C] and draft.handback
    d = _drafter(bundle, [{"copy": 0.9, "model": 0.1}])
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == [C, A, B, C] and not draft.handback
    assert d.predict.calls == [0, 1, 2, 3]  # on the copy path: one round
    # __COPY__ with no candidate (nothing repeats) has nothing to propose.
    assert d.open().propose([101, 102, 103], feats, 4).tokens == []

    # The most likely token is below p_min: nothing drafted.
    d = _drafter(bundle, [{0: 0.3, 1: 0.25, 2: 0.25, "model": 0.2}], p_min=0.5)
    assert d.open().propose(context, feats, 4).tokens == []

    # Cost-aware: a second draft costs a whole forward more here, and a
    # 0.9 * 0.9 chance of two acceptances does not pay for it ...
    d = _drafter(bundle, [{0: 0.9, "model": 0.1}], verify_ms=(1.0, 1.0, 2.0, 2.0))
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == [c0] and draft.handback
    # ... unless the drafts after it, free once that step is paid, count too.
    d = _drafter(bundle, [{0: 0.9, "model": 0.1}], verify_ms=(1.0, 1.0, 2.0, 2.0), lookahead=True)
    assert d.open().propose(context, feats, 4).tokens == [c0] * 4
    d = _drafter(bundle, [{0: 0.6, "model": 0.1}], verify_ms=(1.0, 1.0, 2.0, 2.0), lookahead=True)
    assert d.open().propose(context, feats, 4).tokens == [c0]  # 0.36 + 0.22 + 0.13 < 1 forward
    # ... and the k_max the decode loop passes is honoured.
    assert _drafter(bundle, [{0: 0.9}]).open().propose(context, feats, 0).tokens == []

    # Copy-through: where __MODEL__ wins, the n-gram candidate is still
    # drafted while the chance the tree gives it pays for its position.
    # Here it is a third (0.3 __COPY__) and the verify is flat: it pays.
    script = [{"model": 0.7, "copy": 0.3}]
    assert _drafter(bundle, script).open().propose(context, feats, 4).tokens == []
    d = _drafter(bundle, script, copy_through=True)
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == [C, A, B, C] and not draft.handback
    # A token the tree is sure of still wins over the candidate ...
    assert _drafter(bundle, [{0: 0.9, "copy": 0.1}], copy_through=True).open().propose(context, feats, 2).tokens == \
        [c0] * 2
    # ... a third of a chance does not pay for a position that costs half a
    # forward (0.3 * 1 < 0.5) ...
    d = _drafter(bundle, script, verify_ms=(1.0, 1.5, 2.0, 2.5), copy_through=True)
    assert d.open().propose(context, feats, 4).tokens == []
    # ... the chance compounds with depth: 0.6, 0.36 and 0.22 of a forward
    # against 0.25 per position ...
    d = _drafter(bundle, [{"model": 0.4, "copy": 0.6}], verify_ms=(1.0, 1.25, 1.5, 1.75, 2.0), copy_through=True)
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == [C, A] and draft.handback
    # ... and with nothing to copy there is nothing to draft.
    assert _drafter(bundle, script, copy_through=True).open().propose([101, 102, 103], feats, 4).tokens == []

    # Trusted match: a match of at least trust_match tokens is copied (up to
    # copy_k) without asking the tree; a shorter one goes to the tree.
    d = _drafter(bundle, [{"model": 1.0}])
    d.trust_match, d.copy_k = 2, 2
    draft = d.open().propose(context, feats, 4)  # "A B" matched: 2 tokens
    assert draft.tokens == [C, A] and d.predict.calls == []
    assert d.open().propose(context, feats, 1).tokens == [C]  # the loop's k still caps it
    d.trust_match = 3
    assert d.open().propose(context, feats, 4).tokens == [] and d.predict.calls == [0]

    # With a copy-length table the shortcut copies as far as the table says
    # pays for the match's evidence, and hands a length of 0 to the tree.
    cont, match, agree = ngram_copy_evidence(context, 4)
    right = CopyLengths.count([(match, agree)] * 50, runs=[4] * 50, drafted=[4] * 50, depths=4)
    wrong = CopyLengths.count([(match, agree)] * 50, runs=[0] * 50, drafted=[4] * 50, depths=4)
    d = _drafter(bundle, [{"model": 1.0}], verify_ms=(1.0, 1.1, 1.2, 1.3, 1.4))
    d.trust_match, d.copy_k, d.copy_lengths = 2, 4, right
    d._fit_copy_lengths()
    assert d.open().propose(context, feats, 4).tokens == cont[:4] and d.predict.calls == []
    d.copy_lengths = wrong
    d._fit_copy_lengths()
    assert d.open().propose(context, feats, 4).tokens == [] and d.predict.calls == [0]
    # The lengths follow the verify curve the drafter is calibrated to.
    d.copy_lengths = right
    d.verify_ms = [1.0, 2.0, 3.0, 4.0, 5.0]  # every position as dear as a forward
    d._fit_copy_lengths()
    assert right.length(match, agree) == 0


def _one_depth_at_a_time(drafter, context, feats, k_max):
    """The drafting rule as the module docstring states it: one tree call per
    depth, the n-gram candidate looked up again after every drafted token,
    and the corpus guess where it hands back at once with nothing to copy."""
    from treespec.draft.tree import worth_drafting
    from treespec.draft.types import extend_costs

    spec, ctx, drafted, cum = drafter.spec, list(context), [], 1.0
    state = drafter.state(feats)
    v = extend_costs(drafter.verify_ms, k_max + 1)
    for j in range(k_max):
        ng = ngram_candidate(ctx, spec.ngram_max_n)
        tok, p, pc = choose(drafter.predict(features_for(spec, state, [ctx], [j], ngrams=[ng])), [ng[0]], spec)
        tok, p, pc = int(tok[0]), float(p[0]), float(pc[0])

        def pays(q):
            return worth_drafting(j, cum * q, q, v, drafter.predict_ms, k_max, drafter.lookahead)

        if tok >= 0 and p >= drafter.p_min and pays(p):
            cum *= p
        elif drafter.copy_through and ng[0] is not None and pays(pc):
            tok, cum = ng[0], cum * pc
        else:
            # Handing back before drafting anything, with nothing to copy or
            # a one-token match: the corpus guess fills the slot where it pays.
            if not drafted and ng[1] <= 1 and drafter.fallback.guess(context) and \
                    drafter._worth_guessing(context, v):
                drafted = drafter.fallback.guess(context)
            return drafted, True
        drafted.append(tok)
        ctx.append(tok)
    return drafted, False


def test_batched_proposals_equal_the_one_depth_at_a_time_rule(fitted, draft_corpus):
    bundle = load_bundle(fitted[0])
    model, n_vocab = bundle.model, bundle.tokenizer.n_vocab
    data = load_split(draft_corpus, "test").astype(int).tolist()
    rng = np.random.default_rng(3)
    lengths, longer, guessed = set(), 0, 0
    for p_min, copy_through in ((0.05, False), (0.3, False), (0.3, True), (0.9, True)):
        drafter = TreeDrafter.load(bundle, p_min=p_min)
        drafter.copy_through, drafter.trust_match = copy_through, 0  # the shortcut has its own test
        for start in rng.integers(0, len(data) - 40, size=25):
            context = data[start:start + int(rng.integers(4, 40))]
            out = model.forward_step(torch.tensor([context]), 0, model.new_cache(batch_size=1))
            feats = _engine_features(out, len(context) - 1, n_vocab)
            for k in (1, K_MAX):
                draft = drafter.open().propose(context, feats, k)
                assert (draft.tokens, draft.handback) == _one_depth_at_a_time(drafter, context, feats, k)
                lengths.add(len(draft.tokens))
                guessed += draft.handback and draft.tokens == drafter.fallback.guess(context) != [] and \
                    ngram_candidate(context)[1] <= 1
                if copy_through:
                    drafter.copy_through = False
                    longer += len(draft.tokens) > len(drafter.open().propose(context, feats, k).tokens)
                    drafter.copy_through = True
    assert len(lengths) > 1  # the cases include drafts of different lengths
    assert longer > 0  # and copy-through drafting past a __MODEL__
    assert guessed > 0  # and corpus guesses


def test_choose_merges_copy_into_the_candidates_token(fitted):
    spec = TreeDrafter.load(load_bundle(fitted[0])).spec
    K = spec.K
    p = np.zeros((3, K + 2))
    p[:, 0], p[:, 1], p[:, K], p[:, K + 1] = 0.3, 0.25, 0.2, 0.25
    cand = [spec.classes[1], None, 99999]  # a class token, none, a token outside the classes
    tok, prob, p_cand = choose(p, cand, spec)
    # class 1 gets __COPY__'s 0.2 and wins; without a candidate class 0 wins;
    # an outside candidate at 0.2 loses to class 0.
    assert tok.tolist() == [spec.classes[1], spec.classes[0], spec.classes[0]]
    np.testing.assert_allclose(prob, [0.45, 0.3, 0.3])
    # The candidate's own chance: its class plus __COPY__, none, __COPY__ alone.
    np.testing.assert_allclose(p_cand, [0.45, 0.0, 0.2])
    p2 = p.copy()
    p2[:, K + 1] = 0.5
    assert choose(p2, cand, spec)[0].tolist() == [-1, -1, -1]  # __MODEL__ wins


def test_fitted_drafter_drafts_in_generation_and_stays_lossless(fitted, draft_corpus):
    from treespec.draft.loop import generate_all

    bundle = load_bundle(fitted[0])
    drafter = TreeDrafter.load(bundle)
    data = load_split(draft_corpus, "test")
    params = SamplingParams(max_new_tokens=24)
    drafted = 0
    for start in (0, 40, 80):
        prompt = data[start:start + 16].astype(int).tolist()
        vanilla = generate_all(bundle.model, prompt, params, None, tokenizer=bundle.tokenizer)
        spec = generate_all(bundle.model, prompt, params, drafter, tokenizer=bundle.tokenizer)
        assert spec.token_ids == vanilla.token_ids
        drafted += spec.stats.draft_tokens
        assert spec.stats.draft_tokens <= K_MAX * spec.stats.verify_steps
    # The random model's greedy text loops, which the tree learned to copy.
    assert drafted > 0


def test_exit_scores_are_the_exit_heads_logits_for_each_rows_top_tokens():
    from treespec.draft.features import _exit_scores

    model = tiny_model(seed=2)
    torch.manual_seed(0)
    N, A = 3, 4
    h = torch.randn(N, model.config.n_embd)
    top = torch.randint(0, model.config.vocab_size, (N * A,))
    with torch.no_grad():
        full = model.exit_logits(0, h)  # (N, vocab)
    want = full.gather(1, top.view(N, A)).double().numpy()
    np.testing.assert_allclose(_exit_scores(model, 0, h, top), want, rtol=1e-5, atol=1e-5)


def test_verify_costs_are_timed_on_the_serving_thread_count(monkeypatch):
    """The curve is the median wall time per length, made monotone, on the serving thread
    count: with a clock that each forward of T positions advances by a scripted amount
    (T = 3 once slower than T = 4, and one noisy repetition), the result is exact."""
    from treespec.draft import costs
    from treespec.draft.costs import measure_verify_ms

    model = tiny_model(seed=0)
    before = torch.get_num_threads()
    now = [0.0]
    monkeypatch.setattr(costs.time, "perf_counter", lambda: now[0])
    scripted = {1: 2.0, 2: 3.0, 3: 4.5, 4: 3.5}  # ms per forward of T positions
    seen, calls = [], {}
    real = model.forward_step

    def spy(idx, *a, **k):
        seen.append(torch.get_num_threads())
        T = idx.shape[1]
        calls[T] = calls.get(T, 0) + 1
        out = real(idx, *a, **k)
        if k.get("last_only"):
            return out  # the prefill is not timed
        # The fourth forward of each length is an outlier the median ignores.
        now[0] += (scripted[T] + (50.0 if calls[T] == 4 else 0.0)) / 1e3
        return out

    model.forward_step = spy
    ms = measure_verify_ms(model, k_max=3, ctx_len=8, reps=3, threads=1)
    # Medians 2, 3, 4.5, 3.5; pooling the violators 4.5 > 3.5 gives 4.0 for both.
    assert ms == [2.0, 3.0, 4.0, 4.0]
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_verify_timing_under_load_is_flagged():
    import time
    import warnings

    from treespec.draft.costs import NoisyTimingWarning, measure_verify_ms

    model = tiny_model(seed=0)
    real, calls = model.forward_step, []

    def slow_later(idx, pos, *a, **k):  # each forward 10 ms, or 40 ms once "someone else" takes the CPU
        calls.append(1)
        if pos == 0:  # the prompt's real forward fills the cache the timer rolls back to
            return real(idx, pos, *a, **k)
        # Sleep only (the timer ignores the output): a real forward's own time, slow on a
        # machine busy running other tests, would shrink the 4x gap below the 2x rule.
        time.sleep(0.04 if len(calls) > 21 else 0.01)

    model.forward_step = slow_later
    with pytest.warns(NoisyTimingWarning, match="busy"):
        measure_verify_ms(model, k_max=3, ctx_len=8, reps=2, threads=1)  # 1 + 4 * 5 forwards, then T=1 again
    calls.clear()
    model.forward_step = lambda idx, pos, *a, **k: real(idx, pos, *a, **k) if pos == 0 else time.sleep(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoisyTimingWarning)
        # Steady: no warning. Seven samples a length, so that one descheduling of
        # this process (a busy machine running the suite) does not move a median.
        measure_verify_ms(model, k_max=3, ctx_len=8, reps=7, threads=1)


@pytest.mark.parametrize("share,warns", [(0.0, False), (None, True)])
def test_a_small_gap_between_the_two_one_position_timings_is_noise_where_the_cpu_share_is_known(
        monkeypatch, share, warns):
    """Two medians of a fast forward differ by 25-35% on a quiet machine about one time in six
    (bench/results/verify-noise-*.json): where /proc/stat says nobody else ran, such a gap is
    noise; only where it cannot say does the gap alone call the machine busy."""
    import time
    import warnings

    from treespec.draft import costs
    from treespec.draft.costs import NoisyTimingWarning, measure_verify_ms

    class Share:
        def others(self):
            return share

    monkeypatch.setattr(costs, "CpuShare", Share)
    model = tiny_model(seed=0)
    real, calls = model.forward_step, []

    def forward(idx, pos, *a, **k):  # 10 ms a forward, then 16 ms for the one-position forwards timed last
        calls.append(1)
        if pos == 0:
            return real(idx, pos, *a, **k)
        # 1 prompt + (5 + 3 warm-up) rounds of 4 lengths; medians of 5 shrug off an oversleep or two
        time.sleep(0.016 if len(calls) > 33 else 0.01)

    model.forward_step = forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoisyTimingWarning)
        measure_verify_ms(model, k_max=3, ctx_len=8, reps=5, threads=1)
    assert any("and then" in str(w.message) for w in caught) == warns, [str(w.message) for w in caught]


def test_a_slow_spell_does_not_move_one_length_of_the_verify_curve():
    import time

    from treespec.draft.costs import measure_verify_ms

    model = tiny_model(seed=0)
    real, calls = model.forward_step, []

    def timed(idx, pos, *a, **k):  # 20 + 10 T ms of sleep a forward, and 4 forwards in a row at 150 ms
        calls.append(1)
        if pos == 0:  # the prompt's real forward fills the cache the timer rolls back to
            return real(idx, pos, *a, **k)
        slow = 20 <= len(calls) < 24  # one whole round: one sample of every length
        # Sleep only (the timer ignores the output): a real forward's time would grow with
        # the length on a machine busy running other tests, and blur the 10 ms steps.
        time.sleep(0.15 if slow else 0.020 + 0.010 * idx.shape[1])

    model.forward_step = timed
    ms = measure_verify_ms(model, k_max=3, ctx_len=8, reps=5, threads=1)
    # Each length costs 10 ms more than the one before. Timed one length
    # after another, those 4 forwards would all have gone to T = 3, and its
    # median would have been 150 ms.
    steps = [b - a for a, b in zip(ms, ms[1:])]
    assert all(5 < d < 15 for d in steps), ms


def test_monotone_pools_a_noisy_length_with_its_neighbours():
    from treespec.draft.costs import monotone

    assert monotone([1, 2, 3]) == [1, 2, 3]
    assert monotone([14.8, 14.9, 20.4, 16.0, 16.2, 22.0]) == pytest.approx([14.8, 14.9, 17.533, 17.533, 17.533, 22.0],
                                                                            abs=1e-3)
    assert monotone([3, 1]) == [2, 2] and monotone([]) == []


def test_in_loop_proposal_cost_is_measured_on_decoding(fitted, draft_corpus, monkeypatch):
    import types

    from treespec.draft import fit
    from treespec.draft.fit import _time_in_loop

    # A clock that moves 2.5 ms per reading: each proposal inside the decoding loop is
    # read twice, so the mean cost per proposal must come out exactly 2.5 ms.
    ticks = iter(range(10**6))
    monkeypatch.setattr(fit, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 2.5e-3))
    ms = _time_in_loop(fitted[0], draft_corpus, threads=1, n=2, prompt_len=8, new_tokens=12)
    assert ms == pytest.approx(2.5, rel=1e-9)
    # The default prompt and continuation (96 + 64 tokens) shrink to the tiny model's context of 64.
    assert _time_in_loop(fitted[0], draft_corpus, threads=1, n=1) == pytest.approx(2.5, rel=1e-9)
    drafter = TreeDrafter.load(load_bundle(fitted[0]))
    # The gate's cost model: the measured proposal cost plus the longer verify.
    drafter.proposal_ms = ms
    v = drafter.verify_ms
    assert drafter.forward_ms == v[0]
    assert drafter.step_cost_ms(0) == pytest.approx(ms)
    assert drafter.step_cost_ms(3) == pytest.approx(ms + v[3] - v[0])


@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
def test_vocab_stats_are_an_exact_top_a_and_the_softmax_entropy(scale):
    from treespec.draft.features import _vocab_stats

    rng = np.random.default_rng(int(scale * 100))
    x = (rng.standard_normal((8, 50257)) * scale).astype(np.float32)
    x[0] = np.round(x[0] * 2) / 2  # ties
    x[1, 123] = x[1].max() + 20.0  # one token far ahead: fewer than A within the window
    for r, row in enumerate(x):
        top, val, log_s, ent = _vocab_stats(row, 4)
        ref = np.argsort(-row, kind="stable")[:4]
        assert np.array_equal(row[top], row[ref])  # the largest values, largest first
        if r > 0:  # without ties, the very same columns
            assert np.array_equal(top, ref)
        np.testing.assert_array_equal(val, row[top].astype(np.float64))
        z = row.astype(np.float64) - row.max()
        p = np.exp(z) / np.exp(z).sum()
        assert log_s == pytest.approx(np.log(np.exp(z).sum()), rel=1e-5)
        assert ent == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("copy_through", [False, True])
def test_fit_simulation_makes_the_drafters_decisions(fitted, lookahead, copy_through):
    """draft-fit picks its settings by simulating the rule on held-out chains:
    vectorised, it must draft exactly what TreeDrafter.decide drafts."""
    from treespec.draft.simulation import simulate
    from treespec.draft.types import extend_costs

    bundle = load_bundle(fitted[0])
    base = TreeDrafter.load(bundle)
    verify_ms = [1.0, 1.0, 1.1, 1.6, 1.7, 1.8]
    d = TreeDrafter(bundle.model, base.booster, base.spec, k_max=5, p_min=0.3, verify_ms=verify_ms,
                    predict_ms=0.02, lookahead=lookahead, copy_through=copy_through)
    rng = np.random.default_rng(0)
    n, k = 500, 5
    chosen = np.where(rng.random((n, k)) < 0.3, -1, rng.integers(0, 50, (n, k)))
    p = rng.random((n, k))
    cand = np.where(rng.random((n, k)) < 0.3, -1, rng.integers(0, 50, (n, k)))
    p_cand = np.where(cand >= 0, rng.random((n, k)), 0.0)
    v = extend_costs(verify_ms, k + 1)
    drafts = []
    for r in range(n):
        cum, out = 1.0, []
        for j in range(k):
            c = None if cand[r, j] < 0 else int(cand[r, j])
            t, cum = d.decide(j, cum, int(chosen[r, j]), float(p[r, j]), c, float(p_cand[r, j]), v, k)
            if t is None:
                break
            out.append(t)
        drafts.append(out)
    expect = np.asarray([len(x) for x in drafts])
    assert len(set(expect.tolist())) > 2
    # The model's tokens: the drafts up to a random rejection point.
    cut = rng.integers(0, k + 1, n)
    targets = np.full((n, k), -2)
    for r, x in enumerate(drafts):
        targets[r, :len(x)] = x
        targets[r, cut[r]:] = -2
    drafted, accepted, _ = simulate(chosen, p, cand, p_cand, targets, np.ones((n, k), bool), d.p_min,
                                    verify_ms, d.predict_ms, lookahead, copy_through)
    np.testing.assert_array_equal(drafted, expect)
    np.testing.assert_array_equal(accepted, np.minimum(expect, cut))


def test_draft_fit_flags_fix_copy_through_and_the_trusted_match(fitted, draft_corpus, tmp_path):
    from treespec.cli import main as cli_main

    shutil.copytree(fitted[0], tmp_path / "b")
    argv = ["draft-fit", "--bundle", str(tmp_path / "b"), "--data-dir", str(draft_corpus), "--contexts", "24",
            "--steps-per-context", "8", "--k-max", "3", "--classes", "8", "--pca-dims", "4", "--threshold", "0",
            "--min-context", "8", "--max-context", "24", "--rounds", "10", "--verify-ms", "1,1,1.5,2",
            "--no-progress"]
    for flags, want in ((["--copy-through", "yes", "--trust-match", "off"], (True, 0)),
                        (["--copy-through", "no", "--trust-match", "2"], (False, 2))):
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli_main(argv + flags) == 0
        st = json.loads((tmp_path / "b" / "draft" / "meta.json").read_text())["settings"]
        assert (st["copy_through"], st["trust_match"]) == want
        d = TreeDrafter.load(load_bundle(tmp_path / "b"))
        assert (d.copy_through, d.trust_match) == want


def test_draft_fit_times_the_costs_on_the_kernels_it_will_be_served_with(fitted, draft_corpus, tmp_path,
                                                                         monkeypatch):
    """The fit collects on the float32 model, but a server runs int8 or w8a8 kernels whose forward
    was 8x faster here: the verify curve and the drafter's costs are timed on what --verify-dtype
    (serve's --dtype) plans, so the settings weigh a proposal against the forward it will meet."""
    from treespec.cli import main as cli_main
    from treespec.draft import fit
    from treespec.model.gpt import Linear

    timed = []

    def measure(model, k_max, ctx_len, **kw):  # a fixed curve: which model, not how fast
        timed.append(model)
        return [1.0, 1.0, 1.5, 2.0]

    monkeypatch.setattr(fit, "measure_verify_ms", measure)
    shutil.copytree(fitted[0], tmp_path / "b")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli_main(["draft-fit", "--bundle", str(tmp_path / "b"), "--data-dir", str(draft_corpus),
                         "--contexts", "24", "--steps-per-context", "8", "--k-max", "3", "--classes", "8",
                         "--pca-dims", "4", "--threshold", "0", "--min-context", "8", "--max-context", "24",
                         "--rounds", "10", "--verify-dtype", "int8", "--no-progress"]) == 0
    assert "costs timed on the served kernels: int8 (--verify-dtype int8)" in buf.getvalue()
    (model,) = timed
    assert {m.kernel.packed.precision for m in model.modules() if isinstance(m, Linear)} == {"int8"}
    meta = json.loads((tmp_path / "b" / "draft" / "meta.json").read_text())
    assert meta["fit"]["verify_dtype"] == "int8" and meta["settings"]["verify_ms"] == [1.0, 1.0, 1.5, 2.0]


def test_windows_take_turns_over_the_domains_spans():
    spans = [(0, 100), (100, 1000)]
    batches = windows(spans, 40, 4, 10, 20, np.random.default_rng(0))
    assert sum(len(s) for _, s in batches) == 40
    for b, (L, starts) in enumerate(batches):
        lo, hi = spans[b % 2]
        assert 10 <= L <= 20 and all(lo <= s and s + L <= hi for s in starts)  # inside its own domain
    with pytest.raises(ValueError, match="too few"):
        windows([(0, 100), (100, 105)], 8, 4, 10, 20, np.random.default_rng(0))


def test_calibrate_replaces_the_fitted_costs_with_this_machines(fitted):
    """A drafter fitted where a forward cost 1.9 ms, served where it costs
    ~30 ms + 10 ms per position: calibrate() times the new curve, and the
    stopping rule and the gate see it; the drafter's own costs
    scale with how its isolated timings compare."""
    import time
    from unittest import mock

    from treespec.draft.gate import GatedDrafter

    drafter = TreeDrafter.load(load_bundle(fitted[0]))
    assert drafter.calibration is None and drafter.verify_ms == [1.9, 1.9, 1.9, 3.2]
    s = drafter.meta.settings
    real = drafter.model.forward_step

    def slow(ids, *a, **k):
        time.sleep(0.02 + 0.01 * ids.shape[1] if not k.get("last_only") else 0)
        return real(ids, *a, **k)

    drafter.model.forward_step = slow
    with mock.patch.object(drafter, "_own_costs", lambda ctx_len: (2 * s.state_ms, 2 * s.predict_ms)):
        cal = drafter.calibrate(reps=2)
    v = drafter.verify_ms
    assert cal["fitted"]["verify_ms"] == [1.9, 1.9, 1.9, 3.2] and cal["here"]["verify_ms"] == v
    assert len(v) == 4 and v == sorted(v)  # as far as the fitted curve reached
    assert 30 <= v[0] < 60 and 8 * (len(v) - 1) <= v[-1] - v[0] < 30 * (len(v) - 1)  # ~10 ms a position, not ~0.4
    assert drafter.forward_ms == v[0] and GatedDrafter(drafter, drafter.fallback).open().gate.forward_ms == v[0]
    assert drafter.predict_ms == pytest.approx(2 * s.predict_ms)
    # No in-loop proposal cost was fitted (--verify-ms given), so a proposal
    # costs the features and one row per depth, now at this machine's rates.
    assert drafter.step_cost_ms(2) == pytest.approx(2 * s.state_ms + 2 * 2 * s.predict_ms + v[2] - v[0])


def test_calibrated_in_loop_proposal_cost_scales_with_the_isolated_timings(fitted):
    from unittest import mock

    drafter = TreeDrafter.load(load_bundle(fitted[0]))
    s = drafter.meta.settings
    drafter.proposal_ms = 0.5  # as draft-fit measures it when it times the verify itself
    with mock.patch.object(drafter, "_own_costs", lambda ctx_len: (3 * s.state_ms, 3 * s.predict_ms)):
        drafter.calibrate(reps=1)
    assert drafter.proposal_ms == pytest.approx(1.5)
    assert drafter.step_cost_ms(1) == pytest.approx(1.5 + drafter.verify_ms[1] - drafter.verify_ms[0])


def test_drafters_are_calibrated_only_when_asked(fitted):
    from unittest import mock

    from treespec.draft.registry import make_drafter

    bundle = load_bundle(fitted[0])
    with mock.patch.object(TreeDrafter, "calibrate") as cal:
        assert make_drafter("tree", bundle).drafter.verify_ms == [1.9, 1.9, 1.9, 3.2]
        assert cal.call_count == 0
        make_drafter("tree", bundle, calibrate=True)
        assert cal.call_count == 1
    own = TreeDrafter.load(bundle)._own_costs(16)
    assert all(0 < ms < 100 for ms in own)  # real timings of the real pieces


def test_proposals_report_what_prompt_lookup_would_have_drafted(fitted):
    """The gate weighs the tree against its fallback on the tokens a step
    emits: every proposal, tree-drafted or trusted-match copy, carries the
    fallback's own draft for that context."""
    from treespec.draft.ngram import ngram_continuation

    bundle = load_bundle(fitted[0])
    model, n_vocab = bundle.model, bundle.tokenizer.n_vocab
    context = [11, 12, 13, 11, 12]
    out = model.forward_step(torch.tensor([context]), 0, model.new_cache(batch_size=1))
    feats = _engine_features(out, len(context) - 1, n_vocab)
    d = _drafter(bundle, [{0: 0.9, "model": 0.1}, {"model": 0.9}])
    want = ngram_continuation(context, max(4, d.fallback.k_max))
    assert want and d.open().propose(context, feats, 4).fallback == want  # the tree drafted, and handed back
    d.trust_match, d.copy_k = 2, 2  # a 2-token match: the shortcut copies without the tree
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == want[:2] and draft.fallback == want


def test_the_fitted_corpus_bigram_is_the_training_splits_and_is_checked(fitted, draft_corpus, tmp_path):
    from treespec.cli import main as cli_main

    path, log = fitted
    bundle = load_bundle(path)
    d = TreeDrafter.load(bundle)
    want = CorpusBigram.count(load_split(draft_corpus, "train"), bundle.config.vocab_size)
    assert np.array_equal(d.corpus.follower, want.follower) and len(want) > 0
    assert "corpus bigram" in log
    # A changed table is refused, as a changed tree is.
    shutil.copytree(path, tmp_path / "b")
    table = tmp_path / "b" / "draft" / "bigram.safetensors"
    CorpusBigram(np.zeros_like(want.follower), want.share).save(table.parent)
    with pytest.raises(DrafterError, match="corpus bigram.*checksum"):
        TreeDrafter.load(load_bundle(tmp_path / "b"))
    # --corpus-bigram only recounts it and leaves the tree and its settings alone.
    tree_before = (tmp_path / "b" / "draft" / "tree.txt").read_bytes()
    settings_before = json.loads((tmp_path / "b" / "draft" / "meta.json").read_text())["settings"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["draft-fit", "--bundle", str(tmp_path / "b"), "--data-dir", str(draft_corpus),
                         "--corpus-bigram", "only"]) == 0
    after = json.loads((tmp_path / "b" / "draft" / "meta.json").read_text())["settings"]
    assert (tmp_path / "b" / "draft" / "tree.txt").read_bytes() == tree_before
    assert {k: v for k, v in after.items() if k != "corpus_bigram"} == \
        {k: v for k, v in settings_before.items() if k != "corpus_bigram"}
    assert np.array_equal(TreeDrafter.load(load_bundle(tmp_path / "b")).corpus.follower, want.follower)
    # Without a table in meta.json the drafter has none, and guesses nothing.
    meta = json.loads((tmp_path / "b" / "draft" / "meta.json").read_text())
    meta["settings"]["corpus_bigram"] = None
    (tmp_path / "b" / "draft" / "meta.json").write_text(json.dumps(meta))
    assert TreeDrafter.load(load_bundle(tmp_path / "b")).corpus is None


def test_a_handback_with_nothing_to_copy_fills_the_slot_with_the_corpus_guess(fitted):
    bundle = load_bundle(fitted[0])
    model, n_vocab = bundle.model, bundle.tokenizer.n_vocab
    context = [101, 102, 103]  # nothing repeats
    out = model.forward_step(torch.tensor([context]), 0, model.new_cache(batch_size=1))
    feats = _engine_features(out, len(context) - 1, n_vocab)
    follower, share = np.full(bundle.config.vocab_size, -1), np.zeros(bundle.config.vocab_size)
    follower[103], share[103] = 77, 0.25
    table = CorpusBigram(follower, share)

    def drafter(verify_ms, corpus=table):
        d = _drafter(bundle, [{"model": 0.9, 0: 0.1}], verify_ms=verify_ms)
        d.corpus = corpus
        return d

    # The tree hands back at once; a second position is free: guess.
    draft = drafter((1.0, 1.0, 1.0)).open().propose(context, feats, 4)
    assert draft.tokens == [77] and draft.handback and draft.guess and draft.fallback == [77]
    # The guess is right a quarter of the time (its corpus share): worth a
    # position that costs a fifth of a forward, not one that costs a third.
    assert drafter((1.0, 1.2, 1.4)).open().propose(context, feats, 4).tokens == [77]
    assert drafter((1.0, 1.34, 1.7)).open().propose(context, feats, 4).tokens == []
    # A one-token match is a worse guide than the corpus: guess there too,
    # and the fallback's draft is the guess.
    one = [5, 103, 7, 103]
    assert ngram_candidate(one) == (7, 1)
    draft = drafter((1.0, 1.0)).open().propose(one, feats, 4)
    assert draft.tokens == [77] and draft.fallback == [77]
    # Where the corpus agrees with that copy, the copy (which goes on) is the fallback's draft.
    agreeing = CorpusBigram(np.where(np.arange(len(follower)) == 103, 7, follower), share)
    d = drafter((1.0, 1.0), corpus=agreeing)
    draft = d.open().propose(one, feats, 4)
    assert draft.fallback == ngram_continuation(one, max(4, d.fallback.k_max)) and draft.fallback[:2] == [7, 103]
    assert draft.tokens == [7] and draft.guess  # the tree handed back: the slot still gets the guess
    # Without a table, or with a longer match to copy (the tree judged it), no guess.
    assert drafter((1.0, 1.0), corpus=None).open().propose(context, feats, 4).tokens == []
    copyable = [11, 12, 103, 11, 12]
    d = drafter((1.0, 1.0))
    draft = d.open().propose(copyable, feats, 4)
    assert draft.tokens == [] and draft.fallback == ngram_continuation(copyable, max(4, d.fallback.k_max))
    assert draft.fallback[:3] == [103, 11, 12]
    # What the tree drafted itself is never replaced.
    d = _drafter(bundle, [{0: 0.9, "model": 0.1}, {"model": 0.9}])
    d.corpus = table
    draft = d.open().propose(context, feats, 4)
    assert draft.tokens == [d.spec.classes[0]] and not draft.guess


def test_a_machine_busy_all_along_keeps_the_fitted_costs(fitted, monkeypatch):
    """A training run beside the server slows every verify length alike, so the
    timings agree with each other; the share of the CPUs that other processes
    took says it (CpuShare), and the real timer then warns as a noisy one would."""
    from treespec.draft import costs

    class Busy:
        def others(self):
            return 0.6

    import time

    monkeypatch.setattr(costs, "CpuShare", Busy)
    d = TreeDrafter.load(load_bundle(fitted[0]))
    # The prompt's real forward fills the cache; then steady 20 ms verify forwards (the
    # timer ignores their output), so only the CPU share can tell the machine is busy.
    real = d.model.forward_step
    monkeypatch.setattr(d.model, "forward_step",
                        lambda idx, pos, *a, **k: real(idx, pos, *a, **k) if pos == 0 else time.sleep(0.02))
    fitted_verify = list(d.verify_ms)
    cal = d.calibrate(reps=2)
    assert cal["here"] is None and d.verify_ms == fitted_verify
    assert "60% of the CPUs busy" in cal["kept_fitted_because"], cal


def test_a_calibration_on_a_busy_machine_is_timed_again_then_the_fitted_costs_are_kept(fitted, monkeypatch):
    import warnings

    from treespec.draft import tree
    from treespec.draft.costs import NoisyTimingWarning

    answers = []

    def measure(model, k_max, ctx_len, **kw):
        noisy, curve = answers.pop(0)
        if noisy:
            warnings.warn(NoisyTimingWarning("the one-position verify forward took 3 ms and then 90 ms"))
        return curve

    monkeypatch.setattr(tree, "measure_verify_ms", measure)
    bundle = load_bundle(fitted[0])
    # Busy, then quiet: the second timing is used.
    answers[:] = [(True, [90.0, 91.0, 92.0, 93.0]), (False, [2.0, 2.5, 3.0, 3.5])]
    d = TreeDrafter.load(bundle)
    cal = d.calibrate(reps=2)
    assert cal["here"]["verify_ms"] == [2.0, 2.5, 3.0, 3.5] == d.verify_ms and answers == []
    # Busy twice: the fitted costs stay, and the calibration says why.
    answers[:] = [(True, [90.0] * 4), (True, [95.0] * 4)]
    d = TreeDrafter.load(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks out as a raw warning
        cal = d.calibrate(reps=2)
    assert cal["here"] is None and d.verify_ms == [1.9, 1.9, 1.9, 3.2] and answers == []
    assert "took 3 ms and then 90 ms" in cal["kept_fitted_because"]
