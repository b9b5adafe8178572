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
   decode loop stops there.
4. LightGBM multiclass with early stopping on held-out contexts (whole
   contexts, never rows of a context on both sides).
5. On the held-out contexts the drafting rule is simulated
   (``draft.simulation``): accepted drafts per step (tau), drafted tokens,
   and the speed that gives with the measured verify cost and the measured
   drafter cost (both timed on the kernels the model will be served with,
   ``--verify-dtype``, not on the float32 model steps 1-3 run), for a grid of p_min, both stopping rules
   (tree.worth_drafting), with and without copy-through
   (tree.TreeDrafter.decide), with and without the trusted-match shortcut
   (and its copy length: fixed, or the copy-length table of
   ``draft.copylen``, counted on the training contexts), every longest draft k_max up to --k-max and
   several numbers of boosting rounds. Every round adds K+2
   trees that each draft depth has to evaluate, and every depth lengthens
   the verify, so the kept setting is the one with the best estimated
   speed, not the lowest loss. (--p-min fixes p_min.)
   The n-gram drafter is simulated on the same steps for comparison.
6. ``BUNDLE/draft/tree.txt`` and ``meta.json`` (``draft.artifact``) are
   written, with the corpus bigram (``draft.corpus``: every token's most
   frequent follower in the training split) in ``bigram.safetensors``. The
   simulation does not use it: it only fills steps that would otherwise
   draft nothing, and ``treespec bench`` measures what that gives.

In code the steps are a pipeline of functions, each taking and returning
dataclasses: ``gather`` (1, 2 and the classes) -> ``make_rows`` (3) ->
``train`` (4) -> ``measure_costs`` and ``held_out`` -> ``simulate_settings``
and ``simulation.select`` (5) -> ``write_drafter`` (6).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..model.tokenizer import sha256_file
from .artifact import META_FILE, MODEL_FILE, RULES, CorpusEntry, DrafterMeta, TreeSettings, read
from .collect import (Collected, Rows, build_rows, chain_layout, collect, confident_counts, copy_outcome, copy_table,
                      pca_sample, windows)
from .copylen import CopyLengths
from .corpus import FILE as CORPUS_FILE, CorpusBigram
from .costs import measure_verify_ms, torch_threads
from .features import FeatureSpec, features_for, fit_pca, state_features
from .ngram import DEFAULT_MAX_N, NgramDrafter, NgramIndex
from .predictor import Predictor
from .simulation import (Grid, HeldOut, Option, TreeView, best_per_setting, make_grid, select, simulate_options,
                         speed)
from .tree import COPY, MODEL, TreeDrafter, choose
from .types import extend_costs

# The drafter's own costs (single-threaded NumPy and LightGBM work) are timed
# in process CPU time: the fit may share a busy machine, and time spent
# descheduled is not the cost of the work.
_clock = time.process_time
# torch's default intra-op threads in a fresh process: what a server started
# with threads=0 (its default) runs on.
SERVING_THREADS = torch.get_num_threads()


@dataclass
class FitConfig:
    """draft-fit's inputs: ``fit_drafter``'s keyword arguments (the CLI's flags)."""

    contexts: int = 600
    steps: int = 32
    n_classes: int = 64
    pca_dims: int = 24
    k_max: int = 8
    p_min: float | None = None  # None: searched
    threshold: float = 0.5
    seed: int = 0
    batch_size: int = 16
    min_context: int = 32
    max_context: int = 384
    rounds: int = 300
    learning_rate: float = 0.2
    num_leaves: int = 15
    max_depth: int = 5
    early_stopping: int = 10
    verify_ms: list[float] | str = "auto"  # "auto": timed here
    verify_threads: int | None = None
    verify_dtype: str = "auto"  # the kernels the costs are timed on: treespec serve's --dtype
    threads: int = 1
    n_last: int = 3
    copy_through: bool | None = None  # None: searched
    trust_match: int | None = None  # None: searched
    balance_domains: bool = False
    corpus_bigram: bool = True
    progress: bool = True

    def for_model(self, block_size: int) -> FitConfig:
        """These settings, checked, with the context lengths clipped to what
        the model's positions leave room for."""
        if self.k_max < 1:
            raise ValueError("k_max must be at least 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a probability, got {self.threshold}")
        max_context = min(self.max_context, block_size - self.steps - self.k_max - 1)
        if max_context < 1:
            raise ValueError(f"steps ({self.steps}) + k_max ({self.k_max}) leave no room for a context in the "
                             f"model's {block_size} positions")
        return replace(self, min_context=min(self.min_context, max_context), max_context=max_context)


