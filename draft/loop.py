"""The generation loop: vanilla and speculative decoding in one generator.

gpt-fast style, batch 1::

    prefill(prompt)  ->  token t0 from the last prompt position's logits
    loop:
        draft  = state.propose(context, features, k)          # k may be 0
        logits = model.forward_step([last] + draft)           # ONE forward
        greedy:   accept the longest prefix of the draft equal to the argmax,
                  then the model's own next token (the bonus)
        sampling: accept_sampled(): exact speculative sampling
        state.observe(draft, emitted)                         # the drafter learns
        cache.rollback(to the accepted length)                # O(1)

With no drafter every step verifies just ``[last]``: that is vanilla
decoding, and the reference every speculative run must reproduce token for
token under greedy decoding (and in distribution under sampling). Whatever
policy decides how much to draft (the tree's gate, draft.gate) lives in the
drafter; the loop only asks.

Tokens are released one at a time through TextStream, so end-of-text, stop
strings and max_new_tokens cut a step's accepted tokens exactly where
vanilla decoding would have stopped.

The loop (``_decode``) never calls the model itself: it yields a
``ForwardRequest`` and is sent the output back. ``generate`` runs each one
at once; the server's scheduler runs the pending requests of all its
sequences as one batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..model.kv_cache import KVCache
from ..model.kernels import argmax_logsumexp
from .sampling import (AcceptRule, Penalties, PositionDraws, accept_greedy, accept_sampled, make_generator,
                       probs_from_logits, top_logprobs, validate_params)
from .text import TextStream
from .types import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Draft, Drafter, ModelFeatures,
                    PromptScores, SamplingParams, SpecStats, StepEvent, StepStats)

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
class ForwardRequest:
    """What the decode loop asks of the model: run ``ids`` (1, T) from
    position ``start`` over ``cache``, and send back the ``StepOutput``.
    ``generate`` runs each at once; a server may batch the requests of
    several sequences (``GPT.forward_batch``)."""

    ids: torch.Tensor
    start: int
    cache: KVCache  # the sequence's own
    last_only: bool = False

    def run(self, model):
        return model.forward_step(self.ids, self.start, self.cache, last_only=self.last_only)


def check_request(prompt: list[int], params: SamplingParams, block_size: int, n_vocab: int) -> None:
    """Every check of a request against the model, in one place: the server's
    admission runs it (a 422) and so does ``generate_steps``. Raises ValueError."""
    validate_params(params)
    if not prompt:
        raise ValueError("the prompt's token list is empty: it needs at least one token")
    if max(prompt) >= n_vocab or min(prompt) < 0:
        raise ValueError(f"prompt token ids must be in [0, {n_vocab})")
    bad = [t for t in params.logit_bias if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"logit_bias token ids must be in [0, {n_vocab}), got {bad[:5]}")
    if params.max_new_tokens > block_size - 1:
        raise ValueError(f"max_new_tokens must be <= {block_size - 1} (the context is {block_size} tokens); "
                         f"got {params.max_new_tokens}")
    if len(prompt) + params.max_new_tokens > block_size:
        raise ValueError(f"inputs tokens + max_new_tokens must be <= {block_size}: the prompt's {len(prompt)} "
                         f"tokens + max_new_tokens {params.max_new_tokens} = {len(prompt) + params.max_new_tokens} "
                         f"exceeds the model's context; shorten the prompt or lower max_new_tokens")


def generate(model, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None, *,
             tokenizer, cache=None, should_stop: Callable[[], bool] | None = None,
             accept: AcceptRule = accept_sampled) -> Iterator[StepEvent]:
    """Generate from ``prompt_ids``; yield one StepEvent for the prefill's
    token and one per verify step. The last event has ``finish_reason`` set.

    Bad requests (``check_request``) raise ValueError here, before anything
    runs, so a server can refuse them before it starts streaming.

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
                   accept: AcceptRule = accept_sampled) -> Iterator["StepEvent | ForwardRequest"]:
    """``generate``'s loop, leaving the model's forwards to the caller: it
    yields a ``ForwardRequest`` wherever it needs one, to be answered with
    ``.send(step_output)``, and the ``StepEvent``s (each answered with
    ``next``). A server drives many at once and batches their forwards;
    ``generate`` runs each forward as it comes. Checks as ``generate``."""
    prompt = [int(t) for t in prompt_ids]
    block = model.config.block_size
    # Real tokens only: the head's padding columns can never be chosen.
    n_vocab = min(tokenizer.n_vocab, model.config.vocab_size)
    check_request(prompt, params, block, n_vocab)
    if cache is None:
        cache = model.new_cache(batch_size=1, max_len=block)
    elif cache.max_len < len(prompt) + params.max_new_tokens - 1:
        raise ValueError(f"the KV cache holds {cache.max_len} positions; this request needs "
                         f"{len(prompt) + params.max_new_tokens - 1}")
    return _decode(model, prompt, params, drafter, tokenizer, n_vocab, cache, should_stop, accept)


