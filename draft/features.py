"""The tree drafter's features: one definition, used when fitting and when serving.

Feature version 2. A row describes "the model has verified up to position t,
its logits there chose the newest token, and the drafter has already drafted
``depth`` tokens after that token"; the row's label is the token after all of
them. In column order:

=====================  ========================================================
``pca_0..pca_{D-1}``   the final hidden state at t (after the final LayerNorm)
                       projected on its top D principal components (fitted at
                       fit time with an SVD; mean and matrix live in meta.json)
``top1_logprob``       log-probability of the final exit's most likely token at t
``entropy``            entropy (nats) of the final exit's distribution at t
``margin``             top-1 minus top-2 log-probability at t
``exit{e}_agree``      per intermediate exit e: 1 if that exit, scored only on
                       the final exit's top-A tokens, ranks the final top-1 first
``exit{e}_margin``     that exit's logit for the final top-1 minus its best
                       logit among the other top-A tokens
``last_1..last_L``     class index of the context's newest L tokens (last_1 is
                       the newest: the bonus token at depth 0, else the newest
                       drafted token); K = not a class token, K+1 = no token
``ngram_cand``         class index of the n-gram (prompt-lookup) candidate for
                       the context; K = not a class token, K+1 = no candidate
``ngram_len``          length n of that candidate's matching suffix (0 = none)
``depth``              tokens already drafted in this proposal (0 = none)
=====================  ========================================================

The model part (everything before ``last_1``) depends only on the verified
position t, so a proposal computes it once (``state_features``) and every
depth reuses it; the context part follows the drafted tokens. ``last_*`` and
``ngram_cand`` are categorical for LightGBM.

Fitting calls exactly these functions on batches of rows, serving calls them
on one row, so a fitted tree sees at serve time the numbers it was trained on.
Change anything here and bump ``FEATURE_VERSION``: drafters fitted with
another version are refused at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..model.kernels import exit_scores, logit_stats
from .ngram import ngram_candidate

FEATURE_VERSION = 2  # 2: top-A and the softmax computed in NumPy


@dataclass
class FeatureSpec:
    """Everything that turns a model state and a context into a feature row."""

    classes: list[int]  # token ids of the K token classes, most frequent first
    pca_mean: np.ndarray  # (C,)
    pca_components: np.ndarray  # (D, C)
    n_exits: int  # intermediate exits (the final exit excluded)
    n_vocab: int  # real tokens; logits columns beyond are padding
    vocab_size: int  # the model's embedding rows (>= n_vocab)
    n_last: int = 3
    agree_top: int = 4
    ngram_max_n: int = 3
    version: int = FEATURE_VERSION
    _class_of: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pca_mean = np.asarray(self.pca_mean, dtype=np.float64)
        self.pca_components = np.asarray(self.pca_components, dtype=np.float64)
        if self.pca_components.ndim != 2 or self.pca_components.shape[1] != self.pca_mean.shape[0]:
            raise ValueError(f"PCA matrix {self.pca_components.shape} does not match its mean "
                             f"{self.pca_mean.shape}")
        if self.agree_top < 2:
            raise ValueError("agree_top must be at least 2 (the top-1 and something to beat)")
        K = len(self.classes)
        # token id -> class index; K ("other") for every token outside the set
        self._class_of = np.full(max(self.vocab_size, self.n_vocab) + 1, K, dtype=np.int64)
        self._class_of[np.asarray(self.classes, dtype=np.int64)] = np.arange(K)

    @property
    def K(self) -> int:
        return len(self.classes)

    @property
    def pca_dims(self) -> int:
        return self.pca_components.shape[0]

    @property
    def n_state(self) -> int:
        return self.pca_dims + 3 + 2 * self.n_exits

    def names(self) -> list[str]:
        names = [f"pca_{i}" for i in range(self.pca_dims)] + ["top1_logprob", "entropy", "margin"]
        for e in range(self.n_exits):
            names += [f"exit{e}_agree", f"exit{e}_margin"]
        names += [f"last_{i}" for i in range(1, self.n_last + 1)]
        return names + ["ngram_cand", "ngram_len", "depth"]

    def categorical(self) -> list[int]:
        """Column indices of the categorical features (for LightGBM)."""
        s = self.n_state
        return list(range(s, s + self.n_last + 1))

    def class_of(self, tokens) -> np.ndarray:
        """Class index of each token id (K for tokens outside the class set)."""
        t = np.asarray(tokens, dtype=np.int64)
        return self._class_of[np.clip(t, 0, len(self._class_of) - 1)]

    def to_meta(self) -> dict:
        return {"version": self.version, "classes": [int(t) for t in self.classes],
                "n_exits": self.n_exits, "n_vocab": self.n_vocab, "vocab_size": self.vocab_size,
                "n_last": self.n_last, "agree_top": self.agree_top, "ngram_max_n": self.ngram_max_n,
                "pca_mean": self.pca_mean.tolist(), "pca_components": self.pca_components.tolist(),
                "names": self.names(), "categorical": self.categorical()}

    @classmethod
    def from_meta(cls, m: dict) -> "FeatureSpec":
        return cls(classes=list(m["classes"]), pca_mean=np.asarray(m["pca_mean"]),
                   pca_components=np.asarray(m["pca_components"]), n_exits=int(m["n_exits"]),
                   n_vocab=int(m["n_vocab"]), vocab_size=int(m["vocab_size"]), n_last=int(m["n_last"]),
                   agree_top=int(m["agree_top"]), ngram_max_n=int(m["ngram_max_n"]), version=int(m["version"]))


def fit_pca(hidden: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C,) and the top ``dims`` principal directions (dims, C) of ``hidden`` (N, C)."""
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] < 2:
        raise ValueError(f"PCA needs a (N >= 2, C) sample of hidden states, got shape {h.shape}")
    dims = min(dims, h.shape[0], h.shape[1])
    mean = h.mean(axis=0)
    # Rows of vt are the principal directions, by decreasing singular value.
    _, _, vt = np.linalg.svd(h - mean, full_matrices=False)
    return mean, vt[:dims].copy()


