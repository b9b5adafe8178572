"""Prompt lookup: the incremental index agrees with a plain rescan, whatever
sequence of growing, rolled-back and unrelated contexts it is fed."""

import random

import pytest

from treespec.draft.ngram import (MAX_MATCH, NgramDrafter, NgramIndex, ngram_candidate,
                                  ngram_continuation, ngram_copy_evidence, ngram_copy_path)
from treespec.draft.registry import DRAFTERS, DrafterUnavailable, make_drafter


def rescan(context, max_n=3):
    """The definition: the most recent earlier occurrence of the longest suffix."""
    L = len(context)
    for n in range(min(max_n, L - 1), 0, -1):
        suffix = context[L - n:]
        for j in range(L - 2, n - 2, -1):  # j: end position of the earlier occurrence
            if context[j - n + 1:j + 1] == suffix:
                return j, n
    return -1, 0


def rescan_continuation(context, k, max_n=3):
    j, n = rescan(context, max_n)
    if not n:
        return []
    ext = list(context)
    for i in range(j + 1, j + 1 + k):
        ext.append(ext[i])
    return ext[len(context):]


def copy_from(context, j, k):
    ext = list(context)
    for i in range(j + 1, j + 1 + k):
        ext.append(ext[i])
    return ext[len(context):]


def rescan_evidence(context, k, max_n=3):
    """The definition of copy_evidence: the copy, how far back the context's
    end and the copied occurrence's end agree (up to MAX_MATCH), and how many
    of the copy's tokens the n-gram's occurrence before that one also drafts."""
    j, n = rescan(context, max_n)
    if not n:
        return [], 0, -1
    L, m = len(context), 0
    while m < MAX_MATCH and m <= j and context[j - m] == context[L - 1 - m]:
        m += 1
    gram = context[L - n:]
    before = [i for i in range(j - 1, n - 2, -1) if context[i - n + 1:i + 1] == gram]
    cont = copy_from(context, j, k)
    if not before:
        return cont, m, -1
    other, agree = copy_from(context, before[0], k), 0
    while agree < k and cont[agree] == other[agree]:
        agree += 1
    return cont, m, agree


def rescan_copy_path(context, k, max_n=3):
    """Look the candidate up again after every copied token, k depths at most."""
    ext, out = list(context), []
    for _ in range(k):
        j, n = rescan(ext, max_n)
        out.append((ext[j + 1], n) if n else (None, 0))
        if not n:
            break
        ext.append(ext[j + 1])
    return out


def test_examples():
    assert ngram_candidate([1, 2, 3, 9, 1, 2, 3]) == (9, 3)
    assert ngram_candidate([5, 2, 3, 9, 1, 2, 3]) == (9, 2)
    assert ngram_candidate([7, 3, 8, 3]) == (8, 1)
    assert ngram_candidate([1, 2, 3]) == (None, 0)
    assert ngram_candidate([]) == (None, 0) and ngram_candidate([4]) == (None, 0)
    # the most recent occurrence wins
    assert ngram_candidate([1, 2, 5, 1, 2, 6, 0, 1, 2]) == (6, 2)
    assert ngram_continuation([1, 2, 3, 4, 5, 9, 1, 2, 3], k=4) == [4, 5, 9, 1]
    # a short period repeats through the tokens being copied
    assert ngram_continuation([8, 1, 2, 1, 2], k=5) == [1, 2, 1, 2, 1]
    assert ngram_continuation([7, 7], k=3) == [7, 7, 7]
    assert ngram_continuation([1, 2, 3], k=4) == []
    assert ngram_candidate([1, 2, 3, 9, 1, 2, 3], max_n=1) == (9, 1)