def _log(msg: str) -> None:
    print(msg, flush=True)


# --- the pipeline --------------------------------------------------------------

def fit_drafter(bundle_path: str | os.PathLike, data_dir: str | os.PathLike = "data/default", *,
                threads: int = 1, log=_log, **kw) -> dict:
    """Fit and save the tree drafter; returns its meta.json contents.
    Keyword arguments are ``FitConfig``'s (the CLI's flags)."""
    cfg = FitConfig(threads=threads, **kw)
    with torch_threads(threads):
        return _fit(bundle_path, data_dir, cfg, log).to_dict()


def _fit(bundle_path: str | os.PathLike, data_dir: str | os.PathLike, cfg: FitConfig, log) -> DrafterMeta:
    from ..model import load_bundle
    from ..training.data import load_meta, load_split

    t_start = time.time()
    bundle = load_bundle(bundle_path)
    cfg = cfg.for_model(bundle.config.block_size)
    data = load_split(data_dir, "train")
    spans = [(0, len(data))]
    if cfg.balance_domains:  # each domain is one contiguous span of the split (training.data.prepare)
        spans = [(d["start"], d["end"]) for _, d in sorted(load_meta(data_dir)["splits"]["train"]["domains"].items())]
    eot = bundle.tokenizer.eot_id
    g = gather(bundle.model, bundle.tokenizer, data, spans, cfg, log)
    d = make_rows(g, cfg, bundle.tokenizer, log)
    trained = train(d, g.spec, cfg, log)
    served = serving_bundle(bundle_path, cfg, log) if cfg.verify_ms == "auto" else None
    costs = measure_costs(served.model if served else bundle.model, g, d, cfg, log)
    chains = held_out(g, d, costs, cfg.k_max, eot)
    grid = make_grid(cfg.k_max, trained.best_rounds, g.spec.ngram_max_n, cfg.p_min, cfg.copy_through,
                     cfg.trust_match)
    sim = simulate_settings(trained.booster, g.spec, d, chains, grid, costs.base_ms, cfg.threads)
    best = select(sim.options)
    simulation = report_simulation(sim, best, chains.held, g.spec.K, log)
    meta = write_drafter(bundle, cfg, data, data_dir, g, d, trained, costs, chains, sim, best, simulation, t_start,
                         log)
    # What a proposal costs where it runs: in the decode loop, right after
    # a verify forward (several times its isolated time). The decode loop's
    # DraftGate weighs it against what proposals earn.
    if costs.verify_threads is not None:
        proposal_ms = _time_in_loop(served, data_dir, costs.verify_threads)
        meta.settings.proposal_ms = round(proposal_ms, 4)
        meta.write(bundle.draft_dir / META_FILE)
        log(f"drafter cost in the decode loop: {proposal_ms:.3f} ms per proposal")
    log(f"wrote {bundle.draft_dir / MODEL_FILE} and {bundle.draft_dir / META_FILE}")
    return meta


@dataclass
class Gathered:
    """Steps 1-2: the greedy runs, and the feature spec with the K classes."""

    col: Collected
    spec: FeatureSpec