def top_indices(x: np.ndarray, a: int, groups: int = 1024) -> np.ndarray:
    """Column indices of each row's ``a`` largest values, largest first: (N, a).

    Exact, and several times faster than a partial sort over the whole row
    for a small ``a``: the columns are dealt into ``groups`` groups (column
    c into group c mod groups), and every one of the top ``a`` values lies in
    one of the ``a`` groups with the largest maxima, so only those groups'
    columns are sorted. Equal values come out in a deterministic order (the
    same row gives the same answer, alone or in a batch), not necessarily
    by column.
    """
    N, V = x.shape
    G = min(groups, V)
    rows = V // G
    gmax = x[:, :rows * G].reshape(N, rows, G).max(axis=1)  # (N, G), vectorised across groups
    tail = V - rows * G
    if tail:
        gmax[:, :tail] = np.maximum(gmax[:, :tail], x[:, rows * G:])
    k = min(a, G)
    chosen = np.argpartition(-gmax, k - 1, axis=1)[:, :k]  # (N, k)
    cols = (chosen[:, :, None] + G * np.arange(rows + 1)).reshape(N, -1)
    valid = cols < V
    cols = np.where(valid, cols, 0)
    vals = np.where(valid, np.take_along_axis(x, cols, axis=1), -np.inf)
    order = np.lexsort((cols, -vals), axis=1)[:, :a]  # by value, then by column
    return np.take_along_axis(cols, order, axis=1)


# Tokens within this many nats of the top-1 are the top-A candidates (when
# there are at least A of them; otherwise the whole row is searched).
_TOP_WINDOW = 4.0
_TOP_MAX_CANDIDATES = 2048


