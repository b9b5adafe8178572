"""The data the decode loop, its drafters and the server exchange.

No fastapi or prometheus here: the loop returns ``SpecStats`` as data and
the server turns it into metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Protocol, Sequence

import torch

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"
FINISH_CANCELLED = "cancelled"


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily
MIN_REPETITION_PENALTY = 0.01  # below, a repeated token's logit is multiplied by > 100 and can overflow


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1.0 means off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    k_max: int | None = None  # cap on draft length; None: the drafter's own
    # Penalties on tokens already there (draft.sampling.Penalties); neutral by default.
    repetition_penalty: float = 1.0  # CTRL's: over prompt + generated; > 1 discourages repeats
    frequency_penalty: float = 0.0  # OpenAI's: minus this times a token's count in the generated text
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token has been generated
    # OpenAI's logit_bias: token id -> added to its logit (in [-100, 100]) before anything else.
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Log-probabilities reported beside the tokens (they never change which tokens come out):
    top_n: int = 0  # the n most likely tokens at each generated position
    prompt_logprobs: bool = False  # each prompt token's, given the tokens before it (the model's own);
    # with it, max_new_tokens may be 0: score the prompt, generate nothing

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or bool(self.logit_bias))

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small is the argmax anyway, and dividing
        # logits by it would overflow float32 (NaN probabilities).
        return self.temperature < GREEDY_BELOW


@dataclass
class ModelFeatures:
    """What one verify step leaves for the drafter: the model's view at the
    last accepted position, i.e. the position whose logits chose the bonus
    token (the newest token, not yet run through the model)."""

    logits: torch.Tensor  # (vocab,) final-exit logits there
    hidden: torch.Tensor  # (C,) final hidden state there (after the final LayerNorm)
    exit_hidden: list[torch.Tensor]  # (C,) residual stream at each intermediate exit there


@dataclass
class Draft:
    tokens: list[int]
    # True when drafting stopped because the drafter handed control back to
    # the model (the tree predicted __MODEL__), not because it hit k_max.
    handback: bool = False
    # Per drafted token, the drafter's full distribution q over the vocabulary
    # when it sampled the token from q; None for deterministic proposals
    # (then acceptance uses p(d) and the residual excludes d).
    q: list[torch.Tensor] | None = None
    # What the drafter's fallback (draft.gate) would have drafted here, when
    # the drafter knows it at no extra cost: the gate judges the fallback on
    # the tokens this step emits, so it can tell which of the two pays more.
    fallback: list[int] | None = None
    # True when the tokens are the corpus guess (draft.corpus) filling a step
    # the drafter would otherwise have left empty, not its own proposal.
    guess: bool = False
    # True when the gate (draft.gate) did not ask the drafter this step: the
    # tokens, if any, are its fallback's.
    skipped: bool = False


class DraftState(Protocol):
    """One request's drafting, from ``Drafter.open`` to the request's end.

    Whatever a drafter learns or indexes about a request (the n-gram index
    of its context, the gate's running costs) lives here, so requests never
    share state and nothing has to guess which request a context is."""

    def propose(self, context: list[int], features: "ModelFeatures | None", k: int) -> Draft:
        """Up to ``k`` tokens to follow ``context`` (prompt + generated so far)."""
        ...

    def observe(self, drafted: list[int], emitted: list[int]) -> None:
        """After the verify: the drafts the model checked (the proposal, cut
        where it was invalid or too long) and the tokens the step emitted
        (the accepted drafts, then the model's own next token)."""
        ...


class Drafter(Protocol):
    """What the decode loop, the benchmark and the server know of a drafter.

    A new drafter is one module with a class like this, plus its entry in
    ``draft.registry``."""

    name: str
    k_max: int  # the draft length it proposes unless a request caps it

    def open(self) -> DraftState:
        """A fresh state for one request."""
        ...

    def describe(self) -> dict:
        """Its settings as JSON-ready data (the server's /info, the benchmark's report)."""
        ...


@dataclass
class StepStats:
    """What one step of the loop did (the prefill, or a verify step).

    Every event carries its step's; ``SpecStats`` sums them and the server's
    metrics count them. A new counter is a field here (summed into
    SpecStats and reported in responses by itself) and a series in the
    server's Metrics."""

    verify_steps: int = 0  # 1 for a verify step: a forward of [last] + drafts after the prefill
    generated_tokens: int = 0  # tokens released by this step (a stop or the length cuts the rest)
    draft_tokens: int = 0  # tokens proposed and verified
    accepted_tokens: int = 0  # of those, accepted by the model (the bonus token excluded)
    model_handbacks: int = 0  # 1 when the draft ended with __MODEL__
    skipped_proposals: int = 0  # 1 when the gate did not ask the drafter (its fallback, if any, drafted)
    guess_tokens: int = 0  # of draft_tokens, corpus guesses (draft.corpus) in otherwise empty steps
    accepted_guesses: int = 0  # of accepted_tokens, corpus guesses
    fallback_tokens: int = 0  # of draft_tokens, drafted by the gate's fallback while the drafter was not asked
    accepted_fallback: int = 0  # of accepted_tokens, the fallback's
    drafter_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_time_s: float = 0.0

    def count_draft(self, draft: Draft | None, drafted: int, accepted: int) -> None:
        """Book a verify step's draft: the proposal (None where nothing was
        asked), how many of its tokens were verified and how many accepted."""
        self.draft_tokens, self.accepted_tokens = drafted, accepted
        if draft is None:
            return
        self.model_handbacks, self.skipped_proposals = int(draft.handback), int(draft.skipped)
        if draft.guess and drafted:
            self.guess_tokens, self.accepted_guesses = drafted, accepted
        if draft.skipped:
            self.fallback_tokens, self.accepted_fallback = drafted, accepted


_STEP_FIELDS = tuple(f.name for f in fields(StepStats))  # once: add() runs every decode step

# SpecStats fields that a response's speculative details leave out: the
# request's own counts are reported elsewhere (usage, details), and wall
# times depend on the machine and the batch.
UNREPORTED = ("prompt_tokens", "generated_tokens", "drafter_time_s", "verify_time_s", "prefill_time_s")


@dataclass
class SpecStats(StepStats):
    """A request's running totals: its steps' ``StepStats`` summed, with the
    accepted and drafted counts per draft position."""

    drafter: str = "none"
    prompt_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: accepted at draft position j
    drafted_per_position: list[int] = field(default_factory=list)  # [j]: proposed at draft position j

    def add(self, step: StepStats) -> None:
        for name in _STEP_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(step, name))
        for counts, n in ((self.drafted_per_position, step.draft_tokens),
                          (self.accepted_per_position, step.accepted_tokens)):
            # Both lists run as far as any draft did, so a position never accepted shows 0.
            if len(counts) < step.draft_tokens:
                counts.extend([0] * (step.draft_tokens - len(counts)))
            for j in range(n):
                counts[j] += 1

    def copy(self) -> "SpecStats":
        return replace(self, accepted_per_position=list(self.accepted_per_position),
                       drafted_per_position=list(self.drafted_per_position))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens produced per verify step, the bonus token included."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["acceptance_rate"] = self.acceptance_rate
        d["mean_accepted_length"] = self.mean_accepted_length
        return d

    def report(self) -> dict:
        """The speculative details a response carries: every counter but ``UNREPORTED``."""
        return {k: v for k, v in self.to_dict().items() if k not in UNREPORTED}


@dataclass
class StepEvent:
    """One verify step's output, as the generator yields it."""

    tokens: list[int]  # newly generated tokens (accepted drafts + bonus), after stop handling
    # The log-probability of each under the distribution it was chosen from:
    # penalties applied, then (sampling) temperature, top-k and top-p.
    logprobs: list[float]
    # Text released with each token: whole UTF-8 only, and text that could
    # still turn into a stop sequence is held back (so often ""). The last
    # event's last entry also carries what was held back and is now final.
    # The stop sequence itself is never included.
    texts: list[str]
    finish_reason: str | None  # set on the last event only
    stats: SpecStats  # running totals for the request so far
    step: StepStats = field(default_factory=StepStats)  # what this event's step did
    # With params.top_n: per token, the top_n (token id, log-probability)
    # pairs of the distribution it was chosen from, most likely first.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # With params.prompt_logprobs, on the first event only: per prompt token,
    # its log-probability under the model given the tokens before it (None
    # for the first), and its top_n alternatives there.
    prompt: "PromptScores | None" = None


@dataclass
class PromptScores:
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]