def _run_forwards(model, steps: Iterator["StepEvent | ForwardRequest"]) -> Iterator[StepEvent]:
    """Drive ``steps``: run each ForwardRequest on ``model`` at once, pass the events on."""
    try:
        item = next(steps)
        while True:
            if isinstance(item, ForwardRequest):
                item = steps.send(item.run(model))
            else:
                yield item
                item = next(steps)
    except StopIteration:
        return
    finally:
        steps.close()


class Verifier:
    """Turns a verify forward's logits into the step's tokens: the accepted
    drafts plus the model's next token, with their log-probabilities (and,
    with params.top_n, each position's most likely alternatives)."""

    def __init__(self, params: SamplingParams, penalties: Penalties | None, draws: PositionDraws | None,
                 accept: AcceptRule):
        self.params, self.penalties, self.draws, self.accept = params, penalties, draws, accept

    def __call__(self, logits: torch.Tensor, drafts: list[int], q, position: int):
        """``logits`` rows (len(drafts)+1, n_vocab); ``position``: the output
        position of the step's first token (the sampled draws belong to it)."""
        params = self.params
        if self.penalties is not None:
            logits = self.penalties.apply(logits, drafts)
        if params.greedy:
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
            n, nxt = self.accept(p, drafts, q, self.draws.at(position))
            new = drafts[:n] + [nxt]
            logp = torch.log(p[:n + 1]) if params.top_n else None
            lp = torch.log(p[torch.arange(n + 1), new])
        return new, lp.tolist(), top_logprobs(logp, params.top_n) if logp is not None else [[]] * len(new)


def _features(out, row: int, n_vocab: int) -> ModelFeatures:
    return ModelFeatures(logits=out.logits[0, row, :n_vocab], hidden=out.hidden[0, row],
                         exit_hidden=[h[0, row] for h in out.exit_hidden])


def _valid(draft: Draft, k: int, n_vocab: int) -> tuple[list[int], list | None]:
    """The proposal's first ``k`` tokens, cut before the first that cannot be
    a model token, and their rows of q (sampled drafts)."""
    drafts = []
    for d in draft.tokens[:k]:
        if not 0 <= int(d) < n_vocab:
            break
        drafts.append(int(d))
    q = [r[:n_vocab].float() for r in draft.q[:len(drafts)]] if draft.q is not None and drafts else None
    return drafts, q


