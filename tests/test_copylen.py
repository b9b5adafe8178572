"""The copy-length table: counting, smoothing, the length it picks and its file form."""

import numpy as np
import pytest

from treespec.draft.copylen import AGREE_CAP, N_BUCKETS, CopyLengths, bucket


def test_buckets_cover_every_evidence_once():
    seen = {bucket(m, a) for m in range(0, 40) for a in range(-1, 12)}
    assert seen == set(range(N_BUCKETS))
    assert bucket(3, 0) != bucket(2, 0) and bucket(40, AGREE_CAP) == bucket(33, AGREE_CAP + 5) == N_BUCKETS - 1
    assert bucket(3, -1) != bucket(3, 0)


def test_counts_stop_at_the_first_wrong_token_and_at_the_known_ones():
    t = CopyLengths.count([(3, 0)] * 3, runs=[2, 5, 0], drafted=[8, 3, 8], depths=8)
    b = bucket(3, 0)
    # run 2 of 8: right at depths 0, 1, wrong at 2; run 5 of 3 known: right at 0..2; run 0: wrong at 0.
    assert t.seen[b].tolist() == [3, 2, 2, 0, 0, 0, 0, 0]
    assert t.accepted[b].tolist() == [2, 2, 1, 0, 0, 0, 0, 0]
    assert t.seen.sum() == t.seen[b].sum()


def test_lengths_follow_the_evidence_and_the_verify_curve():
    good, bad = (32, AGREE_CAP), (3, 0)
    t = CopyLengths.count([good] * 200 + [bad] * 200, runs=[8] * 200 + [0] * 200, drafted=[8] * 400, depths=8)
    p = t.acceptance()
    assert p[bucket(*good)].min() > 0.9 and p[bucket(*bad), 0] < 0.1
    cheap = [10.0 + 2 * k for k in range(9)]  # a position costs a fifth of a forward
    t.fit_lengths(cheap, 8)
    assert t.length(*good) == 8 and t.length(*bad) == 0
    t.fit_lengths([10.0] * 9, 8)  # free positions: any chance pays
    assert t.length(*bad) == 8
    # An unseen bucket leans on the depth's overall rate (half right here).
    assert 0.4 < p[bucket(8, 2), 0] < 0.6
    # A steep curve (each position as dear as a forward) makes no copy pay ...
    t.fit_lengths([10.0 * (1 + k) for k in range(9)], 8)
    assert t.length(*good) == 0
    # ... and k_max caps the length.
    t.fit_lengths(cheap, 3)
    assert t.length(*good) == 3


def test_meta_round_trip_and_refusals():
    t = CopyLengths.count([(4, 1), (20, -1)], runs=[1, 3], drafted=[4, 4], depths=4)
    back = CopyLengths.from_meta(t.to_meta())
    np.testing.assert_array_equal(back.seen, t.seen)
    np.testing.assert_array_equal(back.accepted, t.accepted)
    m = t.to_meta()
    with pytest.raises(ValueError, match="buckets"):
        CopyLengths.from_meta({**m, "agree_cap": 3})
    with pytest.raises(ValueError, match="accepted <= seen"):
        CopyLengths.from_meta({**m, "accepted": (np.asarray(m["seen"]) + 1).tolist()})