def _vocab_stats(l: np.ndarray, a: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """One row of logits (V,) float32: (its ``a`` largest columns, largest
    first, ties by column; their values; log sum(e^(l - max)); the entropy).

    One row at a time and in few NumPy calls on purpose: in the decode loop
    this runs right after a verify forward has streamed the weights through
    the caches, where every call costs several times its warm time
    (bench/drafter_cost.py). One pass of exp serves the log-normaliser and
    the entropy: with z = l - max and s = sum(e^z), log Z = max + log s and
    H = log s - sum(e^z * z) / s. The top-A set is exact: if at least A
    tokens lie within ``_TOP_WINDOW`` nats of the maximum, the A largest are
    among them.
    """
    z = l - l.max()
    cand = np.flatnonzero(z >= -_TOP_WINDOW)
    if a <= cand.size <= _TOP_MAX_CANDIDATES:
        vals = z[cand]
        top = cand[np.lexsort((cand, -vals))[:a]]
    else:  # a flat row (an untrained model): the grouped search over all of it
        top = top_indices(l[None], a)[0]
    ez = np.exp(z)
    s = float(ez.sum(dtype=np.float64))
    log_s = float(np.log(s))
    return top, l[top].astype(np.float64), log_s, log_s - float(ez.dot(z)) / s


@torch.no_grad()
def state_features(spec: FeatureSpec, model, logits: torch.Tensor, hidden: torch.Tensor,
                   exit_hidden: Sequence[torch.Tensor]) -> np.ndarray:
    """The model part of the features for N verified positions: (N, spec.n_state).

    ``logits`` (N, >= n_vocab) final-exit logits, ``hidden`` (N, C) final
    hidden states, ``exit_hidden`` one (N, C) residual stream per intermediate
    exit: what ``GPT.forward_step`` returns for those positions.

    The full-vocabulary work runs in NumPy, on one thread, on purpose: as
    torch ops over 50k logits it fans out to torch's thread pool, and while
    a 2-thread training job shared this 2-core CPU it took 40 ms against
    0.06-0.10 ms in NumPy (bench/drafter_cost.py).
    """
    l = logits[:, :spec.n_vocab].detach().float().cpu().numpy()
    N = l.shape[0]
    # (N, A) top columns and values, (N,) log-normalisers and entropies: compiled
    # where csrc/skinny.c is built (the same quantities, to float rounding), else NumPy
    stats = logit_stats(l, spec.agree_top)
    if stats is None:
        stats = map(np.array, zip(*(_vocab_stats(row, spec.agree_top) for row in l)))
    top, top_val, log_s, entropy = stats
    lp1 = -log_s  # the top-1 logit is the max, so its z is 0
    margin = top_val[:, 0] - top_val[:, 1]
    cols = [lp1, entropy, margin]
    if len(exit_hidden) != spec.n_exits:
        raise ValueError(f"expected {spec.n_exits} intermediate exits, got {len(exit_hidden)}")
    top_t = torch.from_numpy(top.reshape(-1)).to(logits.device)
    for e, h in enumerate(exit_hidden):
        sub = _exit_scores(model, e, h.reshape(N, -1), top_t)  # (N, A)
        best_other = sub[:, 1:].max(axis=1)
        cols += [(sub[:, 0] >= best_other).astype(np.float64), sub[:, 0] - best_other]
    conf = np.stack(cols, axis=1)
    h = hidden.reshape(N, -1).double().cpu().numpy()
    pca = (h - spec.pca_mean) @ spec.pca_components.T
    return np.concatenate([pca, conf], axis=1)


def _exit_scores(model, e: int, h: torch.Tensor, top: torch.Tensor) -> np.ndarray:
    """Exit ``e``'s logits for each row's own top-A tokens, (N, A) float64:
    ``GPT.exit_logits`` restricted to N*A head rows, compiled on the CPU
    (model.kernels.exit_scores), else in NumPy. As torch ops on a few rows,
    dispatch overhead was most of their cost in the decode loop; only the
    N*A head rows and the N residual rows leave the device."""
    N = h.shape[0]
    ln, head = model.exit_ln[e], model.exit_heads[e].weight
    with torch.no_grad():
        fast = exit_scores(h.contiguous(), ln.weight, ln.bias, ln.eps, head, top.reshape(N, -1).numpy()) \
            if top.device.type == "cpu" else None
    if fast is not None:
        return fast
    x = h.detach().float().cpu().numpy().astype(np.float64)
    d = x - x.mean(axis=1, keepdims=True)
    z = d / np.sqrt((d * d).mean(axis=1, keepdims=True) + ln.eps) * ln.weight.detach().cpu().numpy()
    if ln.bias is not None:
        z = z + ln.bias.detach().cpu().numpy()
    w = head.detach()[top].float().cpu().numpy().reshape(N, -1, x.shape[1])
    return np.einsum("nac,nc->na", w, z)


def features_for(spec: FeatureSpec, states: np.ndarray, contexts: Sequence[Sequence[int]],
                 depths: Sequence[int], ngrams: Sequence[tuple[int | None, int]] | None = None) -> np.ndarray:
    """Full feature rows (R, len(spec.names())): row r joins ``states[r]``
    (from ``state_features``) with the context part of ``contexts[r]`` (the
    verified context plus the ``depths[r]`` tokens drafted so far).

    ``ngrams[r]`` may carry ``ngram_candidate(contexts[r], spec.ngram_max_n)``
    when the caller already has it (the drafter needs it anyway; fitting
    reuses one lookup for every depth that shares a context).
    """
    R = len(contexts)
    states = np.asarray(states, dtype=np.float64).reshape(R, spec.n_state)
    K, L = spec.K, spec.n_last
    last = np.full((R, L), -1, dtype=np.int64)
    cand = np.full(R, -1, dtype=np.int64)
    mlen = np.zeros(R, dtype=np.float64)
    for r, ctx in enumerate(contexts):
        tail = ctx[-L:]
        last[r, :len(tail)] = tail[::-1]  # newest first
        c, n = ngrams[r] if ngrams is not None else ngram_candidate(ctx, spec.ngram_max_n)
        if c is not None:
            cand[r], mlen[r] = c, n
    last_cls = np.where(last >= 0, spec.class_of(last), K + 1)
    cand_cls = np.where(cand >= 0, spec.class_of(cand), K + 1)
    ctx_part = np.column_stack([last_cls, cand_cls, mlen, np.asarray(depths, dtype=np.float64)])
    return np.concatenate([states, ctx_part.astype(np.float64)], axis=1)
