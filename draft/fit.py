"""``treespec draft-fit``: fit the ``tree`` drafter to a bundle's model.

1. Random windows of the training split are the contexts. A short pre-pass
   over some of them fits the PCA of the final hidden state.
2. The model continues every context **greedily** (batched, with a KV
   cache): that is what greedy verification accepts. Each greedy step gives
   the model's view at one position (``state_features``) and the next greedy
   token with its probability.
3. Rows: for every step i and depth j < k_max, the context is the window plus
   the greedy tokens up to step i+j (the first j of them "drafted"), the
   state is step i's, and the label is about the greedy token that follows:
   ``__COPY__`` if the n-gram candidate equals it; else the token itself if
   it is one of the K classes and the model gave it probability >=
   threshold; else ``__MODEL__``. The classes are the K tokens the model
   most often predicts with probability >= threshold in this collection.
   Contexts that already contain a generated end-of-text are dropped: the
   engine stops there.
4. LightGBM multiclass with early stopping on held-out contexts (whole
   contexts, never rows of a context on both sides).
5. On the held-out contexts the drafting rule is simulated: accepted drafts
   per step (tau), drafted tokens, and the speed that gives with the
   measured verify cost and the measured drafter cost, for a grid of p_min,
   both stopping rules (tree.worth_drafting), with and without copy-through
   (tree.TreeDrafter.decide), with and without the trusted-match shortcut
   (and its copy length: fixed, or the copy-length table of
   ``draft.copylen``, counted on the training contexts), every longest draft k_max up to --k-max and
   several numbers of boosting rounds. Every round adds K+2
   trees that each draft depth has to evaluate, and every depth lengthens
   the verify, so the kept setting is the one with the best estimated
   speed, not the lowest loss. (--p-min fixes p_min.)
   The n-gram drafter is simulated on the same steps for comparison.
6. ``BUNDLE/draft/tree.txt`` and ``meta.json`` are written, with the
   corpus bigram (``draft.corpus``: every token's most frequent follower in
   the training split) in ``bigram.safetensors``. The simulation does not
   use it: it only fills steps that would otherwise draft nothing, and
   ``treespec bench`` measures what that gives.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .features import FEATURE_VERSION, FeatureSpec, features_for, fit_pca, state_features
from .copylen import CopyLengths
from .corpus import FILE as CORPUS_FILE, CorpusBigram
from .ngram import DEFAULT_MAX_N, NgramDrafter, ngram_candidate, ngram_copy_evidence
from ..model.tokenizer import sha256_file
from .tree import (COPY, FORMAT, FORMAT_VERSION, META_FILE, MODEL, MODEL_FILE, TreeDrafter, _Predictor, choose,
                   worth_drafting)
from .costs import measure_verify_ms, torch_threads
from .types import extend_costs

# Verify cost when it is not measured: a 16M-parameter model on the 2-core
# CPU this project targets verified T = 1..3 positions in about 1.9 ms, 4 in
# 3.2 ms, 7 in 4.4 ms (issue 4); in between, linear.
DEFAULT_VERIFY_MS = [1.9, 1.9, 1.9, 3.2, 3.6, 4.0, 4.4, 4.8, 5.2]


@dataclass
class Collected:
    """What the greedy runs produced, per context (sequence) s."""

    tokens: list[list[int]]  # window + greedy tokens g_0 .. g_{steps+k_max-1}
    prompt_len: list[int]  # window length L
    states: list[np.ndarray]  # (steps + k_max, n_state): the view that chose g_t
    steps: int
    k_max: int


def _log(msg: str) -> None:
    print(msg, flush=True)


def _windows(spans: Sequence[tuple[int, int]], n_contexts: int, batch_size: int, min_ctx: int, max_ctx: int,
             rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
    """(window length, start offsets) per batch; one length per batch so
    the batch shares its positions in the KV cache. Batches take turns over
    ``spans`` ((start, end) token ranges of the split: the whole split, or
    one per domain to give every domain the same share of windows)."""
    batches, left = [], n_contexts
    while left > 0:
        b = min(batch_size, left)
        L = int(rng.integers(min_ctx, max_ctx + 1))
        start, end = spans[len(batches) % len(spans)]
        if end - start <= L + 1:
            raise ValueError(f"a span of the training split has {end - start} tokens, too few for {L}-token "
                             f"contexts")
        batches.append((L, rng.integers(start, end - L, size=b)))
        left -= b
    return batches


def _pca_sample(model, data: np.ndarray, batches, max_rows: int = 20000) -> np.ndarray:
    """Final hidden states over whole windows (every position, one prefill each)."""
    rows, n = [], 0
    for L, starts in batches:
        idx = torch.from_numpy(np.stack([data[s:s + L].astype(np.int64) for s in starts]))
        cache = model.new_cache(batch_size=len(starts), max_len=L)
        out = model.forward_step(idx, 0, cache, last_only=True)
        h = out.hidden.reshape(-1, out.hidden.shape[-1]).float().numpy()
        rows.append(h)
        n += len(h)
        if n >= max_rows:
            break
    return np.concatenate(rows)[:max_rows]


def collect(model, spec: FeatureSpec, data: np.ndarray, batches, steps: int, k_max: int,
            progress: bool = True) -> Collected:
    """Greedy continuations of every window, with the state features of each step."""
    n_vocab = spec.n_vocab
    run = steps + k_max  # greedy tokens per context: states 0..steps-1 need targets up to steps-1+k_max
    out_tokens, out_L, out_states = [], [], []
    bar = tqdm(total=sum(len(s) for _, s in batches), desc="collecting", unit="ctx", disable=not progress)
    for L, starts in batches:
        B = len(starts)
        idx = torch.from_numpy(np.stack([data[s:s + L].astype(np.int64) for s in starts]))
        cache = model.new_cache(batch_size=B, max_len=L + run)
        out = model.forward_step(idx, 0, cache, last_only=True)
        logits, hidden, exits = out.logits[:, -1], out.hidden[:, -1], [e[:, -1] for e in out.exit_hidden]
        gen, states = [], []
        for t in range(run):
            states.append(state_features(spec, model, logits, hidden, exits))
            g = logits[:, :n_vocab].argmax(dim=-1)
            gen.append(g)
            if t == run - 1:
                break
            out = model.forward_step(g[:, None], L + t, cache)
            logits, hidden, exits = out.logits[:, -1], out.hidden[:, -1], [e[:, -1] for e in out.exit_hidden]
        gen_t = torch.stack(gen, dim=1).tolist()  # (B, run)
        st = np.stack(states, axis=1)  # (B, run, n_state)
        for b in range(B):
            out_tokens.append(idx[b].tolist() + gen_t[b])
            out_L.append(L)
            out_states.append(st[b])
        bar.update(B)
    bar.close()
    return Collected(out_tokens, out_L, out_states, steps, k_max)


def confident_counts(col: Collected, spec: FeatureSpec, threshold: float, eot: int) -> Counter:
    """How often the model generated each token with probability >= threshold
    (before any generated end-of-text)."""
    counts: Counter = Counter()
    lp_col = spec.pca_dims  # top1_logprob column of the state features
    log_thr = np.log(threshold) if threshold > 0 else -np.inf
    for toks, L, st in zip(col.tokens, col.prompt_len, col.states):
        for t, g in enumerate(toks[L:]):
            if st[t, lp_col] >= log_thr:
                counts[g] += 1
            if g == eot:
                break
    return counts


@dataclass
class Rows:
    X: np.ndarray  # (R, F)
    y: np.ndarray  # (R,) class index
    seq: np.ndarray  # (R,) context index
    step: np.ndarray  # (R,) greedy step i whose state the row uses
    depth: np.ndarray  # (R,)
    target: np.ndarray  # (R,) the greedy token the row is about
    cand: np.ndarray  # (R,) the n-gram candidate (-1 none)


def build_rows(col: Collected, spec: FeatureSpec, threshold: float, eot: int,
               seqs: list[int] | None = None) -> Rows:
    """Feature rows and labels (module docstring, step 3)."""
    K = spec.K
    lp_col = spec.pca_dims
    log_thr = np.log(threshold) if threshold > 0 else -np.inf
    parts = []
    for s in (range(len(col.tokens)) if seqs is None else seqs):
        toks, L, st = col.tokens[s], col.prompt_len[s], col.states[s]
        gen = toks[L:]
        # First generated end-of-text: contexts that contain it never occur
        # (the engine stops there), so g_0..g_{i+j} must all come before it.
        eot_at = next((t for t, g in enumerate(gen) if g == eot), len(gen))
        # One n-gram lookup per distinct context (prefix) serves every depth.
        ngrams = {}
        for c in range(L + 1, L + col.steps + col.k_max):
            ngrams[c] = ngram_candidate(toks[:c], spec.ngram_max_n)
        ctxs, deps, ngs, states, meta = [], [], [], [], []
        for i in range(col.steps):
            for j in range(col.k_max):
                if i + j >= eot_at:
                    continue
                c = L + i + j + 1
                ctxs.append(toks[:c])
                deps.append(j)
                ngs.append(ngrams[c])
                states.append(st[i])
                meta.append((s, i, j, gen[i + j + 1], st[i + j + 1, lp_col]))
        if not ctxs:
            continue
        X = features_for(spec, np.stack(states), ctxs, deps, ngrams=ngs)
        m = np.asarray(meta, dtype=np.float64)
        target = m[:, 3].astype(np.int64)
        cand = np.asarray([-1 if c is None else c for c, _ in ngs], dtype=np.int64)
        tcls = spec.class_of(target)
        y = np.where(cand == target, K, np.where((tcls < K) & (m[:, 4] >= log_thr), tcls, K + 1))
        parts.append((X, y, m[:, 0].astype(np.int64), m[:, 1].astype(np.int64), m[:, 2].astype(np.int64),
                      target, cand))
    if not parts:
        raise ValueError("no training rows: every context ran into end-of-text at once")
    return Rows(*(np.concatenate(p) for p in zip(*parts)))


# --- cost measurements -------------------------------------------------------

# The drafter's own costs (single-threaded NumPy and LightGBM work) are timed
# in process CPU time: the fit may share a busy machine, and time spent
# descheduled is not the cost of the work.
_clock = time.process_time
# torch's default intra-op threads in a fresh process: what a server started
# with threads=0 (its default) runs on.
_SERVING_THREADS = torch.get_num_threads()


# --- evaluation and simulation ----------------------------------------------

def simulate(chosen: np.ndarray, p: np.ndarray, cand: np.ndarray, p_cand: np.ndarray, targets: np.ndarray,
             valid: np.ndarray, p_min: float, verify_ms: list[float], predict_ms: float, lookahead: bool,
             copy_through: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The drafting rule (TreeDrafter.decide) on chains of rows (n, k_max):
    per chain the drafted count, the accepted count and the number of tree
    evaluations. ``chosen``/``p``/``p_cand`` are ``choose``'s per row,
    ``cand`` the n-gram candidate (-1: none).

    Exact up to the first rejected draft; after it the real drafter would see
    its own wrong token, which no row describes, so the drafted count assumes
    it goes on as on the right path."""
    n, k = chosen.shape
    v = extend_costs(verify_ms, k + 1)
    drafted = np.zeros(n, dtype=np.int64)
    accepted = np.zeros(n, dtype=np.int64)
    evals = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    ok = np.ones(n, dtype=bool)
    cum = np.ones(n)
    for j in range(k):
        here = alive & valid[:, j]
        evals += here
        pj, pc = p[:, j], p_cand[:, j]
        by_tree = (here & (chosen[:, j] >= 0) & (pj >= p_min)
                   & worth_drafting(j, cum * pj, pj, v, predict_ms, k, lookahead))
        by_copy = np.zeros(n, dtype=bool)
        if copy_through:
            by_copy = (here & ~by_tree & (cand[:, j] >= 0)
                       & worth_drafting(j, cum * pc, pc, v, predict_ms, k, lookahead))
        go = by_tree | by_copy
        cum = np.where(by_tree, cum * pj, np.where(by_copy, cum * pc, cum))
        drafted += go
        tok = np.where(by_tree, chosen[:, j], cand[:, j])
        ok = ok & go & (tok == targets[:, j])
        accepted += ok
        alive = go
    return drafted, accepted, evals


