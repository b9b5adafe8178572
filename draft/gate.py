"""The gate: ask a costly drafter only while its proposals pay for themselves.

``GatedDrafter`` wraps a drafter that knows its costs (``CostedDrafter``)
and is a drafter itself, so the decode loop never sees the policy: each
step its state asks the gate, proposes with the drafter or its cheap
fallback (or not at all), and books what the verify accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .types import Draft, Drafter, DraftState, ModelFeatures, extend_costs, fastest_length


class CostedDrafter(Drafter, Protocol):
    """A drafter that can price its proposals on this machine."""

    @property
    def forward_ms(self) -> float:
        """A verify forward over one position: what one accepted draft saves."""
        ...

    verify_ms: list[float] | None  # ms of a verify forward over T = 1, 2, ... positions; None: unknown

    def step_cost_ms(self, drafted: int) -> float:
        """What a proposal of ``drafted`` tokens costs: its own time plus the longer verify."""
        ...


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
    the step is a vanilla step (``GatedDrafter`` below does the asking). A fallback draft costs next to nothing to
    propose but lengthens the verify, so with the drafter's verify curve the
    gate sets its length to the one fastest per token by the fallback's
    acceptance so far (``fallback_k``), which can be none. That acceptance
    is also learnt while the drafter proposes, from what it reports its
    fallback would have drafted (``record_counterfactual``).
    None of it changes the output: greedy, or sampled with a seed (the
    loop ties its random draws to output positions).
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
        proposing took where the state timed it. With a verify curve the
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


class GatedDrafter:
    """``drafter`` behind a DraftGate, with ``fallback`` (a cheap drafter, or
    None) proposing while the gate is closed. The same name and k_max as the
    drafter it wraps: to a request it is that drafter."""

    def __init__(self, drafter: CostedDrafter, fallback: Drafter | None = None):
        self.drafter, self.fallback = drafter, fallback
        self.name, self.k_max = drafter.name, drafter.k_max

    def open(self) -> "GatedState":
        d, fb = self.drafter, self.fallback
        # Read at open, not at construction: calibrate() re-times the costs after loading.
        gate = DraftGate(forward_ms=float(d.forward_ms), step_cost_ms=d.step_cost_ms, verify_ms=list(d.verify_ms) if d.verify_ms else None,
                         has_fallback=fb is not None, k_cap=int(fb.k_max if fb is not None else d.k_max))
        return GatedState(gate, d.open(), fb.open() if fb is not None else None,
                          fb.k_max if fb is not None else 0)

    def describe(self) -> dict:
        return {**self.drafter.describe(), "gate": {"fallback": self.fallback.describe() if self.fallback else None}}


class GatedState:
    """One request's gate, with its drafter's and fallback's states."""

    def __init__(self, gate: DraftGate, drafter: DraftState, fallback: DraftState | None, fallback_k: int):
        self.gate, self.drafter, self.fallback, self.fallback_k = gate, drafter, fallback, fallback_k
        self._asked = False  # whether the last proposal was the drafter's (else the fallback's, or none)
        self._draft: Draft | None = None  # the drafter's last proposal
        self._drafter_ms = 0.0

    def propose(self, context: list[int], features: ModelFeatures | None, k: int) -> Draft:
        self._asked = self.gate.open()
        if self._asked:
            t0 = time.perf_counter()
            self._draft = self.drafter.propose(context, features, k)
            self._drafter_ms = (time.perf_counter() - t0) * 1e3
            return self._draft
        # Closed: the fallback drafts, as long as the gate expects it to pay for its verify.
        k = self.gate.fallback_k(min(k, self.fallback_k)) if self.fallback is not None else 0
        if k <= 0:
            return Draft(tokens=[], skipped=True)
        draft = self.fallback.propose(context, features, k)
        draft.skipped = True
        return draft

    def observe(self, drafted: list[int], emitted: list[int]) -> None:
        accepted = len(emitted) - 1
        if self._asked:
            self.drafter.observe(drafted, emitted)
            if self._draft.fallback is not None:  # what the fallback would have drafted, judged on the same tokens
                self.gate.record_counterfactual(self._draft.fallback, emitted)
            self.gate.record(len(drafted), accepted, self._drafter_ms)
        elif self.fallback is not None and drafted:
            self.fallback.observe(drafted, emitted)
            self.gate.record_fallback(len(drafted), accepted)
