"""From logits to the distribution the engine samples from, and the
speculative acceptance rule that keeps sampling exact.

The model's head has ``config.vocab_size`` (50304) columns, padded for fast
matmuls; only the first ``tokenizer.n_vocab`` (50257) are real tokens. Every
function here expects logits already sliced to the real vocabulary, so a
padding column can never be sampled or win an argmax.
"""

from __future__ import annotations

from typing import Callable

import torch

from .types import SamplingParams


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
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.k_max is not None and params.k_max < 0:
        raise ValueError(f"k_max must be >= 0, got {params.k_max}")


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
    sp = sp.masked_fill(before >= top_p, 0.0)
    out = torch.zeros_like(p).scatter_(-1, si, sp)
    return out / out.sum(dim=-1, keepdim=True)


def sample(p: torch.Tensor, generator: torch.Generator) -> int:
    """One token from the (not necessarily normalised) weights ``p`` (V,)."""
    return sample_at(p, float(torch.rand((), generator=generator, dtype=torch.float64)))


def sample_at(p: torch.Tensor, u: float) -> int:
    """The token the uniform draw ``u`` in [0, 1) picks from the weights ``p``
    (V,): inverse-CDF sampling, a binary search over the cumulative weights.
    torch.multinomial takes milliseconds over 50k entries on this CPU,
    longer than a whole forward of the model."""
    c = torch.cumsum(p, dim=0, dtype=torch.float64)
    x = torch.tensor(u * float(c[-1]), dtype=torch.float64, device=p.device)
    # right=True: the first index whose cumulative weight exceeds u, so a
    # zero-weight token (c[i] == c[i-1]) can never be chosen.
    return min(int(torch.searchsorted(c, x, right=True)), p.numel() - 1)


def uniforms(max_new_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """A request's random numbers, drawn up front: row i (float64 in [0, 1))
    belongs to generated token i, column 0 picks that token (``sample_at``),
    column 1 is the acceptance test for a draft the drafter sampled from its
    own q. Tying each draw to a position of the output instead of to the
    order of the calls is what makes a seeded request produce the same
    tokens with every drafter, and with none (``accept_sampled``)."""
    return torch.rand((max(max_new_tokens, 1), 2), generator=generator, dtype=torch.float64)


# --- acceptance -------------------------------------------------------------

# (p (k+1, V), drafts (k tokens), q (k rows of (V,)) or None, u (k+1, 2): the
# uniforms of the k+1 output positions this step can produce)
#   -> (number of drafts accepted, the token that follows them)
AcceptRule = Callable[[torch.Tensor, list[int], "list[torch.Tensor] | None", torch.Tensor], tuple[int, int]]


def accept_greedy(argmax: list[int], drafts: list[int]) -> int:
    """How many drafts match the model's argmax; the bonus is argmax[n]."""
    n = 0
    for d, a in zip(drafts, argmax):
        if d != a:
            break
        n += 1
    return n


def accept_sampled(p: torch.Tensor, drafts: list[int], q: list[torch.Tensor] | None,
                   u: torch.Tensor) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), with
    the randomness tied to output positions.

    Row j of ``p`` is the model's processed distribution for the token after
    draft j-1 (row 0: after the last accepted token); ``u[j]`` are that
    output position's uniforms (``uniforms``).

    A draft d proposed deterministically (``q`` None) is accepted when the
    token that position's draw picks from p, ``sample_at(p[j], u[j, 0])``,
    is d; otherwise that token is emitted and drafting ends. The emitted
    token is then exactly vanilla sampling's token for that position, so d
    is accepted with probability p(d) and a rejection emits a token from p
    with d removed and renormalised: the textbook rule, coupled. With the
    same seed a speculative run reproduces the vanilla run token for token
    (up to the last bits of the logits, which a verify over several positions
    may round differently from a one-token forward).

    A draft sampled from the drafter's own q is accepted with probability
    min(1, p(d)/q(d)), tested with ``u[j, 1]``; on rejection the token comes
    from max(0, p - q), picked with ``u[j, 0]``. That emits exactly p too, but
    not vanilla's token. When every draft is accepted, the bonus token comes
    from the row after the last draft.
    """
    for j, d in enumerate(drafts):
        pj = p[j]
        if q is None:
            x = sample_at(pj, float(u[j, 0]))
            if x == d:
                continue
            return j, x
        qj = q[j]
        qd = float(qj[d])
        if qd <= 0.0:
            raise ValueError(f"the drafter proposed token {d} at draft position {j} with q(d) = 0; "
                             "a sampled draft must come from its own q")
        if float(u[j, 1]) < float(pj[d]) / qd:
            continue
        residual = (pj - qj).clamp_min_(0.0)
        if float(residual.sum()) <= 0.0:  # only by rounding: p and q agree
            residual = pj
        return j, sample_at(residual, float(u[j, 0]))
    return len(drafts), sample_at(p[len(drafts)], float(u[len(drafts), 0]))