def _chains(rows: Rows, idx: np.ndarray, k_max: int):
    """Group rows[idx] into (seq, step) chains over depth."""
    keys = rows.seq[idx] * 100000 + rows.step[idx]
    uniq, inv = np.unique(keys, return_inverse=True)
    shape = (len(uniq), k_max)
    valid = np.zeros(shape, dtype=bool)
    where = np.full(shape, -1, dtype=np.int64)
    valid[inv, rows.depth[idx]] = True
    where[inv, rows.depth[idx]] = idx
    return uniq, valid, where


def _copy_outcome(col: Collected, seq: int, i: int, k: int, max_n: int) -> tuple[list[int], int, tuple[int, int]]:
    """Prompt lookup's copy at greedy step i of context ``seq``: (the copy,
    how many of its tokens are the model's greedy ones, its (match, agree)
    evidence)."""
    L, toks = col.prompt_len[seq], col.tokens[seq]
    cont, match, agree = ngram_copy_evidence(toks[:L + i + 1], k, max_n)
    truth = toks[L + i + 1:L + i + 1 + len(cont)]
    run = 0
    while run < min(len(cont), len(truth)) and cont[run] == truth[run]:
        run += 1
    return cont, run, (match, agree)


def _copy_table(col: Collected, seqs: Sequence[int], k: int, max_n: int, eot: int) -> CopyLengths:
    """The copy-length table counted on the greedy steps of contexts ``seqs``
    (each step's copy judged on the greedy tokens known after it, up to a
    generated end-of-text)."""
    evidence, runs, known = [], [], []
    for seq in seqs:
        L, gen = col.prompt_len[seq], col.tokens[seq][col.prompt_len[seq]:]
        eot_at = next((t for t, g in enumerate(gen) if g == eot), len(gen))
        for i in range(min(col.steps, eot_at)):
            cont, run, ev = _copy_outcome(col, seq, i, k, max_n)
            if cont:
                evidence.append(ev)
                runs.append(run)
                # g_{i+1} .. g_{eot_at} (end-of-text itself can be copied), or to the end
                known.append(min(len(cont), eot_at - i if eot_at < len(gen) else len(gen) - i - 1))
    return CopyLengths.count(evidence, runs, known, k)


