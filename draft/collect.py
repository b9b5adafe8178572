"""What draft-fit learns from: contexts of the training split, the model's
greedy continuations of them, the labelled feature rows, and the held-out
steps grouped into chains over draft depth (``draft.fit``'s steps 1-3 and
the data of step 5)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .copylen import CopyLengths
from .features import FeatureSpec, features_for, state_features
from .ngram import ngram_candidate, ngram_copy_evidence


@dataclass
class Collected:
    """What the greedy runs produced, per context (sequence) s."""

    tokens: list[list[int]]  # window + greedy tokens g_0 .. g_{steps+k_max-1}
    prompt_len: list[int]  # window length L
    states: list[np.ndarray]  # (steps + k_max, n_state): the view that chose g_t
    steps: int
    k_max: int


def windows(spans: Sequence[tuple[int, int]], n_contexts: int, batch_size: int, min_ctx: int, max_ctx: int,
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


def pca_sample(model, data: np.ndarray, batches, max_rows: int = 20000) -> np.ndarray:
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
    """Feature rows and labels (``draft.fit``, step 3)."""
    K = spec.K
    lp_col = spec.pca_dims
    log_thr = np.log(threshold) if threshold > 0 else -np.inf
    parts = []
    for s in (range(len(col.tokens)) if seqs is None else seqs):
        toks, L, st = col.tokens[s], col.prompt_len[s], col.states[s]
        gen = toks[L:]
        # First generated end-of-text: contexts that contain it never occur
        # (the decode loop stops there), so g_0..g_{i+j} must all come before it.
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


def chain_layout(rows: Rows, idx: np.ndarray, k_max: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group rows[idx] into (seq, step) chains over depth: each chain's
    context and greedy step (n,), which depths it has rows for (n, k_max),
    and each cell's row index (-1: none)."""
    keys = rows.seq[idx] * 100000 + rows.step[idx]
    uniq, inv = np.unique(keys, return_inverse=True)
    shape = (len(uniq), k_max)
    valid = np.zeros(shape, dtype=bool)
    where = np.full(shape, -1, dtype=np.int64)
    valid[inv, rows.depth[idx]] = True
    where[inv, rows.depth[idx]] = idx
    return uniq // 100000, uniq % 100000, valid, where


def copy_outcome(col: Collected, seq: int, i: int, k: int, max_n: int) -> tuple[list[int], int, tuple[int, int]]:
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


def copy_table(col: Collected, seqs: Sequence[int], k: int, max_n: int, eot: int) -> CopyLengths:
    """The copy-length table counted on the greedy steps of contexts ``seqs``
    (each step's copy judged on the greedy tokens known after it, up to a
    generated end-of-text)."""
    evidence, runs, known = [], [], []
    for seq in seqs:
        gen = col.tokens[seq][col.prompt_len[seq]:]
        eot_at = next((t for t, g in enumerate(gen) if g == eot), len(gen))
        for i in range(min(col.steps, eot_at)):
            cont, run, ev = copy_outcome(col, seq, i, k, max_n)
            if cont:
                evidence.append(ev)
                runs.append(run)
                # g_{i+1} .. g_{eot_at} (end-of-text itself can be copied), or to the end
                known.append(min(len(cont), eot_at - i if eot_at < len(gen) else len(gen) - i - 1))
    return CopyLengths.count(evidence, runs, known, k)