@pytest.mark.parametrize("max_n", [1, 2, 3, 4])
def test_index_matches_rescan_under_growth_and_rollback(max_n):
    rng = random.Random(max_n)
    idx = NgramIndex(max_n)
    context = []
    for step in range(400):
        r = rng.random()
        if r < 0.55:  # accepted tokens: grow
            context = context + [rng.randrange(5) for _ in range(rng.randint(1, 4))]
        elif r < 0.85:  # rejected drafts: back to a shorter prefix, then grow differently
            keep = rng.randint(0, len(context))
            context = context[:keep] + [rng.randrange(5) for _ in range(rng.randint(0, 3))]
        else:  # an unrelated request
            context = [rng.randrange(5) for _ in range(rng.randint(0, 30))]
        idx.sync(context)
        assert idx.tokens == context
        assert idx.match() == rescan(context, max_n), (step, context)
        k = rng.randint(1, 7)
        assert idx.continuation(k) == rescan_continuation(context, k, max_n)
        assert ngram_continuation(context, k, max_n) == rescan_continuation(context, k, max_n)
        assert ngram_copy_path(context, k, max_n) == rescan_copy_path(context, k, max_n)
        idx.sync(context)
        assert idx.copy_evidence(k) == rescan_evidence(context, k, max_n), (step, context)


def test_copy_evidence_reads_the_history_and_the_earlier_occurrence():
    # "1 2 3" occurs twice before the end: last followed by 4 5, before that by 4 6.
    ctx = [9, 1, 2, 3, 4, 6, 8, 8, 1, 2, 3, 4, 5, 7, 0, 1, 2, 3]
    assert ngram_copy_evidence(ctx, 3) == ([4, 5, 7], 3, 1)
    # A loop: the history is as long as the loop has run, capped at MAX_MATCH,
    # and the occurrences before agree all the way.
    loop = [5, 6, 7] * 20
    cont, match, agree = ngram_copy_evidence(loop, 4)
    assert cont == [5, 6, 7, 5] and match == MAX_MATCH and agree == 4
    assert ngram_copy_evidence([1, 2, 3, 1], 2) == ([2, 3], 1, -1)  # one earlier occurrence
    assert ngram_copy_evidence([1, 2, 3], 2) == ([], 0, -1)


def test_each_request_state_has_its_own_index():
    """Two requests stepped round-robin, sharing a system prompt, with drafts
    rejected now and then: each state proposes what a rescan of its own
    context gives, and never reads the other's index."""
    rng = random.Random(0)
    d = NgramDrafter(k_max=4)
    seqs = [[rng.randrange(6) for _ in range(80)] for _ in range(2)]
    seqs[1][:10] = seqs[0][:10]  # a shared system prompt
    states = [d.open(), d.open()]
    assert states[0].index is not states[1].index
    for length in range(12, 81, 3):
        for seq, state in zip(seqs, states):
            ctx = seq[:length]
            assert state.propose(ctx, None, 4).tokens == rescan_continuation(ctx, 4, d.max_n)
            state.propose(ctx + [5, 5, 5], None, 4)  # a look at a draft that will be rejected
            assert state.index.match() == rescan(ctx + [5, 5, 5])


def test_drafter_proposes_the_continuation_up_to_k():
    d = NgramDrafter()
    ctx = [10, 11, 12, 13, 14, 15, 10, 11, 12]
    state = d.open()
    assert state.propose(ctx, None, 2).tokens == [13, 14]
    assert state.propose(ctx, None, 10).tokens == [13, 14, 15, 10, 11, 12, 13, 14, 15, 10]
    assert state.propose([1, 2, 3], None, 4).tokens == []
    assert d.name == "ngram" and not state.propose(ctx, None, 2).handback
    assert d.describe() == {"k_max": 4, "max_n": d.max_n, "corpus_bigram": None}


def test_registry(tiny_bundle):
    from treespec.model import load_bundle

    bundle = load_bundle(tiny_bundle)
    assert DRAFTERS == ("none", "ngram", "tree")
    assert make_drafter("none", bundle) is None
    assert isinstance(make_drafter("ngram", bundle), NgramDrafter)
    with pytest.raises(DrafterUnavailable, match="draft-fit"):
        make_drafter("tree", bundle)
    with pytest.raises(DrafterUnavailable, match="unknown drafter 'medusa'"):
        make_drafter("medusa", bundle)
    assert issubclass(DrafterUnavailable, ValueError)
