"""draft-fit's choice of settings: the drafting rule simulated on held-out
greedy steps for every candidate setting, and the fastest one kept.

A candidate is a number of boosting rounds, the tree's stopping rule
(``TreeRule``: longest draft, myopic or lookahead, copy-through, p_min) and
the trusted-match shortcut (``Shortcut``: how long a match it trusts, and how
far it then copies). The simulation needs no LightGBM: ``HeldOut`` holds the
held-out steps as chains over draft depth (the model's greedy tokens, the
n-gram candidates, prompt lookup's copies) and ``TreeView`` what the tree
decided on them with its first ``rounds`` rounds; ``simulate_options`` turns
both into the estimated speed of every candidate and ``select`` keeps one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .artifact import RULES
from .tree import worth_drafting
from .types import extend_costs

P_MIN_GRID = [round(x, 2) for x in np.arange(0.05, 0.96, 0.05)]
ROUNDS_GRID = (5, 10, 20, 40, 80, 160, 320)
NEAR_TIE = 0.995  # within this share of the best speed the estimates are too noisy to tell apart


@dataclass(frozen=True)
class TreeRule:
    """The tree's stopping rule (tree.TreeDrafter.decide)."""

    k_max: int
    rule: str  # "myopic" or "lookahead" (tree.worth_drafting)
    copy_through: bool
    p_min: float


@dataclass(frozen=True)
class Shortcut:
    """The trusted-match shortcut: where the depth-0 match is at least
    ``trust_match`` tokens long (0: never), copy up to ``copy_k`` tokens, or
    (None) as far as the copy-length table says."""

    trust_match: int
    copy_k: int | None


@dataclass
class Grid:
    """The candidate settings, in the order they are simulated (``select``
    breaks exact ties by that order)."""

    k_max: int  # the longest draft considered
    rounds: list[int]
    copy_through: tuple[bool, ...]
    p_min: list[float]
    trust_match: list[int]

    def tree_rules(self) -> list[TreeRule]:
        return [TreeRule(*s) for s in itertools.product(range(1, self.k_max + 1), RULES, self.copy_through,
                                                         self.p_min)]

    def shortcuts(self) -> list[Shortcut]:
        return [Shortcut(m, kc) for m in self.trust_match for kc in ([*range(1, self.k_max + 1), None] if m else [0])]


def make_grid(k_max: int, best_rounds: int, ngram_max_n: int, p_min: float | None = None,
              copy_through: bool | None = None, trust_match: int | None = None) -> Grid:
    """Every setting up to ``k_max`` and ``best_rounds``; a given p_min,
    copy_through or trust_match (None: search it) fixes that one."""
    return Grid(k_max=k_max,
                # Every round adds K+2 trees to every draft depth's predict,
                # so the most accurate model is not always the fastest drafter.
                rounds=sorted({n for n in ROUNDS_GRID if n < best_rounds} | {best_rounds}),
                copy_through=(False, True) if copy_through is None else (bool(copy_through),),
                p_min=P_MIN_GRID if p_min is None else [float(p_min)],
                trust_match=list(range(ngram_max_n + 1)) if trust_match is None else [int(trust_match)])


@dataclass
class HeldOut:
    """The held-out greedy steps as n chains over depth (k columns)."""

    valid: np.ndarray  # (n, k) bool: the chain has a row at this depth
    target: np.ndarray  # (n, k) the model's greedy token there
    cand: np.ndarray  # (n, k) the n-gram candidate (-1: none)
    match0: np.ndarray  # (n,) the n-gram match length at depth 0 (0: nothing to copy)
    copy_len: np.ndarray  # (n,) prompt lookup's copy at depth 0: its length
    copy_run: np.ndarray  # (n,) and how many of its tokens the model accepts
    table_len: np.ndarray  # (n,) how far the copy-length table copies it
    verify_ms: np.ndarray  # verify cost for T = 1, 2, ... as far as any draft here reaches
    state_ms: float  # model features, once per proposal
    copy_ms: float  # one prompt-lookup copy


@dataclass
class TreeView:
    """The tree's decisions (``tree.choose``) at every chain cell, with its first ``rounds`` rounds."""

    rounds: int
    probs: np.ndarray  # (held-out rows, K+2) class probabilities
    token: np.ndarray  # (n, k) chosen token (-1: __MODEL__)
    p: np.ndarray  # (n, k) its probability
    p_cand: np.ndarray  # (n, k) the n-gram candidate's
    predict_ms: float  # one draft depth with this many rounds