def gather(model, tok, data: np.ndarray, spans: Sequence[tuple[int, int]], cfg: FitConfig, log=_log) -> Gathered:
    """The contexts, the PCA, the greedy continuations and the classes."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    batches = windows(spans, cfg.contexts, cfg.batch_size, cfg.min_context, cfg.max_context, rng)
    # 1. PCA of the final hidden state, from a prefill pre-pass.
    pca_batches = windows(spans, max(cfg.batch_size, 64), cfg.batch_size, cfg.min_context, cfg.max_context, rng)
    mean, comps = fit_pca(pca_sample(model, data, pca_batches), cfg.pca_dims)
    spec = FeatureSpec(classes=[], pca_mean=mean, pca_components=comps, n_exits=len(model.config.exit_layers) - 1,
                       n_vocab=tok.n_vocab, vocab_size=model.config.vocab_size, n_last=cfg.n_last,
                       ngram_max_n=DEFAULT_MAX_N)
    # 2. Greedy continuations.
    col = collect(model, spec, data, batches, cfg.steps, cfg.k_max, progress=cfg.progress)
    # The classes: the tokens the model most often generates confidently.
    confident = confident_counts(col, spec, cfg.threshold, tok.eot_id)
    classes = [t for t, _ in confident.most_common(cfg.n_classes)]
    total = sum(confident.values())
    if total:
        ranked = np.cumsum(sorted(confident.values(), reverse=True)) / total
        log(f"{total:,} greedy tokens with p >= {cfg.threshold} ({len(confident):,} distinct); the top K cover: " +
            ", ".join(f"K={k}: {ranked[min(k, len(ranked)) - 1]:.1%}" for k in (16, 32, 64, 128, 256, 512)))
    return Gathered(col, replace(spec, classes=classes))


@dataclass
class TrainingRows:
    """Step 3: the rows, split into training and held-out contexts."""

    rows: Rows
    train: np.ndarray  # row indices to fit on
    val: np.ndarray  # held-out row indices: whole contexts, never rows of a context on both sides
    counts: np.ndarray  # rows per class (K+2)


def make_rows(g: Gathered, cfg: FitConfig, tok, log=_log) -> TrainingRows:
    """Every context's rows, a tenth of the contexts held out."""
    spec, K = g.spec, g.spec.K
    rows = build_rows(g.col, spec, cfg.threshold, tok.eot_id)
    n_seq = len(g.col.tokens)
    is_val = (rows.seq % 10) == 9 if n_seq >= 10 else rows.seq == n_seq - 1
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(np.unique(rows.y[tr])) < 2:
        raise ValueError(f"every training row has the same label ({_class_name(int(rows.y[tr][0]), spec, tok)}); "
                         f"nothing to learn. Use more contexts or another --threshold")
    counts = np.bincount(rows.y, minlength=K + 2)
    log(f"{len(rows.y):,} rows from {n_seq} contexts ({len(tr):,} train, {len(va):,} held out); "
        f"{K} token classes; labels: tokens {counts[:K].sum() / len(rows.y):.1%}, "
        f"{COPY} {counts[K] / len(rows.y):.1%}, {MODEL} {counts[K + 1] / len(rows.y):.1%}")
    return TrainingRows(rows, tr, va, counts)


@dataclass
class Trained:
    """Step 4: the booster with every round it trained, and how."""

    booster: object  # lightgbm.Booster
    best_rounds: int  # the held-out loss was lowest here
    fit_s: float
    params: dict


def train(d: TrainingRows, spec: FeatureSpec, cfg: FitConfig, log=_log) -> Trained:
    """LightGBM multiclass, early-stopped on the held-out rows."""
    import lightgbm as lgb

    params = dict(objective="multiclass", num_class=spec.K + 2, learning_rate=cfg.learning_rate,
                  num_leaves=cfg.num_leaves, max_depth=cfg.max_depth, min_data_in_leaf=40, max_bin=63,
                  feature_fraction=0.9, bagging_fraction=0.7, bagging_freq=1, lambda_l2=1.0, max_cat_to_onehot=4,
                  cat_smooth=10.0, cat_l2=10.0, num_threads=cfg.threads, seed=cfg.seed, deterministic=True,
                  force_col_wise=True, verbose=-1)
    rows = d.rows
    dtrain = lgb.Dataset(rows.X[d.train], rows.y[d.train], feature_name=spec.names(),
                         categorical_feature=spec.categorical(), free_raw_data=True)
    dval = lgb.Dataset(rows.X[d.val], rows.y[d.val], reference=dtrain)
    bar = tqdm(total=cfg.rounds, desc="boosting", unit="round", disable=not cfg.progress)

    def _tick(env):
        bar.update(1)
        if env.evaluation_result_list:
            bar.set_postfix(val_logloss=f"{env.evaluation_result_list[0][2]:.4f}")

    t0 = time.time()
    booster = lgb.train(params, dtrain, num_boost_round=cfg.rounds, valid_sets=[dval], valid_names=["val"],
                        callbacks=[lgb.early_stopping(cfg.early_stopping, verbose=False), _tick])
    bar.close()
    best_it = booster.best_iteration or booster.current_iteration()
    fit_s = time.time() - t0
    log(f"LightGBM: best held-out loss after {best_it} rounds ({best_it * (spec.K + 2)} trees), {fit_s:.1f}s")
    return Trained(booster, best_it, fit_s, params)


