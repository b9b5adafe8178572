"""How long a prompt-lookup copy should be: a small fitted table.

A copy from the context is right for a while and then goes wrong, and each
drafted token lengthens the verify forward. Prompt lookup drafts a fixed
length. On a loopy model that length is wrong both ways: greedy prose
repeats in short lines that a copy of 8 overshoots, and greedy code in
whole blocks that a copy of 4 cuts short.

Two facts about the match, both cheap to look up (``NgramIndex.copy_evidence``),
say how far a copy is likely to hold:

* ``match``: how many tokens the context's end really shares with the
  occurrence it copies from (the lookup matches at most 3; the history can
  go on for dozens of tokens in a loop);
* ``agree``: on how many of the drafted tokens the occurrence before that
  one continued the same way (-1: there was none). Two earlier occurrences
  that went on alike are a loop the model is likely to repeat again.

``CopyLengths`` counts, per bucket of (match, agree) and per draft depth,
how often the model's greedy token was the copied one given that the copy
was right so far, on the greedy continuations ``draft-fit`` collects. At
serving time a bucket's acceptance and the verify-cost curve give the copy
length that is fastest per generated token, the same criterion the
DraftGate uses for its fallback. The estimate is smoothed towards the
depth's overall rate, so a rare bucket falls back on what is typical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .types import fastest_length

MATCH_EDGES = (3, 4, 8, 16, 32)  # match buckets: < 3, 3, 4-7, 8-15, 16-31, 32+
AGREE_CAP = 8  # agree buckets: none (-1), 0, 1, ..., 8+
PRIOR = 4.0  # pseudo-counts of the depth's overall rate in every bucket


def bucket(match: int, agree: int) -> int:
    """The table row for a copy's evidence."""
    m = sum(match >= e for e in MATCH_EDGES)
    return m * (AGREE_CAP + 2) + (0 if agree < 0 else 1 + min(agree, AGREE_CAP))


N_BUCKETS = (len(MATCH_EDGES) + 1) * (AGREE_CAP + 2)


@dataclass
class CopyLengths:
    """Per-bucket acceptance of a copy, by depth, and the length it pays to draft."""

    seen: np.ndarray  # (N_BUCKETS, depths): copies that were right up to this depth
    accepted: np.ndarray  # (N_BUCKETS, depths): ... and right at it
    _lengths: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def count(cls, evidence: Sequence[tuple[int, int]], runs: Sequence[int], drafted: Sequence[int],
              depths: int) -> "CopyLengths":
        """Fit from copies: per copy its (match, agree), how many of its
        tokens were right (``runs``) and how many it had that can be judged
        (``drafted``: its length, cut where the known tokens end)."""
        seen = np.zeros((N_BUCKETS, depths))
        acc = np.zeros((N_BUCKETS, depths))
        for (m, a), run, n in zip(evidence, runs, drafted):
            b = bucket(m, a)
            for d in range(min(n, run + 1, depths)):
                seen[b, d] += 1
                acc[b, d] += d < run
        return cls(seen, acc)

    @property
    def depths(self) -> int:
        return self.seen.shape[1]

    def acceptance(self) -> np.ndarray:
        """(N_BUCKETS, depths): P(the copy's token at depth d is right | right before it)."""
        overall = (self.accepted.sum(axis=0) + 1.0) / (self.seen.sum(axis=0) + 2.0)
        return (self.accepted + PRIOR * overall) / (self.seen + PRIOR)

    def fit_lengths(self, verify_ms: Sequence[float], k_max: int) -> list[int]:
        """The copy length (0 to k_max) for every bucket under a verify-cost
        curve: the one with the most generated tokens per verify ms (a step
        that drafts k costs verify_ms[k] and yields the accepted tokens plus
        the model's own). Kept for ``length``; call again after the curve changes."""
        k_max = min(k_max, self.depths)
        self._lengths = [fastest_length(row[:k_max], verify_ms)[0] for row in self.acceptance()]
        return self.lengths

    @property
    def lengths(self) -> list[int]:
        """The copy length per bucket from the last ``fit_lengths``."""
        return list(self._lengths)

    def length(self, match: int, agree: int) -> int:
        return self._lengths[bucket(match, agree)]

    def to_meta(self) -> dict:
        return {"match_edges": list(MATCH_EDGES), "agree_cap": AGREE_CAP,
                "seen": self.seen.astype(int).tolist(), "accepted": self.accepted.astype(int).tolist()}

    @classmethod
    def from_meta(cls, m: dict) -> "CopyLengths":
        if list(m.get("match_edges", [])) != list(MATCH_EDGES) or m.get("agree_cap") != AGREE_CAP:
            raise ValueError(f"copy-length table has buckets {m.get('match_edges')}/{m.get('agree_cap')}, "
                             f"this treespec uses {list(MATCH_EDGES)}/{AGREE_CAP}")
        seen, acc = np.asarray(m["seen"], dtype=np.float64), np.asarray(m["accepted"], dtype=np.float64)
        if seen.shape != acc.shape or seen.ndim != 2 or seen.shape[0] != N_BUCKETS or (acc > seen).any():
            raise ValueError(f"copy-length table of shape {seen.shape}/{acc.shape} is not "
                             f"({N_BUCKETS}, depths) with accepted <= seen")
        return cls(seen, acc)
