"""The corpus bigram: a one-token guess where the context has nothing to copy.

Prompt lookup can only propose what the context already holds. Where the
newest token has never occurred before in the context, or where free
sampling has taken the text somewhere new, it proposes nothing, and on a
CPU where verifying two positions costs what verifying one does, that
empty draft wastes a verify slot that a guess would fill for free.

The guess is the token that most often followed the newest token in the
training corpus, counted once by ``draft-fit``. It is a crude language
model, but the verify step takes any token it is right about: under
sampling, a drafted token d is accepted with probability p(d), and on the
shipped model's held-out prose the corpus follower has a higher p(d) than
prompt lookup's own candidate has where it has one (``bench/corpus_probe.py``).

Stored in ``BUNDLE/draft/bigram.safetensors`` (two arrays indexed by token
id: the follower, -1 where the token was seen fewer than ``min_count``
times, and its share of that token's followers), with its sha256 in the
drafter's meta.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..model.tokenizer import sha256_file

FILE = "bigram.safetensors"


class CorpusBigram:
    """For each token id, the token that most often followed it in a corpus."""

    def __init__(self, follower: np.ndarray, share: np.ndarray):
        follower = np.asarray(follower, dtype=np.int32).reshape(-1)
        share = np.asarray(share, dtype=np.float32).reshape(-1)
        if follower.shape != share.shape:
            raise ValueError(f"follower ({follower.shape[0]}) and share ({share.shape[0]}) must have one entry "
                             f"per token id")
        if follower.size and (follower.min() < -1 or not np.all((share >= 0) & (share <= 1))):
            raise ValueError("followers must be token ids or -1, and shares in [0, 1]")
        self.follower, self.share = follower, share
        # Plain Python lists: a lookup per verify step should not go through numpy.
        self._follower = follower.tolist()

    @classmethod
    def count(cls, tokens: np.ndarray, vocab_size: int, min_count: int = 2) -> "CorpusBigram":
        """Count the followers of every token in ``tokens`` (a 1-d token array:
        a corpus split, documents joined by end-of-text, which is a token like
        any other here). Ties go to the smaller token id, so the table does
        not depend on the order of the corpus."""
        t = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if t.size and (t.min() < 0 or t.max() >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        follower = np.full(vocab_size, -1, dtype=np.int32)
        share = np.zeros(vocab_size, dtype=np.float32)
        if t.size < 2:
            return cls(follower, share)
        pairs, n = np.unique(t[:-1] * vocab_size + t[1:], return_counts=True)
        first, second = pairs // vocab_size, pairs % vocab_size
        # Per first token: most counts first, then the smallest follower.
        order = np.lexsort((second, -n, first))
        first, second, n = first[order], second[order], n[order]
        starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
        totals = np.add.reduceat(n, starts)
        keep = totals >= min_count
        follower[first[starts][keep]] = second[starts][keep]
        share[first[starts][keep]] = (n[starts] / totals)[keep]
        return cls(follower, share)

    def __len__(self) -> int:
        return int((self.follower >= 0).sum())

    def candidate(self, last: int) -> int | None:
        """The follower of token ``last``, or None where the corpus has none."""
        if 0 <= last < len(self._follower):
            c = self._follower[last]
            return c if c >= 0 else None
        return None

    def save(self, directory) -> Path:
        from safetensors.numpy import save_file

        path = Path(directory) / FILE
        save_file({"follower": self.follower, "share": self.share}, str(path))
        # safetensors writes the file owner-only (0600); give it the mode
        # the rest of the bundle gets, so a server running as another user
        # (the docker image's) can read a drafter fitted outside it.
        umask = os.umask(0)
        os.umask(umask)
        path.chmod(0o666 & ~umask)
        return path

    @classmethod
    def load(cls, path, sha256: str | None = None) -> "CorpusBigram":
        """The table in ``path``; ValueError (with the path) where it is
        missing, changed since it was fitted (``sha256``) or malformed."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: missing corpus bigram file")
        if sha256 is not None and sha256_file(path) != sha256:
            raise ValueError(f"{path}: checksum does not match meta.json; the file was changed after fitting")
        try:
            arrays = load_file(str(path))
            return cls(arrays["follower"], arrays["share"])
        except (SafetensorError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not a corpus bigram table ({e})") from None
