"""The ``tree`` drafter: a LightGBM multiclass model over the model's own features.

Classes (``K`` = number of token classes)::

    0 .. K-1   a token: one of the K tokens the model most often predicts
               with high confidence on the training corpus
    K          __COPY__: propose the n-gram (prompt-lookup) candidate
    K+1        __MODEL__: stop drafting, hand control back to the model

A proposal starts from the features the last verify step left (the position
whose logits chose the newest token) and walks forward one drafted token at
a time::

    state = state_features(model view at the last verified position)   once
    depth j = 0, 1, ...:
        x  = features_for(state, context + drafted, depth=j)
        p  = tree(x)                        # over the K+2 classes
        __COPY__'s mass goes to the n-gram candidate's token
        best token t with probability p_t, against p(__MODEL__):
          __MODEL__ wins           -> stop (handback)
          p_t < p_min              -> stop (handback)
          not worth_drafting(...)  -> stop (handback): the longer verify
                                      costs more than it is expected to save
          else draft t, continue (up to k_max)
        copy-through (a fitted setting, off unless it simulated faster):
          where the rule above stops, draft the n-gram candidate instead if
          worth_drafting(...) at the chance the tree gives it (p(__COPY__)
          plus its token's class), and continue

Before all of it, the trusted-match shortcut (a fitted setting, off unless
it simulated faster): where the n-gram match at depth 0 is at least
``trust_match`` tokens long, the drafter copies the continuation, as prompt
lookup would, without computing features or asking the tree: up to
``copy_k`` tokens, or, with a fitted copy-length table (``draft.copylen``),
as far as the match's evidence says pays under the verify curve; a length
of 0 there hands the step to the tree. A match is mostly where the tree
says __COPY__ anyway, and there its cost (about as much as a fifth of a
forward on the CPU it was fitted on) buys nothing.

Where the tree hands back before drafting anything and the context has
nothing to copy (or only a one-token match), the drafter fills the verify slot with the corpus guess
(``draft.corpus``: the newest token's most frequent follower in the training
split) if its corpus share pays for one more position. On a CPU whose
verify forward costs the same for one and two positions it always does,
and the guess is right often enough under free sampling to matter. The
DraftGate's fallback (prompt lookup) guesses the same way there.

That is the rule. Copy-through is the cost-aware form of the handback:
where the verify forward costs about the same for 1 and 8 positions,
a candidate the tree thinks is right only 30% of the time is still worth
its position, and stopping at __MODEL__ gives that away.

The drafter evaluates the rule in rounds rather than one tree call per
depth: a round builds the rows for every remaining depth along the
copy path (each depth's context extended by the n-gram candidates before
it, which is what ``__COPY__`` drafts), predicts them in one go and walks
them with the rule above. Up to the first depth where the tree picks a
token other than the candidate, every row is the row the one-depth walk
would build; after it they are stale, and the next round starts there.

``worth_drafting`` is the cost-aware part: drafting token j makes the verify
forward one position longer, which costs ``verify_ms[j+1] - verify_ms[j]``
plus one more tree evaluation, and saves a whole forward (``verify_ms[0]``)
only if it and every earlier draft are accepted. The verify costs are
measured when fitting (or given) and stored in meta.json, with the rule
("myopic": this draft alone must pay; "lookahead": the drafts that may
follow count too) that simulated faster on held-out text.

Everything lives in ``BUNDLE/draft/`` (``draft.artifact`` reads and checks
it): ``tree.txt`` (LightGBM's text format, never a pickle) and ``meta.json``
(class map, feature spec with the PCA matrix, stopping settings, and the
sha256 of the weights it was fitted against; a drafter fitted to other
weights is refused).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .artifact import META_FILE, DrafterError, DrafterMeta, read
from .copylen import CopyLengths
from .corpus import CorpusBigram
from .costs import NoisyTimingWarning, measure_verify_ms
from .features import FeatureSpec, features_for, state_features
from .ngram import NgramDrafter, NgramIndex, ngram_candidate
from .predictor import Predictor
from .types import Draft, ModelFeatures, extend_costs

COPY, MODEL = "__COPY__", "__MODEL__"

log = logging.getLogger("treespec.draft")


def worth_drafting(j: int, cum, p, v: Sequence[float], predict_ms: float, k: int, lookahead: bool):
    """Whether drafting the token at depth j pays for itself (vectorised over
    arrays ``cum``/``p``).

    ``cum`` is the probability that every draft up to and including j is
    accepted, ``p`` the probability of draft j itself. An accepted draft saves
    a forward (``v[0]`` ms); drafting j lengthens the verify by ``v[j+1] -
    v[j]`` and costs one more tree evaluation. ``lookahead`` also counts the
    drafts that could follow up to depth k-1, assuming each is as likely as
    this one: where the cost curve has a step and is flat after it, a run of
    confident drafts can pay for the step that one draft cannot.
    """
    # Plain arithmetic, so the same code serves floats (serving, one draft
    # at a time) and arrays (draft-fit's simulation, every chain at once).
    gain, best, term = 0.0, None, cum
    for m in range(j, (k if lookahead else j + 1)):
        gain = gain + term * v[0]
        net = gain - (v[m + 1] - v[j]) - (m - j + 1) * predict_ms
        best = net if best is None else np.maximum(best, net)
        term = term * p
    return best >= 0


def choose(probs: np.ndarray, cand: Sequence[int | None],
           spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The drafter's decision for rows of class probabilities (R, K+2).

    Returns (token (R,) with -1 where __MODEL__ wins or there is nothing to
    propose, probability (R,) of the chosen token, probability (R,) that the
    n-gram candidate is the model's token: 0 where there is none). __COPY__'s
    probability is added to the candidate's token class when the candidate is
    a class token.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, spec.K + 2)
    R, K = probs.shape[0], spec.K
    c = np.asarray([-1 if x is None else x for x in cand], dtype=np.int64)
    has = c >= 0
    c_cls = np.where(has, spec.class_of(np.where(has, c, 0)), K)
    p_tok = probs[:, :K].copy()
    rows = np.arange(R)
    in_set = has & (c_cls < K)
    p_tok[rows[in_set], c_cls[in_set]] += probs[in_set, K]
    best = p_tok.argmax(axis=1) if K else np.zeros(R, dtype=np.int64)
    p_best = p_tok[rows, best] if K else np.zeros(R)
    tok = np.asarray(spec.classes, dtype=np.int64)[best] if K else np.full(R, -1, dtype=np.int64)
    # A candidate outside the class set competes as its own option.
    out_copy = has & ~in_set & (probs[:, K] > p_best)
    tok = np.where(out_copy, c, tok)
    p_best = np.where(out_copy, probs[:, K], p_best)
    stop = probs[:, K + 1] >= p_best
    # The candidate's own chance: its class's merged probability when it is a
    # class token (the index is clipped only so that other rows stay in range),
    # else __COPY__'s alone.
    p_cand = np.where(in_set, p_tok[rows, np.minimum(c_cls, max(K - 1, 0))] if K else 0.0, probs[:, K])
    return np.where(stop, -1, tok), np.where(stop, probs[:, K + 1], p_best), np.where(has, p_cand, 0.0)


class TreeDrafter:
    """Drafter protocol implementation; build it with ``TreeDrafter.load(bundle)``."""

    name = "tree"

    def __init__(self, model, booster, spec: FeatureSpec, *, k_max: int, p_min: float,
                 verify_ms: Sequence[float], predict_ms: float, lookahead: bool = False,
                 proposal_ms: float | None = None, copy_through: bool = False, trust_match: int = 0,
                 copy_k: int = 0, copy_lengths: CopyLengths | None = None, corpus: CorpusBigram | None = None,
                 meta: DrafterMeta | None = None):
        self.model = model
        self.booster = booster
        self.spec = spec
        self.k_max = int(k_max)
        self.p_min = float(p_min)
        self.verify_ms = [float(v) for v in verify_ms]
        self.predict_ms = float(predict_ms)
        self.meta = meta  # None: built by hand, not loaded
        self.predict = Predictor(booster, len(spec.names()), spec.K + 2)
        self.lookahead = bool(lookahead)
        self.copy_through = bool(copy_through)
        # The trusted-match shortcut: where the n-gram match at depth 0 is at
        # least trust_match tokens long, copy up to copy_k tokens without
        # asking the tree (0: always ask).
        self.trust_match, self.copy_k = int(trust_match), int(copy_k) or self.k_max
        # With a fitted copy-length table the shortcut copies as far as the
        # match's evidence says pays (draft.copylen), not a fixed copy_k.
        self.copy_lengths = copy_lengths
        # What a proposal costs inside the decode loop (draft-fit measures it
        # there, after a verify forward); None: not measured.
        self.proposal_ms = None if proposal_ms is None else float(proposal_ms)
        # What the gate (draft.gate) drafts with while the tree is not worth
        # its cost: the tree's own __COPY__ path, prompt lookup, which costs
        # next to nothing to propose but lengthens the verify like any draft
        # (the gate picks its length from ``verify_ms`` and how often its
        # drafts were accepted).
        # With a corpus bigram (draft.corpus) it guesses one token where the
        # context has nothing to copy, and so does the tree where it hands
        # back before drafting anything (see propose).
        self.fallback = NgramDrafter(k_max=self.k_max, max_n=spec.ngram_max_n, corpus=corpus)
        self.calibration: dict | None = None  # set by calibrate(): the fitted costs and this machine's
        self._fit_copy_lengths()

    @property
    def corpus(self) -> CorpusBigram | None:
        """The corpus bigram the drafter and its fallback guess from (None: no guesses)."""
        return self.fallback.corpus

    @corpus.setter
    def corpus(self, table: CorpusBigram | None) -> None:
        self.fallback.corpus = table

    def _fit_copy_lengths(self) -> None:
        # The lengths depend on the verify curve, so they follow calibrate().
        if self.copy_lengths is not None:
            self.copy_lengths.fit_lengths(self.verify_ms, self.copy_k)

    @property
    def forward_ms(self) -> float:
        """A verify forward over one position: what an accepted draft saves."""
        return self.verify_ms[0]

    def step_cost_ms(self, drafted: int) -> float:
        """What a proposal that drafted ``drafted`` tokens cost: the drafter's
        time and the longer verify (for the gate, draft.gate)."""
        v = extend_costs(self.verify_ms, drafted + 1)
        own = self.proposal_ms
        if own is None:  # the fit's isolated timings: an underestimate in the loop
            state_ms = self.meta.settings.state_ms if self.meta is not None else None
            own = (state_ms or 0.0) + self.predict_ms * max(drafted, 1)
        return own + v[drafted] - v[0]

    @classmethod
    def load(cls, bundle, k_max: int | None = None, p_min: float | None = None) -> "TreeDrafter":
        """The drafter fitted into ``bundle.draft_dir``; ``k_max``/``p_min``
        override the fitted settings."""
        import lightgbm as lgb

        d = Path(bundle.draft_dir)
        meta = read(d / META_FILE, bundle)
        spec, s = meta.features, meta.settings
        model_path = d / meta.model_file
        try:
            booster = lgb.Booster(model_file=str(model_path))
        except lgb.basic.LightGBMError as e:
            raise DrafterError(f"{model_path}: unreadable LightGBM model ({e})") from None
        if booster.num_feature() != len(spec.names()):
            raise DrafterError(f"{model_path}: expects {booster.num_feature()} features, the spec in "
                               f"meta.json defines {len(spec.names())}")
        corpus = None
        if s.corpus_bigram is not None:
            try:
                corpus = CorpusBigram.load(d / s.corpus_bigram.file, s.corpus_bigram.sha256)
            except ValueError as e:
                raise DrafterError(f"{d / META_FILE}: bad corpus bigram ({e})") from None
        return cls(bundle.model, booster, spec,
                   k_max=s.k_max if k_max is None else k_max,
                   p_min=s.p_min if p_min is None else p_min,
                   verify_ms=s.verify_ms, predict_ms=s.predict_ms, lookahead=s.lookahead,
                   proposal_ms=s.proposal_ms, copy_through=s.copy_through, trust_match=s.trust_match,
                   copy_k=s.copy_k, copy_lengths=s.copy_lengths, corpus=corpus, meta=meta)

    def calibrate(self, reps: int = 10) -> dict:
        """Time the costs on this machine, at the current torch thread count,
        in place of the ones fitted elsewhere; returns both.

        The verify curve is a property of the machine: one fitted on a CPU
        where nine positions cost 2.3x one makes a drafter on a CPU where
        they cost 1.75x stop too early, and on a GPU the curve is flat.
        The verify forward is timed again as ``draft-fit`` times it; the
        drafter's own costs are timed in isolation (model features, one tree
        row) and the fitted in-loop proposal cost is scaled by how much
        faster or slower those are here. About 130 forwards for a curve of 9.
        For a drafter from ``load``: the fitted costs are its ``meta``'s."""
        s = self.meta.settings
        before = {"verify_ms": list(self.verify_ms), "predict_ms": self.predict_ms,
                  "state_ms": s.state_ms, "proposal_ms": self.proposal_ms}
        ctx_len = self.meta.context_len
        # As far as the fitted curve reaches (a request may draft past k_max).
        # A curve timed while the machine is busy (pip or a training run beside
        # it made verify 75-105 ms against 14-24 ms) would price every draft
        # wrongly for the server's whole life: time it again once, and if the
        # machine is still busy keep the fitted costs and say so.
        verify, noisy = None, None
        for _ in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NoisyTimingWarning)
                verify = measure_verify_ms(self.model, max(self.k_max, len(self.verify_ms) - 1), ctx_len,
                                           reps=reps, advice="timed again once, then the fitted costs are kept")
            noisy = next((str(w.message) for w in caught if issubclass(w.category, NoisyTimingWarning)), None)
            if noisy is None:
                break
        if noisy is not None:
            self.calibration = {"fitted": before, "here": None, "threads": torch.get_num_threads(),
                                "kept_fitted_because": noisy}
            log.warning("tree drafter: this machine was busy while its costs were timed (twice), so it keeps the "
                        "costs fitted by draft-fit %s ms; restart on a quiet machine to time them here",
                        [round(v, 2) for v in before["verify_ms"]])
            return self.calibration
        state_ms, predict_ms = self._own_costs(ctx_len)
        fitted_own = (s.state_ms or 0.0) + s.predict_ms
        scale = (state_ms + predict_ms) / fitted_own if fitted_own > 0 else 1.0
        self.verify_ms, self.predict_ms = verify, predict_ms
        self._fit_copy_lengths()
        if self.proposal_ms is not None:
            self.proposal_ms *= scale
        self.meta = replace(self.meta, settings=replace(s, state_ms=state_ms))  # what step_cost_ms adds from now on
        self.calibration = {"fitted": before, "here": {"verify_ms": verify, "predict_ms": round(predict_ms, 4),
                                                       "state_ms": round(state_ms, 4),
                                                       "proposal_ms": self.proposal_ms},
                            "threads": torch.get_num_threads()}
        log.info("tree drafter costs timed here on %d threads: verify %s ms for T=1..%d (fitted: %s)",
                 torch.get_num_threads(), [round(v, 2) for v in verify], len(verify),
                 [round(v, 2) for v in before["verify_ms"]])
        return self.calibration

    def _own_costs(self, ctx_len: int, reps: int = 50) -> tuple[float, float]:
        """(ms of model features per proposal, ms per tree row), in process
        CPU time like draft-fit's: isolated, on a real model state."""
        spec, n_vocab = self.spec, self.spec.n_vocab
        ctx_len = max(1, min(ctx_len, self.model.config.block_size - 1))
        ctx = torch.randint(0, n_vocab, (1, ctx_len), generator=torch.Generator().manual_seed(0))
        cache = self.model.new_cache(batch_size=1, max_len=ctx_len)
        out = self.model.forward_step(ctx, 0, cache, last_only=True)
        feats = ModelFeatures(logits=out.logits[0, -1, :n_vocab], hidden=out.hidden[0, -1],
                              exit_hidden=[h[0, -1] for h in out.exit_hidden])
        context = ctx[0].tolist()
        x = features_for(spec, self.state(feats), [context], [0],
                         ngrams=[ngram_candidate(context, spec.ngram_max_n)])[0]
        self.predict(x)

        def ms(fn) -> float:
            t0 = time.process_time()
            for _ in range(reps):
                fn()
            return (time.process_time() - t0) / reps * 1e3

        return ms(lambda: self.state(feats)), ms(lambda: self.predict(x))

    def state(self, features: ModelFeatures) -> np.ndarray:
        """The model part of the features, (1, n_state): once per proposal."""
        return state_features(self.spec, self.model, features.logits.reshape(1, -1),
                              features.hidden.reshape(1, -1), [h.reshape(1, -1) for h in features.exit_hidden])

    def open(self) -> "TreeState":
        return TreeState(self, NgramIndex(self.spec.ngram_max_n))

    def describe(self) -> dict:
        spec = self.spec
        return {"k_max": self.k_max,
                # Its classes: K tokens + __COPY__ + __MODEL__.
                "token_classes": len(spec.classes), "classes": len(spec.classes) + 2,
                "feature_version": spec.version, "p_min": self.p_min, "verify_ms": self.verify_ms,
                "calibration": self.calibration,
                # The trusted-match shortcut, and the copy length it drafts per
                # bucket of match evidence (draft/copylen.py) under this machine's curve.
                "trust_match": self.trust_match,
                "copy_lengths": self.copy_lengths.lengths if self.copy_lengths is not None else None,
                # How many token ids the corpus bigram guesses a follower for (draft/corpus.py).
                "corpus_bigram": len(self.corpus) if self.corpus is not None else None}

    def draft(self, index: NgramIndex, context: list[int], features: ModelFeatures | None, k: int) -> Draft:
        """Up to ``k`` tokens for ``context`` (this step's cap: the request's or
        the drafter's k_max, and no more than the request can still use), with
        ``index`` the request's n-gram index (``TreeState``)."""
        if features is None or k <= 0:
            return Draft(tokens=[])
        spec = self.spec
        # What the fallback (prompt lookup) would draft here: the gate weighs
        # the tree against it, and the trusted match copies it.
        # (As many tokens as the copy-length table's evidence compared when it was counted.)
        look = max(k, self.fallback.k_max, self.copy_lengths.depths if self.copy_lengths is not None else 0)
        index.sync(context)
        alt, match, agree = index.copy_evidence(look, spec.ngram_max_n)
        # The fallback's draft where the context has nothing to copy, or only
        # a one-token match: the corpus guess (draft.corpus).
        guess = self.fallback.guess(context) if match <= 1 else []
        fallback = guess if guess and guess != alt[:1] else alt  # where they agree, the copy says more
        if self.trust_match and alt and min(match, spec.ngram_max_n) >= self.trust_match:
            # A long match: copying is what the tree would say here, so skip
            # its cost (draft-fit keeps this only where it simulated faster),
            # as far as the match's evidence says pays, or copy_k.
            n = self.copy_k if self.copy_lengths is None else self.copy_lengths.length(match, agree)
            if n > 0:
                return Draft(tokens=alt[:min(n, k)], fallback=fallback)
        state = self.state(features)
        v = extend_costs(self.verify_ms, k + 1)
        ctx = list(context)
        drafted: list[int] = []
        cum = 1.0
        while True:
            # One batch of rows per round instead of one tree call per depth:
            # the row for depth j assumes the drafts before it are the n-gram
            # candidates (what __COPY__ drafts), so up to the first depth where
            # the tree picks anything else every row is exactly the row the
            # one-at-a-time walk would build. Past that depth the rows are
            # stale, and the next round starts from the token it picked.
            j0 = len(drafted)
            path, ngs, tails = self._copy_path(index, ctx, k - j0)
            X = features_for(spec, np.repeat(state, len(ngs), axis=0), tails,
                             list(range(j0, j0 + len(ngs))), ngrams=ngs)
            for i, (tok, p, p_cand) in enumerate(self._decisions(X, ngs)):
                t, cum = self.decide(j0 + i, cum, tok, p, ngs[i][0], p_cand, v, k)
                if t is None:
                    if not drafted and guess and self._worth_guessing(context, v):
                        # Hand back, but fill the verify slot with the corpus guess.
                        return Draft(tokens=guess, handback=True, fallback=fallback, guess=True)
                    return Draft(tokens=drafted, handback=True, fallback=fallback)
                drafted.append(t)
                ctx.append(t)
                if len(drafted) == k:
                    return Draft(tokens=drafted, handback=False, fallback=fallback)
                if i >= len(path) or t != path[i]:
                    break  # off the copy path: rows past this depth are stale, a new round from here

    def _worth_guessing(self, context: list[int], v: Sequence[float]) -> bool:
        """Whether the corpus guess pays for its verify position, at the
        corpus's own share for it: where the model hands back with nothing
        to copy, one more position costs ``v[1] - v[0]``, nearly nothing on
        a CPU whose verify curve is flat there, and a right guess saves a
        forward."""
        if self.corpus is None or not context:
            return False
        share = float(self.corpus.share[context[-1]]) if 0 <= context[-1] < len(self.corpus.share) else 0.0
        return share * v[0] >= v[1] - v[0]

    def decide(self, j: int, cum: float, tok: int, p: float, cand: int | None, p_cand: float,
               v: Sequence[float], k: int) -> tuple[int | None, float]:
        """The token to draft at depth j and the chance that it and every
        draft before it are accepted (``cum`` is that chance before it); None
        to hand back. ``tok``/``p``/``p_cand`` are ``choose``'s for the row."""
        if tok >= 0 and p >= self.p_min and worth_drafting(j, cum * p, p, v, self.predict_ms, k,
                                                           self.lookahead):
            return tok, cum * p
        # __MODEL__ (or a token below p_min) ends the draft, unless the
        # copy-through rule is on and the n-gram candidate, at the chance the
        # tree gives it, still pays for its verify position.
        if self.copy_through and cand is not None and worth_drafting(j, cum * p_cand, p_cand, v, self.predict_ms,
                                                                     k, self.lookahead):
            return cand, cum * p_cand
        return None, cum

    def _decisions(self, X: np.ndarray, ngs):
        """(token or -1, probability, candidate's probability) for the rows X, lazily: the first row is
        predicted alone, because where the model is unsure most proposals
        hand back right there and should pay for one tree evaluation, not
        for the whole path's."""
        for lo, hi in ((0, 1), (1, len(X))):
            if lo < hi:
                tok, p, p_cand = choose(np.stack([self.predict(x) for x in X[lo:hi]]),
                                        [c for c, _ in ngs[lo:hi]], self.spec)
                yield from zip(tok.tolist(), p.tolist(), p_cand.tolist())

    def _copy_path(self, index: NgramIndex, ctx: list[int], n: int):
        """The n-gram candidates along the copy path from ``ctx``: (path
        tokens, (candidate, match length) for depths 0..m, each depth's last
        n_last tokens) where the path stops after n depths or where there
        is no candidate to copy (that depth still gets its row)."""
        L = self.spec.n_last
        index.sync(ctx)
        ngs = index.copy_path(n, self.spec.ngram_max_n)
        path = [c for c, _ in ngs[:-1]]
        tails = [(ctx[-L:] + path[:i])[-L:] for i in range(len(ngs))]
        return path, ngs, tails


class TreeState:
    """One request's tree drafting: its n-gram index, which follows the
    context and the copy paths the rounds look ahead along."""

    def __init__(self, drafter: TreeDrafter, index: NgramIndex):
        self.drafter, self.index = drafter, index

    def propose(self, context: list[int], features: ModelFeatures | None, k: int) -> Draft:
        return self.drafter.draft(self.index, context, features, k)

    def observe(self, drafted: list[int], emitted: list[int]) -> None:
        pass  # the tree learns nothing per request; the gate wrapping it does