def _decode(model, prompt: list[int], params: SamplingParams, drafter: Drafter | None, tokenizer, n_vocab: int,
            cache, should_stop: Callable[[], bool] | None,
            accept: AcceptRule) -> Iterator["StepEvent | ForwardRequest"]:
    """The loop itself (``generate_steps`` has checked the request): it
    yields each ForwardRequest it needs and each StepEvent."""
    cache.reset()
    eot, device = tokenizer.eot_id, model.wte.weight.device
    # Sampling: the random draws belong to output positions (PositionDraws),
    # so the drafts never change which tokens a seed gives.
    draws = None if params.greedy else PositionDraws(params.max_new_tokens, make_generator(params.seed, device))
    penalties = Penalties(prompt, n_vocab, params, device) if params.penalised else None
    verify = Verifier(params, penalties, draws, accept)
    state = drafter.open() if drafter is not None else None
    k_cap = params.k_max if params.k_max is not None else (drafter.k_max if drafter is not None else 0)
    stream = TextStream(tokenizer, params.stop)
    stats = SpecStats(drafter=drafter.name if drafter is not None else "none", prompt_tokens=len(prompt))
    context = list(prompt)  # prompt + generated; the last token has not been through the model yet
    step = StepStats()

    t0 = time.perf_counter()
    scores = None
    if params.prompt_logprobs:
        # A forward of its own over a scratch cache, so the generation's
        # prefill, and with it every generated token, is exactly what it is
        # without scoring.
        scratch = model.new_cache(batch_size=1, max_len=len(prompt))
        scored = yield ForwardRequest(torch.tensor([prompt], device=device), 0, scratch)
        scores = _prompt_scores(scored, prompt, n_vocab, params.top_n)
        if params.max_new_tokens == 0:  # scoring only: no prefill, nothing generated
            step.prefill_time_s = time.perf_counter() - t0
            stats.add(step)
            yield StepEvent(tokens=[], logprobs=[], texts=[], finish_reason=FINISH_LENGTH, stats=stats.copy(),
                            step=step, prompt=scores)
            return
    out = yield ForwardRequest(torch.tensor([prompt], device=device), 0, cache, last_only=True)
    new, lps, tops = verify(out.logits[0, :, :n_vocab], [], None, 0)
    features = _features(out, 0, n_vocab)
    step.prefill_time_s = time.perf_counter() - t0

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
            if t == eot:
                texts.append("")
                finish = FINISH_EOS
                break
            texts.append(stream.push(t))
            if stream.stopped:
                finish = FINISH_STOP
                break
            if stats.generated_tokens + len(tokens) >= params.max_new_tokens:
                finish = FINISH_LENGTH
                break
        if finish is not None:
            texts[-1] += stream.finish()
            # Leave the cache describing exactly the kept context (all but its
            # last token), even when a stop cut an accepted draft short.
            cache.rollback(min(cache.length, len(context) - 1))
        step.generated_tokens = len(tokens)
        stats.add(step)
        yield StepEvent(tokens=tokens, logprobs=logprobs, texts=texts, finish_reason=finish, stats=stats.copy(),
                        step=step, top_logprobs=top, prompt=scores)
        scores = None  # the prompt's scores go with the first event only
        if finish is not None:
            return
        if should_stop is not None and should_stop():
            yield StepEvent(tokens=[], logprobs=[], texts=[], finish_reason=FINISH_CANCELLED, stats=stats.copy())
            return

        # Draft: never more than the request can still use. The verify step
        # yields drafts + 1 tokens, and prompt + max_new_tokens <= block_size
        # keeps every position inside the cache.
        k = min(k_cap, params.max_new_tokens - stats.generated_tokens - 1) if state is not None else 0
        step = StepStats(verify_steps=1)
        draft, drafts, q = None, [], None
        if k > 0:
            td = time.perf_counter()
            draft = state.propose(context, features, k)
            step.drafter_time_s = time.perf_counter() - td
            drafts, q = _valid(draft, k, n_vocab)

        tv = time.perf_counter()
        pos = len(context) - 1
        out = yield ForwardRequest(torch.tensor([[context[-1]] + drafts], device=device), pos, cache)
        new, lps, tops = verify(out.logits[0, :, :n_vocab], drafts, q, stats.generated_tokens)
        n = len(new) - 1  # drafts accepted
        if draft is not None:
            state.observe(drafts, new)
        cache.rollback(pos + n + 1)  # [last] + the accepted drafts stay; the bonus is not run yet
        features = _features(out, n, n_vocab)
        step.verify_time_s = time.perf_counter() - tv

        step.count_draft(draft, len(drafts), n)


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