def fit_drafter(bundle_path: str | os.PathLike, data_dir: str | os.PathLike = "data/default", *,
                threads: int = 1, **kw) -> dict:
    """Fit and save the tree drafter; returns its meta.json contents.
    Keyword arguments are ``_fit``'s (and the CLI's flags)."""
    with torch_threads(threads):
        return _fit(bundle_path, data_dir, threads=threads, **kw)


def _fit(bundle_path: str | os.PathLike, data_dir: str | os.PathLike = "data/default", *,
         contexts: int = 600, steps: int = 32, n_classes: int = 64, pca_dims: int = 24,
         k_max: int = 8, p_min: float | None = None, threshold: float = 0.5, seed: int = 0,
         batch_size: int = 16, min_context: int = 32, max_context: int = 384, rounds: int = 300,
         learning_rate: float = 0.2, num_leaves: int = 15, max_depth: int = 5, early_stopping: int = 10,
         verify_ms: list[float] | str = "auto", verify_threads: int | None = None, threads: int = 1,
         n_last: int = 3, copy_through: bool | None = None, trust_match: int | None = None,
         balance_domains: bool = False, corpus_bigram: bool = True,
         progress: bool = True, log=_log) -> dict:
    import lightgbm as lgb

    from ..model import load_bundle
    from ..training.data import load_meta, load_split

    t_start = time.time()
    bundle = load_bundle(bundle_path)
    model, tok = bundle.model, bundle.tokenizer
    cfg = model.config
    if k_max < 1:
        raise ValueError("k_max must be at least 1")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability, got {threshold}")
    room = cfg.block_size - steps - k_max - 1
    max_context = min(max_context, room)
    min_context = min(min_context, max_context)
    if max_context < 1:
        raise ValueError(f"steps ({steps}) + k_max ({k_max}) leave no room for a context in the model's "
                         f"{cfg.block_size} positions")
    data = load_split(data_dir, "train")
    spans = [(0, len(data))]
    if balance_domains:  # each domain is one contiguous span of the split (training.data.prepare)
        spans = [(d["start"], d["end"]) for _, d in sorted(load_meta(data_dir)["splits"]["train"]["domains"].items())]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    batches = _windows(spans, contexts, batch_size, min_context, max_context, rng)

    # 1. PCA of the final hidden state, from a prefill pre-pass.
    pca_batches = _windows(spans, max(batch_size, 64), batch_size, min_context, max_context, rng)
    mean, comps = fit_pca(_pca_sample(model, data, pca_batches), pca_dims)
    spec = FeatureSpec(classes=[], pca_mean=mean, pca_components=comps, n_exits=len(cfg.exit_layers) - 1,
                       n_vocab=tok.n_vocab, vocab_size=cfg.vocab_size, n_last=n_last,
                       ngram_max_n=DEFAULT_MAX_N)

    # 2. Greedy continuations.
    col = collect(model, spec, data, batches, steps, k_max, progress=progress)

    # 3. Classes and rows.
    confident = confident_counts(col, spec, threshold, tok.eot_id)
    classes = [t for t, _ in confident.most_common(n_classes)]
    total = sum(confident.values())
    if total:
        ranked = np.cumsum(sorted(confident.values(), reverse=True)) / total
        log(f"{total:,} greedy tokens with p >= {threshold} ({len(confident):,} distinct); the top K cover: " +
            ", ".join(f"K={k}: {ranked[min(k, len(ranked)) - 1]:.1%}" for k in (16, 32, 64, 128, 256, 512)))
    spec = FeatureSpec(classes=classes, pca_mean=mean, pca_components=comps, n_exits=spec.n_exits,
                       n_vocab=spec.n_vocab, vocab_size=spec.vocab_size, n_last=n_last, ngram_max_n=DEFAULT_MAX_N)
    K = spec.K
    rows = build_rows(col, spec, threshold, tok.eot_id)
    n_seq = len(col.tokens)
    is_val = (rows.seq % 10) == 9 if n_seq >= 10 else rows.seq == n_seq - 1
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(np.unique(rows.y[tr])) < 2:
        raise ValueError(f"every training row has the same label ({_class_name(int(rows.y[tr][0]), spec, tok)}); "
                         f"nothing to learn. Use more contexts or another --threshold")
    counts = np.bincount(rows.y, minlength=K + 2)
    log(f"{len(rows.y):,} rows from {n_seq} contexts ({len(tr):,} train, {len(va):,} held out); "
        f"{K} token classes; labels: tokens {counts[:K].sum() / len(rows.y):.1%}, "
        f"{COPY} {counts[K] / len(rows.y):.1%}, {MODEL} {counts[K + 1] / len(rows.y):.1%}")

    # 4. LightGBM.
    params = dict(objective="multiclass", num_class=K + 2, learning_rate=learning_rate, num_leaves=num_leaves,
                  max_depth=max_depth, min_data_in_leaf=40, max_bin=63, feature_fraction=0.9,
                  bagging_fraction=0.7, bagging_freq=1, lambda_l2=1.0, max_cat_to_onehot=4, cat_smooth=10.0,
                  cat_l2=10.0, num_threads=threads, seed=seed, deterministic=True, force_col_wise=True, verbose=-1)
    names, cats = spec.names(), spec.categorical()
    dtrain = lgb.Dataset(rows.X[tr], rows.y[tr], feature_name=names, categorical_feature=cats, free_raw_data=True)
    dval = lgb.Dataset(rows.X[va], rows.y[va], reference=dtrain)
    bar = tqdm(total=rounds, desc="boosting", unit="round", disable=not progress)

    def _tick(env):
        bar.update(1)
        if env.evaluation_result_list:
            bar.set_postfix(val_logloss=f"{env.evaluation_result_list[0][2]:.4f}")

    t0 = time.time()
    booster = lgb.train(params, dtrain, num_boost_round=rounds, valid_sets=[dval], valid_names=["val"],
                        callbacks=[lgb.early_stopping(early_stopping, verbose=False), _tick])
    bar.close()
    best_it = booster.best_iteration or booster.current_iteration()
    fit_s = time.time() - t0
    log(f"LightGBM: best held-out loss after {best_it} rounds ({best_it * (K + 2)} trees), {fit_s:.1f}s")

    # 5. Costs: the verify forward per length, and the drafter's own time.
    verify_ms_given = verify_ms != "auto"
    if not verify_ms_given:
        vt = verify_threads or _SERVING_THREADS
        verify_ms = measure_verify_ms(model, k_max, ctx_len=(min_context + max_context) // 2, threads=vt)
        log(f"verify cost (measured, wall ms on {vt} threads for T=1..{k_max + 1}): {verify_ms}")
    verify_ms = [float(v) for v in verify_ms]
    base_ms, state_ms = _time_features(model, spec, col, rows, va)

    # 6. Simulated drafting on the held-out chains, for several numbers of
    # boosting rounds: every round adds K+2 trees to every draft depth's
    # predict, so the most accurate model is not always the fastest drafter.
    uniq, valid, where = _chains(rows, va, k_max)
    flat = np.where(valid, where, 0).reshape(-1)
    pos_in_va = np.zeros(len(rows.y), dtype=np.int64)
    pos_in_va[va] = np.arange(len(va))
    cand_flat = [int(c) if c >= 0 else None for c in rows.cand[flat]]
    tgt = rows.target[flat].reshape(valid.shape)
    cand_ch = np.where(valid, rows.cand[flat].reshape(valid.shape), -1)
    k_ng_default = NgramDrafter().k_max
    v = np.asarray(extend_costs(verify_ms, max(k_max, k_ng_default) + 1))  # the tree and the n-gram baseline

    def speed(drafted, accepted, ms_own):
        ms = v[drafted] + ms_own
        tokens = accepted + 1
        return float(tokens.sum() / ms.sum() * v[0]), float(tokens.mean()), float(drafted.mean())

    # Prompt lookup's own draft on every chain: the copied continuation at
    # depth 0, exact (not only up to the first rejection). It is the n-gram
    # baseline, and what the tree drafts where it trusts a long match.
    copy_len = np.zeros(len(uniq), dtype=np.int64)  # tokens the continuation has, up to max(k_max, 4)
    copy_run = np.zeros(len(uniq), dtype=np.int64)  # how many of them the model would accept
    copy_ev = []  # (match, agree) of every held-out copy, for the copy-length table
    t_copy = 0.0
    for c, key in enumerate(uniq):
        seq, i = divmod(int(key), 100000)
        t0 = _clock()
        cont, run, ev = _copy_outcome(col, seq, i, len(v) - 1, spec.ngram_max_n)
        t_copy += _clock() - t0
        copy_len[c], copy_run[c] = len(cont), run
        copy_ev.append(ev)
    copy_ms = t_copy / max(len(uniq), 1) * 1e3
    # The copy-length table (draft.copylen) is counted on the training
    # contexts' steps and judged here on the held-out ones.
    # Its evidence compares as many tokens as the held-out copies above (and
    # the drafter's at serving time, which reads the table's depth).
    table = _copy_table(col, sorted(set(rows.seq[tr].tolist())), len(v) - 1, spec.ngram_max_n, tok.eot_id)
    table.fit_lengths(verify_ms, k_max)
    table_len = np.asarray([table.length(m, a) for m, a in copy_ev], dtype=np.int64)
    # The depth-0 match length and candidate, for the trusted-match shortcut.
    len0 = np.where(valid[:, 0], rows.X[where[:, 0], names.index("ngram_len")], 0)
    has0 = cand_ch[:, 0] >= 0
    # 0: always ask the tree; --trust-match fixes one value.
    trusts = list(range(spec.ngram_max_n + 1)) if trust_match is None else [int(trust_match)]

    grid = [round(x, 2) for x in np.arange(0.05, 0.96, 0.05)] if p_min is None else [float(p_min)]
    truncs = sorted({n for n in (5, 10, 20, 40, 80, 160, 320) if n < best_it} | {best_it})
    raw = np.zeros((len(va), K + 2))
    done, options = 0, []
    cts = (False, True) if copy_through is None else (bool(copy_through),)
    for n in truncs:
        # Raw scores add up over rounds: extend the previous truncation's.
        raw += booster.predict(rows.X[va], start_iteration=done, num_iteration=n - done, raw_score=True,
                               num_threads=threads)
        done = n
        P = np.exp(raw - raw.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        pred_ms = base_ms + _time_predict(_Predictor(booster, len(names), K + 2, num_iteration=n), rows.X[va])
        tok_ch, p_ch, pc_ch = (a.reshape(valid.shape) for a in choose(P[pos_in_va[flat]], cand_flat, spec))
        # The longest draft is a setting too (every depth lengthens the
        # verify): the chains truncated to k columns are the drafter with
        # k_max = k.
        for k, rule, ct, pm in itertools.product(range(1, k_max + 1), ("myopic", "lookahead"), cts, grid):
            d, a, e = simulate(tok_ch[:, :k], p_ch[:, :k], cand_ch[:, :k], pc_ch[:, :k], tgt[:, :k], valid[:, :k],
                               pm, verify_ms, pred_ms, rule == "lookahead", ct)
            tree_ms = state_ms + e * pred_ms
            # Where the depth-0 match is at least m tokens long the drafter
            # skips the tree and copies up to copy_k tokens (m = 0: never).
            for m in trusts:
                trusted = has0 & (len0 >= m) if m else np.zeros(len(uniq), dtype=bool)
                # copy_k: a fixed copy length, or (None) the table's per
                # match, which hands a match it gives length 0 to the tree.
                for kc in ([*range(1, k_max + 1), None] if m else [0]):
                    lim = np.minimum(table_len if kc is None else kc, k)  # a request drafts at most k_max
                    copies = trusted & (lim > 0)
                    dd = np.where(copies, np.minimum(copy_len, lim), d)
                    aa = np.where(copies, np.minimum(copy_run, lim), a)
                    ms_own = np.where(copies, copy_ms, tree_ms)
                    options.append({"rounds": n, "k_max": k, "rule": rule, "copy_through": ct, "p_min": pm,
                                    "trust_match": m, "copy_k": k_max if kc is None else kc,
                                    "copy_table": kc is None, "trusted_share": float(copies.mean()),
                                    "predict_ms": pred_ms, "P": P,
                                    **dict(zip(("est_speedup", "tau", "drafted_per_step"), speed(dd, aa, ms_own)))})
    # Near-ties (the estimate is noisy) go first to the tree deciding every
    # step, then to the plain __MODEL__ handback (each shortcut must pay
    # clearly to replace the rule), then to the more permissive
    # setting: lookahead, the longest drafts, the lowest p_min, then the
    # cheaper model. Held-out probabilities can cluster near 0 and 1, and a
    # strict rule that costs nothing there refuses the in-between cases real
    # prompts bring.
    top = max(o["est_speedup"] for o in options)
    best = min((o for o in options if o["est_speedup"] >= top * 0.995),
               key=lambda o: (o["trust_match"] > 0, o["copy_through"], o["copy_table"], o["rule"] != "lookahead",
                              -o["k_max"], o["p_min"], o["rounds"], -o["copy_k"]))
    n_keep, chosen_p, predict_ms, P = best["rounds"], best["p_min"], best["predict_ms"], best["P"]
    chosen_k = best["k_max"]
    log(f"held-out simulation over {len(uniq)} greedy steps (estimates, exact up to the first rejection):")
    log(" rounds  trees  ms/depth  k_max  rule       copy-through  trust  copy-k  trusted  p_min   tau  "
        "drafted/step  est.speedup")
    for n in truncs:
        for k in sorted({1, (k_max + 1) // 2, chosen_k, k_max}):
            for rule, ct, m in itertools.product(("myopic", "lookahead"), cts, trusts):
                o = max((o for o in options if (o["rounds"], o["rule"], o["k_max"], o["copy_through"],
                                                 o["trust_match"]) == (n, rule, k, ct, m)),
                        key=lambda o: o["est_speedup"])
                log(f"{n:7d} {n * (K + 2):6d}  {o['predict_ms']:8.3f}  {k:5d}  {rule:9s}  {'yes' if ct else 'no':12s}  "
                    f"{m or '-':>5}  {('table' if o['copy_table'] else o['copy_k']) or '-':>6}  {o['trusted_share']:7.1%}  "
                    f"{o['p_min']:5.2f}  {o['tau']:4.2f}  {o['drafted_per_step']:12.2f}  {o['est_speedup']:10.2f}x"
                    + ("  <- kept" if o is best else ""))
    # The n-gram drafter on the same steps, at its default length and at the tree's k_max.
    for k_ng in sorted({k_ng_default, chosen_k}):
        ng = speed(np.minimum(copy_len, k_ng), np.minimum(copy_run, k_ng), copy_ms)
        log(f"  n-gram drafter (k={k_ng}) on the same steps: tau {ng[1]:.2f}, {ng[2]:.2f} drafted/step, "
            f"est. speedup {ng[0]:.2f}x")

    # 7. Save the kept rounds and report on exactly that model.
    draft_dir = bundle.draft_dir
    draft_dir.mkdir(parents=True, exist_ok=True)
    model_path = draft_dir / MODEL_FILE
    booster.save_model(str(model_path), num_iteration=n_keep)
    shipped = lgb.Booster(model_file=str(model_path))
    check = va[:64]
    if not np.allclose(shipped.predict(rows.X[check], num_threads=threads), P[:len(check)], atol=1e-9):
        raise RuntimeError(f"{model_path}: the saved model does not reproduce the evaluated predictions")
    pred = P.argmax(axis=1)
    yv = rows.y[va]
    report = {"rows": int(len(rows.y)), "train_rows": int(len(tr)), "val_rows": int(len(va)),
              "best_rounds": int(best_it), "rounds": int(n_keep), "trees": int(shipped.num_trees()),
              "fit_s": round(fit_s, 2),
              "label_share": {"tokens": float(counts[:K].sum() / len(rows.y)), COPY: float(counts[K] / len(rows.y)),
                              MODEL: float(counts[K + 1] / len(rows.y))}, "per_depth": []}
    log(f"kept {n_keep} rounds ({shipped.num_trees()} trees); held-out accuracy by draft depth:")
    log("depth   rows  accuracy  " + f"{MODEL} share")
    for j in range(k_max):
        m = rows.depth[va] == j
        if not m.any():
            continue
        acc = float((pred[m] == yv[m]).mean())
        report["per_depth"].append({"depth": j, "rows": int(m.sum()), "accuracy": acc,
                                    "model_share": float((yv[m] == K + 1).mean())})
        log(f"{j:5d} {int(m.sum()):6d}  {acc:8.3f}  {float((yv[m] == K + 1).mean()):8.3f}")
    tp = int(((pred == K + 1) & (yv == K + 1)).sum())
    prec = tp / max(int((pred == K + 1).sum()), 1)
    rec = tp / max(int((yv == K + 1).sum()), 1)
    report["model_precision"], report["model_recall"] = prec, rec
    log(f"{MODEL}: precision {prec:.3f}, recall {rec:.3f}")
    log(f"drafter cost: {state_ms:.3f} ms per proposal (model features) + {predict_ms:.3f} ms per draft depth "
        f"(n-gram lookup, features, tree)")
    per_setting = {}  # the best p_min (and copy length) for every (rounds, k_max, rule, copy-through, trust)
    for o in options:
        key = (o["rounds"], o["k_max"], o["rule"], o["copy_through"], o["trust_match"])
        if key not in per_setting or o["est_speedup"] > per_setting[key]["est_speedup"]:
            per_setting[key] = o
    report["simulation"] = {
        "chains": int(len(uniq)),
        "options": [{k: val for k, val in o.items() if k != "P"} for o in per_setting.values()],
        "tree": {k: val for k, val in best.items() if k != "P"},
        "ngram": {"k": k_ng, "est_speedup": ng[0], "tau": ng[1], "drafted_per_step": ng[2]},
    }

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "feature_version": FEATURE_VERSION,
        "weights_sha256": bundle.weights_sha256,
        "model_file": MODEL_FILE, "model_sha256": sha256_file(model_path),
        "classes": {"tokens": classes, "copy": K, "model": K + 1,
                    "text": [tok.decode([t]) for t in classes]},
        "features": spec.to_meta(),
        "settings": {"k_max": int(chosen_k), "p_min": chosen_p, "threshold": float(threshold),
                     "verify_ms": verify_ms, "predict_ms": round(predict_ms, 4), "state_ms": round(state_ms, 4),
                     "rule": best["rule"], "copy_through": bool(best["copy_through"]),
                     "trust_match": int(best["trust_match"]), "copy_k": int(best["copy_k"]),
                     "copy_lengths": table.to_meta() if best["copy_table"] else None,
                     "copy_ms": round(copy_ms, 4),
                     "corpus_bigram": write_corpus_bigram(bundle, data, log) if corpus_bigram else None},
        "fit": {"data_dir": str(data_dir), "contexts": contexts, "steps_per_context": steps, "seed": seed,
                "balance_domains": bool(balance_domains),
                "min_context": min_context, "max_context": max_context, "lightgbm": params, "threads": threads,
                "k_max_considered": int(k_max),
                "verify_threads": None if verify_ms_given else vt,
                "seconds": round(time.time() - t_start, 1), **report},
    }
    (draft_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    # 8. What a proposal costs where it runs: in the decode loop, right after
    # a verify forward (several times its isolated time). The engine's
    # DraftGate weighs it against what proposals earn.
    if not verify_ms_given:
        proposal_ms = _time_in_loop(bundle_path, data_dir, vt)
        meta["settings"]["proposal_ms"] = round(proposal_ms, 4)
        (draft_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        log(f"drafter cost in the decode loop: {proposal_ms:.3f} ms per proposal")
    log(f"wrote {model_path} and {draft_dir / META_FILE}")
    return meta


def write_corpus_bigram(bundle, data: np.ndarray, log=_log, min_count: int = 2) -> dict:
    """Count the corpus bigram of ``data`` (the training split) into
    ``BUNDLE/draft/``; the entry meta.json's settings keep for it."""
    table = CorpusBigram.count(data, bundle.config.vocab_size, min_count=min_count)
    bundle.draft_dir.mkdir(parents=True, exist_ok=True)
    path = table.save(bundle.draft_dir)
    log(f"corpus bigram: followers for {len(table)} token ids (seen at least {min_count} times) -> {path}")
    return {"file": CORPUS_FILE, "sha256": sha256_file(path), "min_count": min_count, "tokens": int(len(table)),
            "corpus_tokens": int(len(data))}


def refit_corpus_bigram(bundle_path, data_dir, log=_log) -> dict:
    """Recount only the corpus bigram of an already fitted drafter (the
    tree, its settings and its costs stay as they are)."""
    from ..model import load_bundle
    from ..training.data import load_split

    bundle = load_bundle(bundle_path)
    meta_path = bundle.draft_dir / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: no fitted tree drafter to add a corpus bigram to; run "
                         f"`treespec draft-fit --bundle {bundle.path}` first")
    meta = json.loads(meta_path.read_text())
    meta["settings"]["corpus_bigram"] = write_corpus_bigram(bundle, load_split(data_dir, "train"), log)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    TreeDrafter.load(bundle)  # what was written loads
    log(f"wrote {meta_path}")
    return meta


def _class_name(c: int, spec: FeatureSpec, tok) -> str:
    if c == spec.K:
        return COPY
    if c == spec.K + 1:
        return MODEL
    return repr(tok.decode([spec.classes[c]]))


def _time_features(model, spec: FeatureSpec, col: Collected, rows: Rows, idx: np.ndarray,
                   n: int = 300) -> tuple[float, float]:
    """(ms per draft depth without the tree: n-gram lookup, features_for and
    choose; ms per proposal for the model features), timed on held-out rows
    through the serving functions."""
    pick = idx[np.linspace(0, len(idx) - 1, min(n, len(idx))).astype(int)]
    probs = np.full(spec.K + 2, 1.0 / (spec.K + 2))
    cases = []
    for r in pick:
        s, i, j = int(rows.seq[r]), int(rows.step[r]), int(rows.depth[r])
        cases.append((col.tokens[s][:col.prompt_len[s] + i + j + 1], j, col.states[s][i][None]))
    t0 = _clock()
    for ctx, j, st in cases:
        ng = ngram_candidate(ctx, spec.ngram_max_n)
        features_for(spec, st, [ctx], [j], ngrams=[ng])
        choose(probs, [ng[0]], spec)
    per_depth = (_clock() - t0) / len(cases) * 1e3
    # Model features for one position, as a proposal computes them.
    C = spec.pca_mean.shape[0]
    cache = model.new_cache(batch_size=1, max_len=8)
    out = model.forward_step(torch.tensor([col.tokens[0][:4]]), 0, cache)
    lg, h, ex = out.logits[0, -1:], out.hidden[0, -1:], [e[0, -1:] for e in out.exit_hidden]
    state_features(spec, model, lg, h.reshape(1, C), ex)
    t0 = _clock()
    reps = 50
    for _ in range(reps):
        state_features(spec, model, lg, h.reshape(1, C), ex)
    return per_depth, (_clock() - t0) / reps * 1e3


def _time_in_loop(bundle_path, data_dir, threads: int, n: int = 6, prompt_len: int = 96,
                  new_tokens: int = 64) -> float:
    """Mean ms per proposal of the saved drafter inside greedy decoding, on
    ``n`` validation windows, at the serving thread count."""
    from ..model import load_bundle
    from ..training.data import load_split
    from .loop import generate_all
    from .types import Draft, SamplingParams

    bundle = load_bundle(bundle_path)
    drafter = TreeDrafter.load(bundle)
    spent = []

    class Timed:  # the drafter without its cost model: the gate stays out of the measurement
        name, k_max = drafter.name, drafter.k_max

        def propose(self, context, features, k) -> Draft:
            t = time.perf_counter()
            d = drafter.propose(context, features, k)
            spent.append(time.perf_counter() - t)
            return d

    data = load_split(data_dir, "val")
    starts = np.linspace(0, max(len(data) - prompt_len - 1, 0), n).astype(int)
    with torch_threads(threads):
        for s0 in starts:
            prompt = [int(t) for t in data[s0:s0 + prompt_len]]
            generate_all(bundle.model, prompt, SamplingParams(max_new_tokens=new_tokens), Timed(),
                         tokenizer=bundle.tokenizer)
    return float(np.mean(spent[len(spent) // 10:])) * 1e3 if spent else 0.0  # the first few warm up


def _time_predict(predictor: _Predictor, X: np.ndarray, n: int = 200) -> float:
    """ms per single-row predict through the serving fast path."""
    rows = X[np.linspace(0, len(X) - 1, min(n, len(X))).astype(int)]
    predictor(rows[0])
    t0 = _clock()
    for x in rows:
        predictor(x)
    return (_clock() - t0) / len(rows) * 1e3


# --- CLI -------------------------------------------------------------------

def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="fit the tree drafter to a bundle's model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle directory (the drafter goes to BUNDLE/draft/)")
    p.add_argument("--data-dir", default="data/default", help="prepared corpus (default: %(default)s)")
    p.add_argument("--contexts", type=int, default=600, help="training windows (default: %(default)s)")
    p.add_argument("--steps-per-context", type=int, default=32,
                   help="greedy steps whose states become rows, per window (default: %(default)s)")
    p.add_argument("--classes", type=int, default=64,
                   help="K, the token classes; each costs one tree per boosting round at every draft depth "
                        "(default: %(default)s)")
    p.add_argument("--pca-dims", type=int, default=24, help="PCA dimensions of the hidden state (default: %(default)s)")
    p.add_argument("--k-max", type=int, default=8,
                   help="longest draft considered; the held-out simulation keeps the fastest length up to it "
                        "(default: %(default)s)")
    p.add_argument("--p-min", type=float, default=None,
                   help="lowest probability a drafted token may have (default: tuned on held-out contexts)")
    p.add_argument("--copy-through", choices=("auto", "yes", "no"), default="auto",
                   help="where the tree says __MODEL__, still draft the n-gram candidate when it pays for its "
                        "verify position; 'auto' keeps it only if the held-out simulation is faster with it "
                        "(default: %(default)s)")
    p.add_argument("--trust-match", default="auto", choices=("auto", "off", "1", "2", "3"),
                   help="where the n-gram match at depth 0 is at least this many tokens long, skip the tree and "
                        "copy the continuation (its length is fitted too: a fixed one, or the copy-length table "
                        "of draft/copylen.py); 'auto' keeps the fastest in the "
                        "held-out simulation, 'off' asks the tree every step (default: %(default)s)")
    p.add_argument("--corpus-bigram", choices=("yes", "no", "only"), default="yes",
                   help="count the training split's bigram, for one-token guesses where the context has nothing "
                        "to copy; 'only' recounts it for an already fitted drafter and changes nothing else "
                        "(default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="model probability a token needs to be a token label (default: %(default)s)")
    p.add_argument("--balance-domains", action="store_true",
                   help="draw the same number of windows from every domain of the corpus (e.g. code and prose) "
                        "instead of in proportion to their size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="contexts run together (default: %(default)s)")
    p.add_argument("--min-context", type=int, default=32)
    p.add_argument("--max-context", type=int, default=384)
    p.add_argument("--rounds", type=int, default=300, help="most boosting rounds (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=0.2)
    p.add_argument("--num-leaves", type=int, default=15)
    p.add_argument("--max-depth", type=int, default=5, help="tree depth cap: bounds the predict cost")
    p.add_argument("--verify-ms", default="auto",
                   help="verify forward cost in ms for T=1,2,... positions, comma-separated, or 'auto' to "
                        "measure it here (default: %(default)s)")
    p.add_argument("--verify-threads", type=int, default=None,
                   help="torch threads to time the verify forward on: the count you will serve with "
                        f"(default: torch's default here, {_SERVING_THREADS})")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for LightGBM and torch (default: %(default)s; OpenMP threads on a machine whose "
                        "cores are busy spin instead of working, which made a 2-thread fit 100x slower here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model import BundleError
    from ..training.data import DataError

    try:
        verify = "auto" if args.verify_ms == "auto" else [float(x) for x in args.verify_ms.split(",") if x.strip()]
    except ValueError:
        print(f"treespec draft-fit: error: --verify-ms must be 'auto' or numbers, got {args.verify_ms!r}",
              file=sys.stderr)
        return 2
    try:
        if args.corpus_bigram == "only":
            refit_corpus_bigram(args.bundle, args.data_dir)
            return 0
        fit_drafter(args.bundle, args.data_dir, contexts=args.contexts, steps=args.steps_per_context,
                    n_classes=args.classes, pca_dims=args.pca_dims, k_max=args.k_max, p_min=args.p_min,
                    threshold=args.threshold, seed=args.seed, batch_size=args.batch_size,
                    min_context=args.min_context, max_context=args.max_context, rounds=args.rounds,
                    learning_rate=args.learning_rate, num_leaves=args.num_leaves, max_depth=args.max_depth,
                    verify_ms=verify, verify_threads=args.verify_threads,
                    copy_through={"auto": None, "yes": True, "no": False}[args.copy_through],
                    trust_match=None if args.trust_match == "auto" else 0 if args.trust_match == "off"
                    else int(args.trust_match), balance_domains=args.balance_domains,
                    corpus_bigram=args.corpus_bigram == "yes",
                    threads=args.threads, progress=not args.no_progress)
    except (BundleError, DataError, ValueError) as e:
        print(f"treespec draft-fit: error: {e}", file=sys.stderr)
        return 2
    return 0
