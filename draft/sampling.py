"""From logits to the distribution the decode loop samples from, and the
speculative acceptance rule that keeps sampling exact.

The model's head has ``config.vocab_size`` (50304) columns, padded for fast
matmuls; only the first ``tokenizer.n_vocab`` (50257) are real tokens. Every
function here expects logits already sliced to the real vocabulary, so a
padding column can never be sampled or win an argmax.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model.kernels import SKINNY
from .types import MIN_REPETITION_PENALTY, SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request RNG: a fixed seed reproduces a request, None draws a fresh one."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def validate_params(params: SamplingParams) -> None:
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {params.top_k}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.max_new_tokens < (0 if params.prompt_logprobs else 1):
        raise ValueError(f"max_new_tokens must be >= 1 (0 only to score the prompt), got {params.max_new_tokens}")
    if params.k_max is not None and params.k_max < 0:
        raise ValueError(f"k_max must be >= 0, got {params.k_max}")
    if not params.repetition_penalty >= MIN_REPETITION_PENALTY:
        raise ValueError(f"repetition_penalty must be >= {MIN_REPETITION_PENALTY} (1 turns it off), "
                         f"got {params.repetition_penalty}")
    for t, b in params.logit_bias.items():
        if not -100.0 <= b <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for token {t}")
    if params.top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {params.top_n}")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(params, name) <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2] (0 turns it off), got {getattr(params, name)}")


def top_logprobs(logp: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """Per row of log-probabilities ``logp`` (R, V), its ``n`` most likely
    (token id, log-probability) pairs; tokens a top-k/top-p cut removed
    (log-probability -inf) are left out."""
    if n <= 0:
        return [[] for _ in range(logp.size(0))]
    vals, ids = torch.topk(logp, min(n, logp.size(-1)), dim=-1)
    return [[(i, v) for i, v in zip(ri, rv) if v != float("-inf")] for ri, rv in zip(ids.tolist(), vals.tolist())]


class Penalties:
    """Penalties on tokens that are already there, applied to the logits
    before greedy's argmax or sampling's temperature:

    - ``repetition_penalty`` r (CTRL, Keskar et al. 2019; TGI's and
      Hugging Face's): the logit of every token in the prompt or the
      generated text is divided by r where positive, multiplied by r where
      negative;
    - ``frequency_penalty`` f and ``presence_penalty`` a (OpenAI's): the
      logit of a token generated c times so far drops by f * c + a * (c > 0).
      The prompt does not count, as in vLLM;
    - ``logit_bias`` (OpenAI's): a fixed amount added to chosen tokens'
      logits, first, whatever came before.

    A verify step's row j predicts the token after draft j-1, so it is
    penalised for the context plus ``drafts[:j]``: exactly what vanilla
    decoding would have seen there. That keeps speculation lossless with
    penalties on. ``push`` adds each released token to the counts.
    """

    def __init__(self, prompt: list[int], n_vocab: int, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params, self.device = params, torch.device(device)
        # Sparse: a context touches hundreds of the vocabulary's 50k ids, and
        # penalising whole (rows, V) masks cost 0.25 ms a row and about 7 ms
        # for a nine-row verify step on the Zen 3 EPYC, more than the forward
        # (bench/penalty_cost.py, bench/results/penalty-cost-amd-avx2.json).
        self.seen: set[int] = {int(t) for t in prompt}
        self.count: dict[int, int] = {}  # generated tokens only: the prompt does not count
        self._seen_ids: torch.Tensor | None = None  # self.seen as a tensor; None after a push changed it
        self._counted: tuple[torch.Tensor, torch.Tensor, dict[int, int]] | None = None  # self.count's (ids, counts, column)
        self.bias = None
        if params.logit_bias:
            self.bias = (torch.tensor(list(params.logit_bias), dtype=torch.long, device=self.device),
                         torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=self.device))

    def push(self, token: int) -> None:
        token = int(token)
        if token not in self.seen:
            self.seen.add(token)
            self._seen_ids = None
        self.count[token] = self.count.get(token, 0) + 1
        self._counted = None

    def _seen(self) -> torch.Tensor:
        if self._seen_ids is None:
            self._seen_ids = torch.tensor(sorted(self.seen), dtype=torch.long, device=self.device)
        return self._seen_ids

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        if self._counted is None:
            ids = sorted(self.count)
            self._counted = (torch.tensor(ids, dtype=torch.long, device=self.device),
                             torch.tensor([self.count[t] for t in ids], dtype=torch.float32, device=self.device),
                             {t: i for i, t in enumerate(ids)})
        return self._counted

    def apply(self, logits: torch.Tensor, drafts: list[int]) -> torch.Tensor:
        """Penalised copies of ``logits`` rows (len(drafts) + 1, V); only the
        columns of tokens already there (or drafted) are computed."""
        T = logits.size(0)
        drafts = [int(d) for d in drafts[:T - 1]]  # draft j-1 is context for rows j and after
        z = logits.to(torch.float32, copy=True)
        if self.bias is not None:
            z[:, self.bias[0]] += self.bias[1]
        r = self.params.repetition_penalty
        if r != 1.0:
            first: dict[int, int] = {}  # a drafted token not seen yet -> the first row that sees it
            for j, d in enumerate(drafts, start=1):
                if d not in self.seen:
                    first.setdefault(d, j)
            ids = self._seen()
            if len(ids):
                cols = z[:, ids]
                z[:, ids] = torch.where(cols > 0, cols / r, cols * r)
            for d, j in first.items():
                col = z[j:, d]
                z[j:, d] = torch.where(col > 0, col / r, col * r)
        f, a = self.params.frequency_penalty, self.params.presence_penalty
        if f or a:
            # Each touched column's count in each row: the generated tokens' plus
            # the drafts before that row, subtracted once, as a dense count would be.
            base, counts, col = self._counts()
            new = sorted(set(drafts) - self.count.keys())
            ids = torch.cat([base, torch.tensor(new, dtype=torch.long, device=self.device)])
            count = torch.cat([counts, torch.zeros(len(new), device=self.device)]).expand(T, -1).clone()
            at = {t: i for i, t in enumerate(new, start=len(base))}  # the new columns, after the counted ones
            for j, d in enumerate(drafts, start=1):
                count[j:, col[d] if d in col else at[d]] += 1
            if len(ids):
                z[:, ids] = z[:, ids] - f * count - a * (count > 0).float()
        return z


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution p for each row of ``logits`` (..., V): temperature,
    then top-k, then top-p (nucleus). Only for temperature > 0; greedy
    decoding takes the argmax of the raw logits instead."""
    if params.greedy:
        raise ValueError("probs_from_logits is for sampling; greedy decoding uses the argmax")
    z = logits.float() / params.temperature
    V = z.size(-1)
    if 0 < params.top_k < V:
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if params.top_p < 1.0:
        p = _nucleus(p, params.top_p)
    return p


def _nucleus(p: torch.Tensor, top_p: float, first: int = 256) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p:
    a token is dropped when the mass strictly before it already does.

    Sorting 50k probabilities per row costs about a millisecond, so the
    nucleus is looked for among the ``first`` most likely tokens and the full
    sort runs only for rows whose nucleus is larger than that.
    """
    V = p.size(-1)
    k = min(first, V)
    sp, si = torch.topk(p, k, dim=-1)  # sorted, descending
    if k < V and bool((sp.sum(dim=-1) < top_p).any()):
        sp, si = torch.sort(p, dim=-1, descending=True)
    before = torch.cumsum(sp, dim=-1) - sp
    # The most likely token (nothing before it) always stays, however small
    # top_p: 1e-45 is a float32 denormal, which the CPU flushes to 0.
    sp = sp.masked_fill((before >= top_p) & (before > 0), 0.0)
    out = torch.zeros_like(p).scatter_(-1, si, sp)
    return out / out.sum(dim=-1, keepdim=True)


def sample(p: torch.Tensor, generator: torch.Generator) -> int:
    """One token from the (not necessarily normalised) weights ``p`` (V,).

    Inverse-CDF sampling: one uniform draw and a binary search over the
    cumulative weights. torch.multinomial takes milliseconds over 50k
    entries on this CPU, longer than a whole forward of the model.
    """
    c = torch.cumsum(p, dim=0, dtype=torch.float64)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=p.device) * c[-1]
    # right=True: the first index whose cumulative weight exceeds u, so a
    # zero-weight token (c[i] == c[i-1]) can never be chosen.
    return min(int(torch.searchsorted(c, u, right=True)), p.numel() - 1)


_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for uint32 values held in int64, without overflowing int64."""
    return ((h * (c & 0xFFFF)) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser, as csrc/skinny.c's fmix32."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def race_uniforms(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The race's u_0..u_{n-1} for ``seed``: 24-bit float32 uniforms from a hash of
    (seed, i), floored at the smallest normal float32; csrc/skinny.c computes the same."""
    lo, hi = seed & _M32, (seed >> 32) & _M32
    i = torch.arange(n, dtype=torch.int64, device=device)
    h = _fmix32(_fmix32(_mul32(i, 0x9E3779B9) ^ lo) ^ hi)
    u = (h >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return u.clamp_(min=float(torch.finfo(torch.float32).tiny))


class PositionDraws:
    """A request's randomness, tied to output positions rather than to the
    order of the calls: generated token i is chosen with draws from a
    generator seeded with the i-th of a list of seeds taken from the
    request's generator up front. Whatever a drafter proposes, position i
    sees the same draws, which is what makes a seeded request produce the
    same tokens with every drafter, and with none (``accept_sampled``).

    ``token`` picks with an exponential race (the Gumbel-max trick): the
    token with the largest p_i / E_i, E_i ~ Exp(1) per token, is distributed
    as p. Unlike inverse-CDF sampling, which sums 50k probabilities and
    flipped between neighbouring tail tokens about once in 430 sampled
    prose tokens when a verify forward over several positions rounded the
    logits differently from a one-token forward (5e-6 in log-probability),
    the race only changes its winner when the two best scores are within
    that rounding of each other. E_i = -log(u_i) with u_i a hash of the
    position's seed and i (``race_uniforms``): the compiled race
    (csrc/skinny.c's ``race_argmax``) then needs no stored stream and takes
    the log of only the few tokens that could still win, about 0.05 ms a
    position where 50k torch draws and logs took 0.4 ms.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.seeds = torch.randint(0, 2 ** 62, (max(n, 1), 2), generator=generator).tolist()
        self._g = torch.Generator(device=generator.device)

    def token(self, p: torch.Tensor, i: int) -> int:
        """Output position i's token from the weights ``p`` (V,)."""
        seed = self.seeds[i][0]
        pf = p.float().contiguous()
        if pf.device.type == "cpu" and SKINNY.load():
            return int(SKINNY.lib.race_argmax(pf.data_ptr(), pf.numel(), seed))
        u = race_uniforms(pf.numel(), seed, pf.device)
        return int(torch.argmax(pf / u.log_().neg_()))

    def uniform(self, i: int) -> float:
        """Output position i's uniform in [0, 1), for a test on the side
        (accepting a draft the drafter sampled from its own q)."""
        self._g.manual_seed(self.seeds[i][1])
        return float(torch.rand((), generator=self._g, dtype=torch.float64))

    def at(self, i: int) -> "StepDraws":
        """The draws of a verify step whose first token is output position i."""
        return StepDraws(self, i)


class StepDraws:
    """``draws`` seen from output position ``at``: a verify step's position j is at + j."""

    def __init__(self, draws: PositionDraws, at: int):
        self.draws, self.at = draws, at

    def token(self, p: torch.Tensor, j: int) -> int:
        return self.draws.token(p, self.at + j)

    def uniform(self, j: int) -> float:
        return self.draws.uniform(self.at + j)


# --- acceptance -------------------------------------------------------------

# (p (k+1, V), drafts (k tokens), q (k rows of (V,)) or None, r: the draws of
# the step's k+1 output positions, r.token(p_row, j) and r.uniform(j))
#   -> (number of drafts accepted, the token that follows them)
AcceptRule = Callable[[torch.Tensor, list[int], "list[torch.Tensor] | None", "StepDraws"], tuple[int, int]]


def accept_greedy(argmax: list[int], drafts: list[int]) -> int:
    """How many drafts match the model's argmax; the bonus is argmax[n]."""
    n = 0
    for d, a in zip(drafts, argmax):
        if d != a:
            break
        n += 1
    return n


def accept_sampled(p: torch.Tensor, drafts: list[int], q: list[torch.Tensor] | None,
                   r: "StepDraws") -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), with
    the randomness tied to output positions.

    Row j of ``p`` is the model's processed distribution for the token after
    draft j-1 (row 0: after the last accepted token); ``r`` holds the draws
    of the step's output positions (``PositionDraws``).

    A draft d proposed deterministically (``q`` None) is accepted when the
    token that position's draws pick from p, ``r.token(p[j], j)``, is d;
    otherwise that token is emitted and drafting ends. The emitted token is
    then exactly vanilla sampling's token for that position, so d is
    accepted with probability p(d) and a rejection emits a token from p with
    d removed and renormalised: the textbook rule, coupled. With the same
    seed a speculative run reproduces the vanilla run token for token.

    A draft sampled from the drafter's own q is accepted with probability
    min(1, p(d)/q(d)), tested with ``r.uniform(j)``; on rejection the token
    comes from max(0, p - q). That emits exactly p too, but not vanilla's
    token. When every draft is accepted, the bonus token comes from the row
    after the last draft.
    """
    for j, d in enumerate(drafts):
        pj = p[j]
        if q is None:
            x = r.token(pj, j)
            if x == d:
                continue
            return j, x
        qj = q[j]
        qd = float(qj[d])
        if qd <= 0.0:
            raise ValueError(f"the drafter proposed token {d} at draft position {j} with q(d) = 0; "
                             "a sampled draft must come from its own q")
        if r.uniform(j) < float(pj[d]) / qd:
            continue
        residual = (pj - qj).clamp_min_(0.0)
        if float(residual.sum()) <= 0.0:  # only by rounding: p and q agree
            residual = pj
        return j, r.token(residual, j)
    return len(drafts), r.token(p[len(drafts)], len(drafts))
