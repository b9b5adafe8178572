"""The corpus bigram: counting, its file form, and the guesses it makes."""

import os

import numpy as np
import pytest

from treespec.draft.corpus import FILE, CorpusBigram
from treespec.draft.ngram import NgramDrafter
from treespec.model.tokenizer import sha256_file


def test_counts_the_most_frequent_follower_and_its_share():
    #        5 -> 6 (twice), 5 -> 7 (once); 6 -> 5 (twice); 7 -> 5 (once: below min_count 2)
    tokens = np.array([5, 6, 5, 7, 5, 6, 5], dtype=np.uint16)
    t = CorpusBigram.count(tokens, vocab_size=10)
    assert t.candidate(5) == 6 and t.share[5] == pytest.approx(2 / 3)
    assert t.candidate(6) == 5 and t.share[6] == pytest.approx(1.0)
    assert t.candidate(7) is None and t.share[7] == 0  # seen once: no guess
    assert t.candidate(0) is None and t.candidate(-1) is None and t.candidate(10) is None
    assert len(t) == 2
    assert CorpusBigram.count(tokens, vocab_size=10, min_count=1).candidate(7) == 5


def test_ties_go_to_the_smaller_token_whatever_the_order():
    a = CorpusBigram.count(np.array([1, 9, 1, 4]), vocab_size=10)
    b = CorpusBigram.count(np.array([1, 4, 1, 9]), vocab_size=10)
    assert a.candidate(1) == b.candidate(1) == 4 and a.share[1] == 0.5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        CorpusBigram.count(np.array([1, 12]), vocab_size=10)
    with pytest.raises(ValueError, match="one entry per token"):
        CorpusBigram(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="shares"):
        CorpusBigram(np.array([1, -1]), np.array([1.5, 0.0]))
    empty = CorpusBigram.count(np.array([3]), vocab_size=10)
    assert len(empty) == 0 and empty.candidate(3) is None


def test_saves_and_loads_and_refuses_a_changed_file(tmp_path):
    t = CorpusBigram.count(np.random.default_rng(0).integers(0, 50, size=2000), vocab_size=64)
    path = t.save(tmp_path)
    assert path.name == FILE
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not safetensors' 0600
    back = CorpusBigram.load(path, sha256_file(path))
    assert np.array_equal(back.follower, t.follower) and np.array_equal(back.share, t.share)
    with pytest.raises(ValueError, match="checksum"):
        CorpusBigram.load(path, "0" * 64)
    with pytest.raises(ValueError, match="missing"):
        CorpusBigram.load(tmp_path / "nope.safetensors")
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a corpus bigram"):
        CorpusBigram.load(path)


def test_prompt_lookup_guesses_from_the_corpus_where_little_repeats():
    table = CorpusBigram.count(np.array([3, 8, 3, 8, 12, 13, 12, 13]), vocab_size=20)
    plain, filled = NgramDrafter(), NgramDrafter(corpus=table)
    ctx = [10, 11, 12, 10, 11]
    # A match: both copy it, the corpus is not asked.
    assert filled.open().propose(ctx, None, 3).tokens == plain.open().propose(ctx, None, 3).tokens == [12, 10, 11]
    # Nothing repeats: the baseline drafts nothing, the filled one guesses one token.
    assert plain.open().propose([1, 2, 3], None, 4).tokens == []
    assert filled.open().propose([1, 2, 3], None, 4).tokens == [8] and filled.open().propose([1, 2, 3], None, 4).guess
    assert not filled.open().propose(ctx, None, 3).guess
    assert filled.open().propose([1, 2, 3], None, 0).tokens == []  # k = 0 drafts nothing
    assert filled.open().propose([1, 2, 5], None, 4).tokens == []  # no follower of 5 in the corpus
    # A match of one token only: the corpus follower replaces the copy ...
    assert plain.open().propose([3, 9, 1, 3], None, 2).tokens == [9, 1]
    assert filled.open().propose([3, 9, 1, 3], None, 2).tokens == [8]
    # ... unless the corpus has none, or agrees with the copy, which then goes on.
    assert filled.open().propose([5, 9, 1, 5], None, 2).tokens == [9, 1]
    agree = filled.open().propose([3, 8, 1, 3], None, 2)
    assert agree.tokens == [8, 1] and not agree.guess
