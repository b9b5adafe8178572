"""The generation loop: vanilla and speculative decoding in one generator.

gpt-fast style, batch 1::

    prefill(prompt)  ->  token t0 from the last prompt position's logits
    loop:
        drafts = drafter.propose(context, features, k)      # k may be 0
        logits = model.forward_step([last] + drafts)         # ONE forward
        greedy:   accept the longest prefix of drafts equal to the argmax,
                  then the model's own next token (the bonus)
        sampling: accept_sampled(): exact speculative sampling
        cache.rollback(to the accepted length)               # O(1)

With no drafter every step verifies just ``[last]``: that is vanilla
decoding, and the reference every speculative run must reproduce token for
token under greedy decoding (and in distribution under sampling).

Tokens are released one at a time through TextStream, so end-of-text, stop
strings and max_new_tokens cut a step's accepted tokens exactly where
vanilla decoding would have stopped.

The loop (``_decode``) never calls the model itself: it yields a ``Forward``
and is sent the output back. ``generate`` runs each forward at once;
the server (``generate_steps``) runs the pending forwards of all its
requests as one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from ..model.kv_cache import KVCache
from ..model.kernels import argmax_logsumexp
from .sampling import (AcceptRule, Penalties, PositionDraws, accept_greedy, accept_sampled, make_generator,
                       probs_from_logits, top_logprobs, validate_params)
from .text import TextStream
from .types import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Draft, Drafter, ModelFeatures,
                    PromptScores, SamplingParams, SpecStats, StepEvent, extend_costs, fastest_length)

# Draft length for a drafter that declares no k_max of its own.
DEFAULT_K = 4


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens; end-of-text, when generated, is the last one
    text: str  # released text, stop sequence excluded
    finish_reason: str
    stats: SpecStats
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with params.top_n
    prompt: PromptScores | None = None  # with params.prompt_logprobs


@dataclass
class Forward:
    """What the decode loop asks of the model: run ``ids`` (1, T) from
    position ``start`` over ``cache``, and send back the ``StepOutput``.
    ``generate`` runs each at once; a server may batch the forwards of
    several requests (``GPT.forward_batch``)."""

    ids: torch.Tensor
    start: int
    cache: KVCache  # the request's own
    last_only: bool = False

    def run(self, model):
        return model.forward_step(self.ids, self.start, self.cache, last_only=self.last_only)


def _features(out, row: int, n_vocab: int) -> ModelFeatures:
    return ModelFeatures(logits=out.logits[0, row, :n_vocab], hidden=out.hidden[0, row],
                         exit_hidden=[h[0, row] for h in out.exit_hidden])


@dataclass
class DraftGate:
    """Ask a costly drafter only while its proposals pay for themselves.

    A proposal costs the drafter's time and a longer verify, and saves a
    forward for every accepted token. Where drafts are rarely accepted (free
    sampling on prose) a costly drafter makes decoding slower than vanilla.
    After each proposal the gate books

        earned = accepted * forward_ms - step_cost_ms(drafted)

    from the drafter's own cost model (where the drafter has a verify curve,
    its part of the cost is at least the proposal's measured time), into a
    running mean, and the tokens the step produced into another.
    When the mean turns negative (slower than vanilla), or, with a fallback
    and a verify curve, saves less per token than the fallback is expected
    to (``fallback_saving``), the gate closes for one step, then asks for one
    proposal (a probe): a probe that beats both reopens it, one that does
    not closes it for twice as long (up to ``max_backoff`` steps). A gate
    that closes again before its proposals have paid waits half as long as
    the probe that reopened it had waited, not one step. While it
    is closed the drafter's cheap ``fallback`` drafter proposes instead when
    it has one (the tree's is prompt lookup, its own __COPY__ path), else
    the step is a vanilla step. A fallback draft costs next to nothing to
    propose but lengthens the verify, so with the drafter's verify curve the
    gate sets its length to the one fastest per token by the fallback's
    acceptance so far (``fallback_k``), which can be none. That acceptance
    is also learnt while the drafter proposes, from what it reports its
    fallback would have drafted (``record_counterfactual``).
    None of it changes the output: greedy, or sampled with a seed (the
    engine ties its random draws to output positions).
    """

    forward_ms: float
    step_cost_ms: Callable[[int], float]
    alpha: float = 0.3
    max_backoff: int = 32
    mean: float | None = None  # ms earned per proposal, exponentially averaged
    backoff: int = 0  # > 0: closed, and the next proposal is a probe
    wait: int = 0  # steps left before that probe
    # The fallback's length: verify cost per length (ms for T = 1, 2, ...;
    # None: always its own k_max) and the chance that its draft at position
    # i is accepted when the drafts before it were, exponentially averaged.
    verify_ms: list[float] | None = None
    fallback_acceptance: list[float] = field(default_factory=list)
    fallback_idle: int = 0  # steps the fallback has been judged not worth drafting
    # With a fallback and a verify curve, the drafter is also measured
    # against the fallback: per token, it has to save more than the
    # fallback's draft is expected to (``fallback_saving``), whose acceptance
    # the drafter's own steps also inform (``record_counterfactual``).
    has_fallback: bool = False
    k_cap: int = 8  # the longest fallback draft the comparison considers
    tokens: float | None = None  # tokens per proposal (accepted + 1), exponentially averaged
    reopened_from: int = 0  # the wait a successful probe ended, until the gate next closes

    FALLBACK_PRIOR = 0.5  # a position not seen yet
    FALLBACK_ALPHA = 0.1

    @classmethod
    def for_drafter(cls, drafter) -> "DraftGate | None":
        cost, fwd = getattr(drafter, "step_cost_ms", None), getattr(drafter, "forward_ms", None)
        if cost is None or not fwd:
            return None
        verify = getattr(drafter, "verify_ms", None)
        fb = getattr(drafter, "fallback", None)
        return cls(forward_ms=float(fwd), step_cost_ms=cost, verify_ms=list(verify) if verify else None,
                   has_fallback=fb is not None,
                   k_cap=int(getattr(fb, "k_max", None) or getattr(drafter, "k_max", None) or DEFAULT_K))

    def fallback_k(self, k_cap: int) -> int:
        """How many tokens the fallback should draft (0 to ``k_cap``): the
        length whose expected saving (forwards for the accepted drafts)
        minus its longer verify is largest, from the acceptance seen so far.
        After ``max_backoff`` steps of none it drafts one token anyway, so
        an estimate that a run of bad luck drove down can recover."""
        if self.verify_ms is None:
            return k_cap
        k = self._best_fallback(k_cap)[0]
        self.fallback_idle = self.fallback_idle + 1 if k == 0 else 0
        if self.fallback_idle > self.max_backoff:
            self.fallback_idle, k = 0, 1
        return k

    def _best_fallback(self, k_cap: int) -> tuple[int, float]:
        """(length, expected ms saved per generated token against vanilla) of
        the fallback's fastest draft, from the acceptance seen so far; (0, 0)
        when none pays. Fastest per token, not most saved per step: a longer
        draft saves more a step and can still be slower (prompt lookup at 8
        tokens against 4 on sampled code)."""
        acc = self.fallback_acceptance
        acc = [acc[i] if i < len(acc) else self.FALLBACK_PRIOR for i in range(k_cap)]
        # Costed from vanilla's forward_ms: a step of v[k] ms costs v[k] - v[0] more than one.
        v = [x - self.verify_ms[0] + self.forward_ms for x in extend_costs(self.verify_ms, k_cap + 1)]
        k, ms_per_token = fastest_length(acc, v)
        return (k, self.forward_ms - ms_per_token) if k else (0, 0.0)

    def fallback_saving(self) -> float:
        """ms per generated token the fallback is expected to save against
        vanilla decoding (0 without a verify curve or a fallback): what the
        drafter has to beat, per token, to stay asked."""
        if self.verify_ms is None or not self.has_fallback:
            return 0.0
        return self._best_fallback(self.k_cap)[1]

    def record_counterfactual(self, fallback_tokens: list[int], emitted: list[int]) -> None:
        """After a step the drafter proposed: what its fallback would have
        drafted there, against the tokens the step emitted (the accepted
        drafts and the model's next token). Those are the model's tokens for
        as many positions, greedy or (with position-tied draws) sampled, so
        the fallback's draft is judged on them and censored after them."""
        known = min(len(fallback_tokens), len(emitted))
        matched = 0
        while matched < known and fallback_tokens[matched] == emitted[matched]:
            matched += 1
        if known:
            self.record_fallback(known, matched)

    def record_fallback(self, drafted: int, accepted: int) -> None:
        """Book a fallback draft: positions before ``accepted`` were accepted,
        the one at ``accepted`` (if drafted) was not; later ones say nothing."""
        acc = self.fallback_acceptance
        for i in range(min(drafted, accepted + 1)):
            if i >= len(acc):
                acc.append(self.FALLBACK_PRIOR)
            acc[i] = (1 - self.FALLBACK_ALPHA) * acc[i] + self.FALLBACK_ALPHA * float(i < accepted)

    def open(self) -> bool:
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int, drafter_ms: float | None = None) -> None:
        """Book a proposal: ``drafted`` tokens, ``accepted`` of them, and what
        proposing took where the engine timed it. With a verify curve the
        drafter's part of the cost is the larger of its own estimate and that
        measured time: the estimate is an average over proposals, and where
        most proposals walk the whole tree (sampled prose) instead of copying
        a match, it priced them at a fifth of what they took
        (bench/drafter_cost.py)."""
        cost = self.step_cost_ms(drafted)
        if drafter_ms is not None and self.verify_ms is not None:
            v = extend_costs(self.verify_ms, drafted + 1)
            longer_verify = v[drafted] - v[0]
            cost = max(cost - longer_verify, drafter_ms) + longer_verify
        earned = accepted * self.forward_ms - cost
        floor = self.fallback_saving()  # ms a token the fallback would save; 0: vanilla
        if self.backoff:  # a probe
            if earned > 0 and earned / (accepted + 1) > floor:
                self.reopened_from = self.backoff
                self.backoff, self.mean, self.tokens = 0, earned, accepted + 1.0
            else:
                self.backoff = min(2 * self.backoff, self.max_backoff)
                self.wait = self.backoff
            return
        a = self.alpha
        self.mean = earned if self.mean is None else (1 - a) * self.mean + a * earned
        self.tokens = accepted + 1.0 if self.tokens is None else (1 - a) * self.tokens + a * (accepted + 1)
        if earned > 0:  # proposals that pay wear the memory of the last close away
            self.reopened_from //= 2
        if self.mean < 0 or self.mean / self.tokens < floor:
            # Closing again soon after a lucky probe: start from half the wait that
            # probe ended, not from one step, so that a drafter that loses on
            # average (sampled prose) is not asked again every few steps.
            self.backoff = self.wait = max(1, self.reopened_from // 2)
            self.reopened_from = 0


def _snapshot(stats: SpecStats) -> SpecStats:
    return replace(stats, accepted_per_position=list(stats.accepted_per_position),
                   drafted_per_position=list(stats.drafted_per_position))


def _grow(counts: list[int], n: int) -> None:
    if len(counts) < n:
        counts.extend([0] * (n - len(counts)))


def generate(model, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None, *,
             tokenizer, cache=None, should_stop: Callable[[], bool] | None = None,
             accept: AcceptRule = accept_sampled) -> Iterator[StepEvent]:
    """Generate from ``prompt_ids``; yield one StepEvent for the prefill's
    token and one per verify step. The last event has ``finish_reason`` set.

    Bad requests (empty prompt, prompt + max_new_tokens past the context,
    bad sampling settings) raise ValueError here, before anything runs, so
    a server can refuse them before it starts streaming.

    End-of-text, when generated, is the last token of the last event and
    contributes no text. ``accept`` replaces the sampling acceptance rule
    (tests inject wrong rules to show the exactness test can fail); greedy
    decoding ignores it. ``cache`` is reused when given (it is reset
    first). ``should_stop`` is polled before every verify step; when it
    returns True the generator yields a last, empty event with finish reason
    "cancelled" (text still held back for a possible stop string is dropped).
    """
    steps = generate_steps(model, prompt_ids, params, drafter, tokenizer=tokenizer, cache=cache,
                           should_stop=should_stop, accept=accept)
    return _run_forwards(model, steps)


def generate_steps(model, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None, *,
                   tokenizer, cache=None, should_stop: Callable[[], bool] | None = None,
                   accept: AcceptRule = accept_sampled) -> Iterator["StepEvent | Forward"]:
    """``generate``'s loop, leaving the model's forwards to the caller: it
    yields a ``Forward`` wherever it needs one, to be answered with
    ``.send(step_output)``, and the ``StepEvent``s (each answered with
    ``next``). A server drives many at once and batches their forwards;
    ``generate`` runs each forward as it comes. Checks as ``generate``."""
    validate_params(params)
    prompt = [int(t) for t in prompt_ids]
    block = model.config.block_size
    if not prompt:
        raise ValueError("the prompt is empty: it needs at least one token")
    if len(prompt) + params.max_new_tokens > block:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                         f"{len(prompt) + params.max_new_tokens} exceeds the model's context of {block} tokens; "
                         f"shorten the prompt or lower max_new_tokens")
    # Real tokens only: the head's padding columns can never be chosen.
    n_vocab = min(tokenizer.n_vocab, model.config.vocab_size)
    if max(prompt) >= n_vocab or min(prompt) < 0:
        raise ValueError(f"prompt token ids must be in [0, {n_vocab})")
    if cache is None:
        cache = model.new_cache(batch_size=1, max_len=block)
    elif cache.max_len < len(prompt) + params.max_new_tokens - 1:
        raise ValueError(f"the KV cache holds {cache.max_len} positions; this request needs "
                         f"{len(prompt) + params.max_new_tokens - 1}")
    return _decode(model, prompt, params, drafter, tokenizer, n_vocab, cache, should_stop, accept)


def _run_forwards(model, steps: Iterator["StepEvent | Forward"]) -> Iterator[StepEvent]:
    """Drive ``steps``: run each Forward on ``model`` at once, pass the events on."""
    try:
        item = next(steps)
        while True:
            if isinstance(item, Forward):
                item = steps.send(item.run(model))
            else:
                yield item
                item = next(steps)
    except StopIteration:
        return
    finally:
        steps.close()


def _decode(model, prompt: list[int], params: SamplingParams, drafter: Drafter | None, tokenizer, n_vocab: int,
            cache, should_stop: Callable[[], bool] | None, accept: AcceptRule) -> Iterator["StepEvent | Forward"]:
    """The loop itself (``generate_steps`` has checked the request): it
    yields each Forward it needs and each StepEvent."""
    cache.reset()
    eot = tokenizer.eot_id
    greedy = params.greedy
    # Sampling: the random draws belong to output positions (PositionDraws),
    # so the drafts never change which tokens a seed gives.
    draws = None if greedy else PositionDraws(params.max_new_tokens,
                                              make_generator(params.seed, model.wte.weight.device))
    device = model.wte.weight.device
    k_cap = params.k_max if params.k_max is not None else getattr(drafter, "k_max", DEFAULT_K)
    stream = TextStream(tokenizer, params.stop)
    stats = SpecStats(drafter=getattr(drafter, "name", "none") if drafter is not None else "none",
                      prompt_tokens=len(prompt))
    context = list(prompt)  # prompt + generated; the last token has not been through the model yet
    gate = DraftGate.for_drafter(drafter)  # None without a drafter or a cost model
    penalties = Penalties(prompt, n_vocab, params, device) if params.penalised else None

    def choose(logits: torch.Tensor, drafts: list[int], q) -> tuple[list[int], list[float], list]:
        """Verify ``drafts`` against logits rows (len(drafts)+1, n_vocab):
        the accepted drafts plus the next token, with their log-probabilities
        (and, with params.top_n, each position's most likely alternatives)."""
        if penalties is not None:
            logits = penalties.apply(logits, drafts)
        if greedy:
            argmax, logz = argmax_logsumexp(logits)
            n = accept_greedy(argmax, drafts)
            new = drafts[:n] + [argmax[n]]
            rows = logits[:n + 1].float()
            # Greedy reports the (penalised) logits' log-probabilities, unscaled by temperature.
            logz = logz[:n + 1, None].to(rows.device)
            logp = rows - logz if params.top_n else None
            lp = rows[torch.arange(n + 1), new] - logz[:, 0]
        else:
            p = probs_from_logits(logits, params)
            # stats.generated_tokens: the output position of this step's first token
            n, nxt = accept(p, drafts, q, draws.at(stats.generated_tokens))
            new = drafts[:n] + [nxt]
            logp = torch.log(p[:n + 1]) if params.top_n else None
            lp = torch.log(p[torch.arange(n + 1), new])
        return new, lp.tolist(), top_logprobs(logp, params.top_n) if logp is not None else [[]] * len(new)

    t0 = time.perf_counter()
    scores = None
    if params.prompt_logprobs:
        # A forward of its own over a scratch cache, so the generation's
        # prefill, and with it every generated token, is exactly what it is
        # without scoring.
        scratch = model.new_cache(batch_size=1, max_len=len(prompt))
        scored = yield Forward(torch.tensor([prompt], device=device), 0, scratch)
        scores = _prompt_scores(scored, prompt, n_vocab, params.top_n)
        if params.max_new_tokens == 0:  # scoring only: no prefill, nothing generated
            stats.prefill_time_s = time.perf_counter() - t0
            yield StepEvent(tokens=[], logprobs=[], texts=[], finish_reason=FINISH_LENGTH, stats=_snapshot(stats),
                            prompt=scores)
            return
    out = yield Forward(torch.tensor([prompt], device=device), 0, cache, last_only=True)
    new, lps, tops = choose(out.logits[0, :, :n_vocab], [], None)
    features = _features(out, 0, n_vocab)
    stats.prefill_time_s = time.perf_counter() - t0

    while True:
        # Release the new tokens one by one, exactly as vanilla decoding
        # would, so nothing after end-of-text or a stop string escapes.
        tokens, texts, logprobs, top, finish = [], [], [], [], None
        for t, lp, alt in zip(new, lps, tops):
            tokens.append(t)
            logprobs.append(lp)
            if params.top_n:
                top.append(alt)
            context.append(t)
            if penalties is not None:
                penalties.push(t)
            stats.generated_tokens += 1
            if t == eot:
                texts.append("")
                finish = FINISH_EOS
                break
            texts.append(stream.push(t))
            if stream.stopped:
                finish = FINISH_STOP
                break
            if stats.generated_tokens >= params.max_new_tokens:
                finish = FINISH_LENGTH
                break
        if finish is not None:
            texts[-1] += stream.finish()
            # Leave the cache describing exactly the kept context (all but its
            # last token), even when a stop cut an accepted draft short.
            cache.rollback(min(cache.length, len(context) - 1))
        yield StepEvent(tokens=tokens, logprobs=logprobs, texts=texts, finish_reason=finish,
                        stats=_snapshot(stats), top_logprobs=top, prompt=scores)
        scores = None  # the prompt's scores go with the first event only
        if finish is not None:
            return
        if should_stop is not None and should_stop():
            yield StepEvent(tokens=[], logprobs=[], texts=[], finish_reason=FINISH_CANCELLED,
                            stats=_snapshot(stats))
            return

        # Draft: never more than the request can still use. The verify step
        # yields drafts + 1 tokens, and prompt + max_new_tokens <= block_size
        # keeps every position inside the cache.
        k = min(k_cap, params.max_new_tokens - stats.generated_tokens - 1) if drafter is not None else 0
        drafts, q, guessed = [], None, False
        asked = k > 0 and (gate is None or gate.open())
        stats.skipped_proposals += int(k > 0 and not asked)
        # While the gate is closed, the drafter's cheap fallback (if any)
        # drafts, as long as the gate expects it to pay for its verify.
        proposer = drafter if asked else getattr(drafter, "fallback", None) if k > 0 else None
        if proposer is not None and not asked:
            k = gate.fallback_k(min(k, getattr(proposer, "k_max", k)))
            proposer = proposer if k > 0 else None
        if proposer is not None:
            td = time.perf_counter()
            draft: Draft = proposer.propose(context, features, k)
            drafter_s = time.perf_counter() - td
            stats.drafter_time_s += drafter_s
            for d in draft.tokens[:k]:
                d = int(d)
                if not 0 <= d < n_vocab:  # cannot be a model token: the draft ends here
                    break
                drafts.append(d)
            if draft.q is not None and drafts:
                q = [r[:n_vocab].float() for r in draft.q[:len(drafts)]]
            stats.model_handbacks += int(bool(draft.handback))
            guessed = bool(draft.guess) and bool(drafts)

        tv = time.perf_counter()
        pos = len(context) - 1
        out = yield Forward(torch.tensor([[context[-1]] + drafts], device=device), pos, cache)
        new, lps, tops = choose(out.logits[0, :, :n_vocab], drafts, q)
        n = len(new) - 1  # drafts accepted
        if asked and gate is not None:
            if draft.fallback is not None:
                gate.record_counterfactual(draft.fallback, new)
            gate.record(len(drafts), n, drafter_s * 1e3)
        elif proposer is not None and gate is not None:
            gate.record_fallback(len(drafts), n)
        cache.rollback(pos + n + 1)  # [last] + the accepted drafts stay; the bonus is not run yet
        features = _features(out, n, n_vocab)
        stats.verify_time_s += time.perf_counter() - tv

        stats.verify_steps += 1
        stats.draft_tokens += len(drafts)
        stats.accepted_tokens += n
        if guessed:
            stats.guess_tokens += len(drafts)
            stats.accepted_guesses += n
        _grow(stats.drafted_per_position, len(drafts))
        _grow(stats.accepted_per_position, len(drafts))
        for j in range(len(drafts)):
            stats.drafted_per_position[j] += 1
        for j in range(n):
            stats.accepted_per_position[j] += 1


def _prompt_scores(out, prompt: list[int], n_vocab: int, top_n: int) -> PromptScores:
    """Each prompt token's log-probability under the model given the tokens
    before it (raw logits: no penalties, no temperature), from the output
    of a forward over the whole prompt."""
    rows = out.logits[0, :-1, :n_vocab].float()
    logp = rows - torch.logsumexp(rows, dim=-1, keepdim=True)
    nxt = torch.tensor(prompt[1:], dtype=torch.long, device=rows.device)
    lps = logp[torch.arange(len(prompt) - 1, device=rows.device), nxt].tolist()
    return PromptScores(logprobs=[None, *lps], top_logprobs=[[], *top_logprobs(logp, top_n)])


def generate_all(model, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None, *,
                 tokenizer, cache=None, should_stop: Callable[[], bool] | None = None,
                 accept: AcceptRule = accept_sampled) -> GenerationResult:
    """Run ``generate`` to the end and collect its events."""
    token_ids, logprobs, texts, top, prompt = [], [], [], [], None
    event = None
    for event in generate(model, prompt_ids, params, drafter, tokenizer=tokenizer, cache=cache,
                          should_stop=should_stop, accept=accept):
        token_ids += event.tokens
        logprobs += event.logprobs
        texts += event.texts
        top += event.top_logprobs
        prompt = prompt or event.prompt
    return GenerationResult(token_ids=token_ids, text="".join(texts), finish_reason=event.finish_reason,
                            stats=event.stats, logprobs=logprobs, top_logprobs=top, prompt=prompt)