def extend_costs(verify_ms: Sequence[float], n: int) -> list[float]:
    """``verify_ms`` (ms for a forward over T = 1, 2, ... positions) up to T
    = n, extrapolating its last step where it is shorter."""
    v = [float(x) for x in verify_ms]
    if not v or v[0] <= 0:
        raise ValueError(f"verify_ms must start with a positive forward time, got {v}")
    while len(v) < n:
        v.append(v[-1] + (v[-1] - v[-2] if len(v) > 1 else 0.0))
    return v


def fastest_length(acceptance: Sequence[float], verify_ms: Sequence[float]) -> tuple[int, float]:
    """(draft length k from 0 to len(acceptance), verify ms per generated
    token at that length) for the length with the fewest ms per token.

    ``acceptance[i]`` is the chance that draft i is accepted when the drafts
    before it were; ``verify_ms[k]`` what a step that drafts k tokens costs
    (T = k + 1 positions, extended past its end by ``extend_costs``). A step
    yields its accepted drafts plus the model's own token."""
    v = extend_costs(verify_ms, len(acceptance) + 1)
    best_k, best = 0, v[0]
    alive = tokens = 1.0
    for k, p in enumerate(acceptance, start=1):
        alive *= p
        tokens += alive
        if v[k] / tokens < best:
            best_k, best = k, v[k] / tokens
    return best_k, best



class StatelessDrafter:
    """A base for drafters whose proposals depend on nothing but their
    arguments (scripted drafters in tests, simple rules): the drafter is its
    own per-request state. Subclasses set ``name`` and ``k_max`` and define
    ``propose``."""

    name = "stateless"
    k_max = 4

    def open(self) -> "StatelessDrafter":
        return self

    def propose(self, context: list[int], features: ModelFeatures | None, k: int) -> Draft:
        raise NotImplementedError

    def observe(self, drafted: list[int], emitted: list[int]) -> None:
        pass

    def describe(self) -> dict:
        return {"k_max": self.k_max}
