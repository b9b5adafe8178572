"""Prompt-lookup drafting: copy what followed the last time the context
ended the way it ends now.

The last n tokens (n = max_n down to 1) are looked up among earlier
positions of the context; the most recent earlier occurrence wins, and the
tokens that followed it are the draft. The copy may run into the tokens it
is producing (as LZ77 does), so a context that repeats with a short period
yields a full-length draft of the repetition.

The lookup runs at every verify step (and, for the tree drafter's
``__COPY__`` class and features, at every draft depth), so it keeps an index
instead of rescanning: for each n, the n-gram -> the last position it ended
at. Each request's drafting state (``NgramDrafter.open``) owns one index,
which follows the context incrementally: when the context is not an
extension of what was indexed (rejected drafts, the tree's look-ahead along
a copy), it is rolled back to the common prefix with an undo log and
extended again, so the cost per call is proportional to the tokens that
changed, not to the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .corpus import CorpusBigram
from .types import Draft, ModelFeatures

DEFAULT_MAX_N = 3
MAX_MATCH = 32  # copy_evidence counts a shared history up to this many tokens


class NgramIndex:
    """Last occurrence of every n-gram (n <= max_n) of a token sequence,
    over the positions that have a following token."""

    def __init__(self, max_n: int = DEFAULT_MAX_N):
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.max_n = max_n
        self.tokens: list[int] = []
        # last[n][gram] = end position of the most recent indexed occurrence
        self._last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]
        # (n, gram, previous end position or -1) per indexed n-gram, in order,
        # so rollback can restore the entries that later positions overwrote
        self._undo: list[tuple[int, tuple[int, ...], int]] = []
        self._undo_at: list[int] = []  # len(_undo) before position i was indexed

    # Position i is indexed once token i+1 exists: an n-gram at the very end
    # has nothing after it to propose, and must not match itself.
    @property
    def _indexed(self) -> int:
        return max(len(self.tokens) - 1, 0)

    def sync(self, context: Sequence[int]) -> None:
        """Make the index describe ``context`` (which must not change while used)."""
        if not isinstance(context, list):
            context = list(context)
        toks = self.tokens
        n = len(toks)
        if len(context) >= n and context[:n] == toks:
            common = n
        else:
            common = _common_prefix(toks, context)
            self._truncate(common)
        if len(context) > common:
            self._extend(context[common:])

    def _truncate(self, length: int) -> None:
        keep = max(length - 1, 0)  # positions that stay indexed
        if keep < self._indexed:
            mark = self._undo_at[keep]
            for n, gram, prev in reversed(self._undo[mark:]):
                if prev < 0:
                    del self._last[n][gram]
                else:
                    self._last[n][gram] = prev
            del self._undo[mark:]
            del self._undo_at[keep:]
        del self.tokens[length:]

    def _extend(self, new: Sequence[int]) -> None:
        toks, last, undo, max_n = self.tokens, self._last, self._undo, self.max_n
        for t in new:
            toks.append(int(t))
            i = len(toks) - 2  # the position that now has a follower
            if i < 0:
                continue
            self._undo_at.append(len(undo))
            for n in range(1, min(max_n, i + 1) + 1):
                gram = tuple(toks[i - n + 1:i + 1])
                d = last[n]
                undo.append((n, gram, d.get(gram, -1)))
                d[gram] = i

    def match(self, max_n: int | None = None) -> tuple[int, int]:
        """(end position of the most recent earlier occurrence of the longest
        matching suffix, its length n), or (-1, 0) when even the last token
        never occurred before."""
        toks = self.tokens
        L = len(toks)
        top = min(self.max_n if max_n is None else max_n, self.max_n, L - 1)
        for n in range(top, 0, -1):
            j = self._last[n].get(tuple(toks[L - n:]))
            if j is not None:
                return j, n
        return -1, 0

    def candidate(self, max_n: int | None = None) -> tuple[int | None, int]:
        j, n = self.match(max_n)
        return (self.tokens[j + 1], n) if n else (None, 0)

    def continuation(self, k: int, max_n: int | None = None) -> list[int]:
        j, n = self.match(max_n)
        return self._copy_from(j, k) if n else []

    def _copy_from(self, j: int, k: int) -> list[int]:
        """The k tokens a copy of what followed position j drafts."""
        toks, L, out = self.tokens, len(self.tokens), []
        for i in range(j + 1, j + 1 + k):
            # j + 1 <= L - 1, so i is either in the context or a token just copied
            out.append(toks[i] if i < L else out[i - L])
        return out

    def copy_evidence(self, k: int, max_n: int | None = None, max_match: int = MAX_MATCH
                      ) -> tuple[list[int], int, int]:
        """(the continuation, as ``continuation(k)``; how many tokens the
        context's end and the copied occurrence's end really share, counting
        past n up to ``max_match``; on how many of its k tokens the copy from
        the occurrence before that one agrees, or -1 when there is none).

        Two cheap facts about how far a copy will hold (``draft.copylen``):
        a longer shared history, and an earlier occurrence that went on the
        same way, both make it likelier that the model repeats it."""
        j, n = self.match(max_n)
        if not n:
            return [], 0, -1
        toks, L = self.tokens, len(self.tokens)
        m = n
        while m < max_match and m <= j and toks[j - m] == toks[L - 1 - m]:
            m += 1
        cont = self._copy_from(j, k)
        # The undo log holds, for position j, the n-gram's previous end
        # position for n = 1, 2, ... in order: the occurrence before j.
        j2 = self._undo[self._undo_at[j] + n - 1][2]
        if j2 < 0:
            return cont, m, -1
        other = self._copy_from(j2, k)
        agree = 0
        while agree < len(cont) and cont[agree] == other[agree]:
            agree += 1
        return cont, m, agree


    def copy_path(self, k: int, max_n: int | None = None) -> list[tuple[int | None, int]]:
        """(candidate, match length) at each of up to k depths of a copy
        that looks the candidate up again after every copied token (what the
        tree drafter's __COPY__ does, depth by depth); it stops after the
        first depth without a candidate. The index is left describing the
        context plus the copied tokens."""
        out = []
        for i in range(k):
            c = self.candidate(max_n)
            out.append(c)
            if c[0] is None or i == k - 1:
                break
            self._extend([c[0]])
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, with list comparisons done in C:
    back off exponentially from the end (drafts diverge near the end), then
    bisect."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo, step = hi, 1
    while True:  # find lo with a[:lo] == b[:lo]; hi stays a known mismatch
        lo = max(hi - step, 0)
        if a[:lo] == b[:lo]:
            break
        hi, step = lo, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _index(context: Sequence[int], max_n: int) -> NgramIndex:
    """A throwaway index of ``context``, for one-off lookups. A caller that
    follows one growing sequence (a request's drafting state, the fit's
    walk over a document) keeps its own NgramIndex, so each call costs only
    the tokens that changed."""
    index = NgramIndex(max_n)
    index.sync(context)
    return index


def ngram_candidate(context: Sequence[int], max_n: int = DEFAULT_MAX_N) -> tuple[int | None, int]:
    """The token that followed the most recent earlier occurrence of the
    context's longest matching suffix (n = max_n down to 1), and n; (None, 0)
    when there is none."""
    return _index(context, max_n).candidate(max_n)


def ngram_copy_path(context: Sequence[int], k: int, max_n: int = DEFAULT_MAX_N) -> list[tuple[int | None, int]]:
    """``NgramIndex.copy_path`` from ``context``."""
    return _index(context, max_n).copy_path(k, max_n)


def ngram_continuation(context: Sequence[int], k: int, max_n: int = DEFAULT_MAX_N) -> list[int]:
    """Up to k tokens copied from after that occurrence ([] when none)."""
    return _index(context, max_n).continuation(k, max_n)


def ngram_copy_evidence(context: Sequence[int], k: int, max_n: int = DEFAULT_MAX_N) -> tuple[list[int], int, int]:
    """``NgramIndex.copy_evidence`` for ``context``."""
    return _index(context, max_n).copy_evidence(k, max_n)


@dataclass
class NgramDrafter:
    """Prompt-lookup decoding as a Drafter: propose the copied continuation.

    With a ``corpus`` table (the tree drafter's fallback has one; the
    ``ngram`` baseline does not), a context with nothing to copy, or only a
    one-token match to copy from, gets a one-token guess instead: the
    newest token's most frequent follower in the training corpus
    (``draft.corpus``). One earlier occurrence of the newest token is a
    worse guide to what follows it than the whole corpus is
    (``bench/corpus_probe.py``). Where the two agree, the copy is kept: it
    starts with the same token and goes on."""

    k_max: int = 4
    max_n: int = DEFAULT_MAX_N
    name: str = "ngram"
    corpus: CorpusBigram | None = None

    def open(self) -> "NgramState":
        return NgramState(self, NgramIndex(self.max_n))

    def describe(self) -> dict:
        # How many token ids the corpus bigram guesses a follower for (draft/corpus.py).
        return {"k_max": self.k_max, "max_n": self.max_n,
                "corpus_bigram": len(self.corpus) if self.corpus is not None else None}

    def guess(self, context: Sequence[int]) -> list[int]:
        """The corpus follower of the newest token, as a draft ([] without a
        table or where it has none)."""
        c = self.corpus.candidate(context[-1]) if self.corpus is not None and context else None
        return [] if c is None else [c]


class NgramState:
    """One request's prompt lookup: its own index, following its context."""

    def __init__(self, drafter: NgramDrafter, index: NgramIndex):
        self.drafter, self.index = drafter, index

    def propose(self, context: list[int], features: ModelFeatures | None, k: int) -> Draft:
        d, index = self.drafter, self.index
        index.sync(context)  # one sync for the copy and its match length
        tokens = index.continuation(k, d.max_n)
        if d.corpus is not None and k > 0 and (not tokens or index.candidate(d.max_n)[1] <= 1):
            guess = d.guess(context)
            if guess and guess != tokens[:1]:  # where they agree, the copy says more
                return Draft(tokens=guess, guess=True)
        return Draft(tokens=tokens)

    def observe(self, drafted: list[int], emitted: list[int]) -> None:
        pass  # the next context says everything: the index follows it