@dataclass
class Option:
    """One candidate setting and its simulated outcome (meta.json's fit.simulation entries)."""

    rounds: int
    k_max: int
    rule: str
    copy_through: bool
    p_min: float
    trust_match: int
    copy_k: int
    copy_table: bool
    trusted_share: float  # steps the shortcut copies instead of asking the tree
    predict_ms: float
    est_speedup: float
    tau: float  # tokens per step
    drafted_per_step: float


def simulate(chosen: np.ndarray, p: np.ndarray, cand: np.ndarray, p_cand: np.ndarray, targets: np.ndarray,
             valid: np.ndarray, p_min: float, verify_ms, predict_ms: float, lookahead: bool,
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


def speed(verify_ms: np.ndarray, drafted: np.ndarray, accepted: np.ndarray, ms_own) -> tuple[float, float, float]:
    """(estimated speedup over plain decoding, tokens per step, drafted per
    step) of steps that drafted ``drafted`` and had ``accepted`` accepted,
    the drafter costing ``ms_own`` per step."""
    ms = verify_ms[drafted] + ms_own
    tokens = accepted + 1
    return float(tokens.sum() / ms.sum() * verify_ms[0]), float(tokens.mean()), float(drafted.mean())


def simulate_options(held: HeldOut, view: TreeView, grid: Grid) -> list[Option]:
    """Every tree rule and shortcut of ``grid`` with the tree of ``view``."""
    options, shortcuts = [], grid.shortcuts()
    never = np.zeros(len(held.match0), dtype=bool)
    for r in grid.tree_rules():
        k = r.k_max  # the chains truncated to k columns are the drafter with k_max = k
        d, a, e = simulate(view.token[:, :k], view.p[:, :k], held.cand[:, :k], view.p_cand[:, :k],
                           held.target[:, :k], held.valid[:, :k], r.p_min, held.verify_ms, view.predict_ms,
                           r.rule == "lookahead", r.copy_through)
        tree_ms = held.state_ms + e * view.predict_ms
        for s in shortcuts:
            # A table length of 0 hands that match to the tree; a request drafts at most k_max.
            lim = np.minimum(held.table_len if s.copy_k is None else s.copy_k, k)
            copies = (held.match0 >= s.trust_match if s.trust_match else never) & (lim > 0)
            dd = np.where(copies, np.minimum(held.copy_len, lim), d)
            aa = np.where(copies, np.minimum(held.copy_run, lim), a)
            ms_own = np.where(copies, held.copy_ms, tree_ms)
            options.append(Option(view.rounds, k, r.rule, r.copy_through, r.p_min, s.trust_match,
                                  grid.k_max if s.copy_k is None else s.copy_k, s.copy_k is None,
                                  float(copies.mean()), view.predict_ms, *speed(held.verify_ms, dd, aa, ms_own)))
    return options


def select(options: list[Option]) -> Option:
    """The setting to keep: the fastest, where near-ties (the estimate is
    noisy) go first to the tree deciding every step, then to the plain
    __MODEL__ handback (each shortcut must pay clearly to replace the plain
    rule), then to the more permissive setting: lookahead, the longest
    drafts, the lowest p_min, then the cheaper model. Held-out
    probabilities can cluster near 0 and 1, and a strict rule that costs
    nothing there refuses the in-between cases real prompts bring. Exact
    ties go to the first in ``options``."""
    top = max(o.est_speedup for o in options)
    return min((o for o in options if o.est_speedup >= top * NEAR_TIE),
               key=lambda o: (o.trust_match > 0, o.copy_through, o.copy_table, o.rule != "lookahead",
                              -o.k_max, o.p_min, o.rounds, -o.copy_k))


def best_per_setting(options: list[Option]) -> list[Option]:
    """The fastest p_min (and copy length) for every (rounds, k_max, rule,
    copy-through, trust_match), in first-seen order."""
    best: dict[tuple, Option] = {}
    for o in options:
        key = (o.rounds, o.k_max, o.rule, o.copy_through, o.trust_match)
        if key not in best or o.est_speedup > best[key].est_speedup:
            best[key] = o
    return list(best.values())