@dataclass
class Costs:
    """The verify forward per length, and the drafter's own time."""

    verify_ms: list[float]
    verify_threads: int | None  # the threads it was timed on; None: given, not timed
    base_ms: float  # one draft depth without the tree: n-gram lookup, features_for, choose
    state_ms: float  # the model features, once per proposal


def serving_bundle(bundle_path, cfg: FitConfig, log=_log):
    """The bundle as ``treespec serve --dtype cfg.verify_dtype`` runs it on
    this machine, at the verify thread count: the drafter's costs are priced
    against the forward it will be served with. The float32 forward the fit
    collects on took 8x the int8 one here (13.8 ms a position in
    models/default/draft/meta.json against 1.7, bench/results/verify-noise-*.json),
    and settings chosen against it thought a proposal nearly free."""
    from ..model.kernels import load_for_inference

    with torch_threads(cfg.verify_threads or SERVING_THREADS):
        served, kplan = load_for_inference(bundle_path, dtype=cfg.verify_dtype)
    log(f"costs timed on the served kernels: {kplan.precision} (--verify-dtype {cfg.verify_dtype})")
    return served


def measure_costs(model, g: Gathered, d: TrainingRows, cfg: FitConfig, log=_log) -> Costs:
    """The verify curve (timed here unless given) and the drafter's own costs, timed on held-out rows."""
    vt, verify_ms = None, cfg.verify_ms
    if verify_ms == "auto":
        vt = cfg.verify_threads or SERVING_THREADS
        verify_ms = measure_verify_ms(model, cfg.k_max, ctx_len=(cfg.min_context + cfg.max_context) // 2, threads=vt)
        log(f"verify cost (measured, wall ms on {vt} threads for T=1..{cfg.k_max + 1}): {verify_ms}")
    base_ms, state_ms = _time_features(model, g.spec, g.col, d.rows, d.val)
    return Costs([float(v) for v in verify_ms], vt, base_ms, state_ms)


@dataclass
class Chains:
    """The held-out greedy steps as chains over draft depth."""

    held: HeldOut  # what the simulation needs
    where: np.ndarray  # (n, k) each cell's row in the rows (-1: none)
    table: CopyLengths  # the copy-length table: counted on the training contexts' steps, judged on these


def held_out(g: Gathered, d: TrainingRows, costs: Costs, k_max: int, eot: int) -> Chains:
    """The held-out steps as chains over depth, with prompt lookup's copy
    at each, for the simulation; and the copy-length table."""
    rows, spec = d.rows, g.spec
    seqs, steps, valid, where = chain_layout(rows, d.val, k_max)
    flat = np.where(valid, where, 0).reshape(-1)
    cand = np.where(valid, rows.cand[flat].reshape(valid.shape), -1)
    # As far as any draft reaches: the tree's and the n-gram baseline's.
    v = np.asarray(extend_costs(costs.verify_ms, max(k_max, NgramDrafter().k_max) + 1))
    # Prompt lookup's own draft on every chain: the copied continuation at
    # depth 0, exact (not only up to the first rejection). It is the n-gram
    # baseline, and what the tree drafts where it trusts a long match.
    copy_len = np.zeros(len(seqs), dtype=np.int64)  # tokens the continuation has, up to len(v) - 1
    copy_run = np.zeros(len(seqs), dtype=np.int64)  # how many of them the model would accept
    copy_ev = []  # (match, agree) of every held-out copy, for the copy-length table
    t_copy = 0.0
    for c, (seq, i) in enumerate(zip(seqs.tolist(), steps.tolist())):
        t0 = _clock()
        cont, run, ev = copy_outcome(g.col, seq, i, len(v) - 1, spec.ngram_max_n)
        t_copy += _clock() - t0
        copy_len[c], copy_run[c] = len(cont), run
        copy_ev.append(ev)
    # The table's evidence compares as many tokens as the held-out copies
    # above (and the drafter's at serving time, which reads the table's depth).
    table = copy_table(g.col, sorted(set(rows.seq[d.train].tolist())), len(v) - 1, spec.ngram_max_n, eot)
    table.fit_lengths(costs.verify_ms, k_max)
    len0 = np.where(valid[:, 0], rows.X[where[:, 0], spec.names().index("ngram_len")], 0)
    held = HeldOut(valid=valid, target=rows.target[flat].reshape(valid.shape), cand=cand,
                   match0=np.where(cand[:, 0] >= 0, len0, 0), copy_len=copy_len, copy_run=copy_run,
                   table_len=np.asarray([table.length(m, a) for m, a in copy_ev], dtype=np.int64),
                   verify_ms=v, state_ms=costs.state_ms, copy_ms=t_copy / max(len(seqs), 1) * 1e3)
    return Chains(held, where, table)


def tree_views(booster, spec: FeatureSpec, d: TrainingRows, chains: Chains, rounds: Sequence[int],
               base_ms: float, threads: int) -> Iterator[TreeView]:
    """The tree's decisions on the held-out chains with each number of
    rounds in ``rounds`` (ascending), one ``TreeView`` at a time."""
    K, X, valid = spec.K, d.rows.X[d.val], chains.held.valid
    flat = np.where(valid, chains.where, 0).reshape(-1)
    pos_in_va = np.zeros(len(d.rows.y), dtype=np.int64)
    pos_in_va[d.val] = np.arange(len(d.val))
    cand_flat = [int(c) if c >= 0 else None for c in d.rows.cand[flat]]
    raw = np.zeros((len(d.val), K + 2))
    done = 0
    for n in rounds:
        # Raw scores add up over rounds: extend the previous truncation's.
        raw += booster.predict(X, start_iteration=done, num_iteration=n - done, raw_score=True, num_threads=threads)
        done = n
        P = np.exp(raw - raw.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        predict_ms = base_ms + _time_predict(Predictor(booster, len(spec.names()), K + 2, num_iteration=n), X)
        tok, p, p_cand = (a.reshape(valid.shape) for a in choose(P[pos_in_va[flat]], cand_flat, spec))
        yield TreeView(n, P, tok, p, p_cand, predict_ms)


@dataclass
class Simulation:
    """Step 5: every candidate setting's simulated outcome."""

    grid: Grid
    options: list[Option]
    probs: dict[int, np.ndarray]  # held-out class probabilities by number of rounds


def simulate_settings(booster, spec: FeatureSpec, d: TrainingRows, chains: Chains, grid: Grid, base_ms: float,
                      threads: int) -> Simulation:
    """Every setting of ``grid`` simulated on the held-out chains."""
    sim = Simulation(grid, [], {})
    for view in tree_views(booster, spec, d, chains, grid.rounds, base_ms, threads):
        sim.probs[view.rounds] = view.probs
        sim.options += simulate_options(chains.held, view, grid)
    return sim


def report_simulation(sim: Simulation, best: Option, held: HeldOut, K: int, log=_log) -> dict:
    """Log the simulation, and prompt lookup's on the same steps; meta.json's ``fit.simulation``."""
    grid, options = sim.grid, sim.options
    log(f"held-out simulation over {len(held.match0)} greedy steps (estimates, exact up to the first rejection):")
    log(" rounds  trees  ms/depth  k_max  rule       copy-through  trust  copy-k  trusted  p_min   tau  "
        "drafted/step  est.speedup")
    for n in grid.rounds:
        for k in sorted({1, (grid.k_max + 1) // 2, best.k_max, grid.k_max}):
            for rule, ct, m in itertools.product(RULES, grid.copy_through, grid.trust_match):
                o = max((o for o in options if (o.rounds, o.rule, o.k_max, o.copy_through, o.trust_match)
                         == (n, rule, k, ct, m)), key=lambda o: o.est_speedup)
                log(f"{n:7d} {n * (K + 2):6d}  {o.predict_ms:8.3f}  {k:5d}  {rule:9s}  {'yes' if ct else 'no':12s}  "
                    f"{m or '-':>5}  {('table' if o.copy_table else o.copy_k) or '-':>6}  {o.trusted_share:7.1%}  "
                    f"{o.p_min:5.2f}  {o.tau:4.2f}  {o.drafted_per_step:12.2f}  {o.est_speedup:10.2f}x"
                    + ("  <- kept" if o is best else ""))
    # The n-gram drafter on the same steps, at its default length and at the
    # tree's k_max; meta.json keeps the last, the longer.
    for k_ng in sorted({NgramDrafter().k_max, best.k_max}):
        ng = speed(held.verify_ms, np.minimum(held.copy_len, k_ng), np.minimum(held.copy_run, k_ng), held.copy_ms)
        log(f"  n-gram drafter (k={k_ng}) on the same steps: tau {ng[1]:.2f}, {ng[2]:.2f} drafted/step, "
            f"est. speedup {ng[0]:.2f}x")
    return {"chains": int(len(held.match0)), "options": [asdict(o) for o in best_per_setting(options)],
            "tree": asdict(best), "ngram": {"k": k_ng, "est_speedup": ng[0], "tau": ng[1], "drafted_per_step": ng[2]}}


def write_drafter(bundle, cfg: FitConfig, data: np.ndarray, data_dir, g: Gathered, d: TrainingRows,
                  trained: Trained, costs: Costs, chains: Chains, sim: Simulation, best: Option, simulation: dict,
                  t_start: float, log=_log) -> DrafterMeta:
    """Step 6: the kept rounds of the tree, the corpus bigram and meta.json
    (``simulation`` is ``report_simulation``'s), with a report on exactly
    the model saved. ``t_start``: when the fit started."""
    import lightgbm as lgb

    spec, K, rows, va = g.spec, g.spec.K, d.rows, d.val
    draft_dir = bundle.draft_dir
    draft_dir.mkdir(parents=True, exist_ok=True)
    model_path = draft_dir / MODEL_FILE
    trained.booster.save_model(str(model_path), num_iteration=best.rounds)
    shipped = lgb.Booster(model_file=str(model_path))
    P, check = sim.probs[best.rounds], va[:64]
    if not np.allclose(shipped.predict(rows.X[check], num_threads=cfg.threads), P[:len(check)], atol=1e-9):
        raise RuntimeError(f"{model_path}: the saved model does not reproduce the evaluated predictions")
    pred = P.argmax(axis=1)
    yv = rows.y[va]
    counts, n = d.counts, len(rows.y)
    report = {"rows": int(n), "train_rows": int(len(d.train)), "val_rows": int(len(va)),
              "best_rounds": int(trained.best_rounds), "rounds": int(best.rounds), "trees": int(shipped.num_trees()),
              "fit_s": round(trained.fit_s, 2),
              "label_share": {"tokens": float(counts[:K].sum() / n), COPY: float(counts[K] / n),
                              MODEL: float(counts[K + 1] / n)}, "per_depth": []}
    log(f"kept {best.rounds} rounds ({shipped.num_trees()} trees); held-out accuracy by draft depth:")
    log("depth   rows  accuracy  " + f"{MODEL} share")
    for j in range(cfg.k_max):
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
    log(f"drafter cost: {costs.state_ms:.3f} ms per proposal (model features) + {best.predict_ms:.3f} ms per draft "
        f"depth (n-gram lookup, features, tree)")
    report["simulation"] = simulation

    settings = TreeSettings(
        k_max=int(best.k_max), p_min=best.p_min, threshold=float(cfg.threshold), verify_ms=costs.verify_ms,
        predict_ms=round(best.predict_ms, 4), state_ms=round(costs.state_ms, 4), rule=best.rule,
        copy_through=bool(best.copy_through), trust_match=int(best.trust_match), copy_k=int(best.copy_k),
        copy_lengths=chains.table if best.copy_table else None, copy_ms=round(chains.held.copy_ms, 4),
        corpus_bigram=write_corpus_bigram(bundle, data, log) if cfg.corpus_bigram else None)
    meta = DrafterMeta(
        weights_sha256=bundle.weights_sha256, model_file=MODEL_FILE, model_sha256=sha256_file(model_path),
        classes={"tokens": spec.classes, "copy": K, "model": K + 1,
                 "text": [bundle.tokenizer.decode([t]) for t in spec.classes]},
        features=spec, settings=settings,
        fit={"data_dir": str(data_dir), "contexts": cfg.contexts, "steps_per_context": cfg.steps, "seed": cfg.seed,
             "balance_domains": bool(cfg.balance_domains), "min_context": cfg.min_context,
             "max_context": cfg.max_context, "lightgbm": trained.params, "threads": cfg.threads,
             "k_max_considered": int(cfg.k_max), "verify_threads": costs.verify_threads,
             "verify_dtype": cfg.verify_dtype if costs.verify_threads is not None else None,
             "seconds": round(time.time() - t_start, 1), **report})
    meta.write(draft_dir / META_FILE)
    return meta


def write_corpus_bigram(bundle, data: np.ndarray, log=_log, min_count: int = 2) -> CorpusEntry:
    """Count the corpus bigram of ``data`` (the training split) into
    ``BUNDLE/draft/``; the entry meta.json's settings keep for it."""
    table = CorpusBigram.count(data, bundle.config.vocab_size, min_count=min_count)
    bundle.draft_dir.mkdir(parents=True, exist_ok=True)
    path = table.save(bundle.draft_dir)
    log(f"corpus bigram: followers for {len(table)} token ids (seen at least {min_count} times) -> {path}")
    return CorpusEntry(file=CORPUS_FILE, sha256=sha256_file(path), min_count=min_count, tokens=int(len(table)),
                       corpus_tokens=int(len(data)))


def refit_corpus_bigram(bundle_path, data_dir, log=_log) -> dict:
    """Recount only the corpus bigram of an already fitted drafter (the
    tree, its settings and its costs stay as they are)."""
    from ..model import load_bundle
    from ..training.data import load_split

    bundle = load_bundle(bundle_path)
    meta_path = bundle.draft_dir / META_FILE
    meta = read(meta_path, bundle)
    meta.settings.corpus_bigram = write_corpus_bigram(bundle, load_split(data_dir, "train"), log)
    meta.write(meta_path)
    TreeDrafter.load(bundle)  # what was written loads
    log(f"wrote {meta_path}")
    return meta.to_dict()


def _class_name(c: int, spec: FeatureSpec, tok) -> str:
    if c == spec.K:
        return COPY
    if c == spec.K + 1:
        return MODEL
    return repr(tok.decode([spec.classes[c]]))


# --- cost measurements -------------------------------------------------------

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
        ctx = col.tokens[s][:col.prompt_len[s] + i + j + 1]
        # A request keeps its n-gram index and adds a token a depth. Indexing the
        # whole context from scratch instead (ngram_candidate) made draft-fit's
        # "ms per draft depth" 0.57-1.00 on a 6 x 256 bundle, against 0.14 this way.
        index = NgramIndex(spec.ngram_max_n)
        index.sync(ctx[:-1])
        cases.append((ctx, j, col.states[s][i][None], index))
    t0 = _clock()
    for ctx, j, st, index in cases:
        index.sync(ctx)
        ng = index.candidate(spec.ngram_max_n)
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


def _time_in_loop(bundle, data_dir, threads: int, n: int = 6, prompt_len: int = 96,
                  new_tokens: int = 64) -> float:
    """Mean ms per proposal of the saved drafter inside greedy decoding, on
    ``n`` validation windows, at the serving thread count. ``bundle``: as
    served (``serving_bundle``), or a path to load as stored."""
    from ..model import Bundle, load_bundle
    from ..training.data import load_split
    from .loop import generate_all
    from .types import Draft, SamplingParams

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    drafter = TreeDrafter.load(bundle)
    spent = []
    # A small model's context may not hold the default prompt and continuation: shrink both to fit.
    block = bundle.config.block_size
    new_tokens = min(new_tokens, block // 3)
    prompt_len = min(prompt_len, block - new_tokens)

    class Timed:  # one request of the tree without its gate: the cost model stays out of the measurement
        name, k_max = drafter.name, drafter.k_max

        def open(self) -> "Timed":
            self.state = drafter.open()
            return self

        def propose(self, context, features, k) -> Draft:
            t = time.perf_counter()
            d = self.state.propose(context, features, k)
            spent.append(time.perf_counter() - t)
            return d

        def observe(self, drafted, emitted) -> None:
            self.state.observe(drafted, emitted)

    data = load_split(data_dir, "val")
    starts = np.linspace(0, max(len(data) - prompt_len - 1, 0), n).astype(int)
    with torch_threads(threads):
        for s0 in starts:
            prompt = [int(t) for t in data[s0:s0 + prompt_len]]
            generate_all(bundle.model, prompt, SamplingParams(max_new_tokens=new_tokens), Timed(),
                         tokenizer=bundle.tokenizer)
    return float(np.mean(spent[len(spent) // 10:])) * 1e3 if spent else 0.0  # the first few warm up


def _time_predict(predictor: Predictor, X: np.ndarray, n: int = 200) -> float:
    """ms per single-row predict through the serving fast path."""
    rows = X[np.linspace(0, len(X) - 1, min(n, len(X))).astype(int)]
    predictor(rows[0])
    t0 = _clock()
    for x in rows:
        predictor(x)
    return (_clock() - t0) / len(rows) * 1e3


# --- CLI -------------------------------------------------------------------
