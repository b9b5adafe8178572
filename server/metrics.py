"""Every Prometheus object the server has, and nothing else does.

Names follow vLLM's (``vllm:spec_decode_num_accepted_tokens_total`` becomes
``treespec_spec_decode_num_accepted_tokens_total``), so PromQL written for
vLLM dashboards carries over by swapping the prefix. Each series that
depends on the drafter carries a ``drafter`` label.

The decode loop reports data (a ``StepStats`` per step, ``SpecStats`` per
request); ``observe_step`` and the scheduler turn it into series. A new
step counter is a field of StepStats and an entry in ``step_counters``. Metrics live in their own
registry, so two apps in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from treespec.draft.types import StepStats

# Latency buckets from 1 ms (a tiny model's step) to a few minutes (a long
# generation on CPU).
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
            5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_E2E = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0, 480.0)
_RATE = tuple(i / 10 for i in range(1, 11))
_LENGTH = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


# Every label value known up front, so each series exists at zero from the
# first scrape (as Prometheus advises): a rate() or a dashboard panel on a
# healthy server then shows 0, not "no data".
FAILURE_REASONS = ("validation", "too_large", "unauthorized", "overloaded", "unavailable", "cancelled",
                   "disconnected", "internal")
FINISH_REASONS = ("length", "eos_token", "stop_sequence")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, drafters: tuple[str, ...] | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry()
        D = ["drafter"]
        # Speculation, per verify step (vLLM's spec_decode counters).
        self.num_drafts = Counter("treespec_spec_decode_num_drafts", "Verify steps that checked at least one drafted token", D, registry=r)
        self.num_draft_tokens = Counter("treespec_spec_decode_num_draft_tokens", "Tokens proposed by the drafter", D, registry=r)
        self.num_accepted_tokens = Counter("treespec_spec_decode_num_accepted_tokens", "Drafted tokens the model accepted (bonus tokens excluded)", D, registry=r)
        self.num_accepted_per_pos = Counter("treespec_spec_decode_num_accepted_tokens_per_pos", "Drafted tokens accepted at each draft position (0 = first drafted token)", D + ["position"], registry=r)
        self.num_drafted_per_pos = Counter("treespec_spec_decode_num_draft_tokens_per_pos", "Drafted tokens proposed at each draft position", D + ["position"], registry=r)
        self.model_handbacks = Counter("treespec_spec_decode_model_handbacks", "Drafts that ended because the tree predicted __MODEL__", D, registry=r)
        self.skipped_proposals = Counter("treespec_spec_decode_skipped_proposals", "Verify steps run without asking the drafter: its recent proposals cost more than they saved (DraftGate)", D, registry=r)
        self.guess_tokens = Counter("treespec_spec_decode_num_guess_tokens", "Of the drafted tokens, corpus guesses: the training corpus's most frequent follower of the newest token, drafted where the drafter had nothing else", D, registry=r)
        self.accepted_guesses = Counter("treespec_spec_decode_num_accepted_guesses", "Of the accepted tokens, corpus guesses", D, registry=r)
        self.fallback_tokens = Counter("treespec_spec_decode_num_fallback_tokens", "Of the drafted tokens, those the gate's fallback (prompt lookup) drafted while the drafter was not asked", D, registry=r)
        self.accepted_fallback = Counter("treespec_spec_decode_num_accepted_fallback_tokens", "Of the accepted tokens, the gate's fallback's", D, registry=r)
        self.verify_steps = Counter("treespec_spec_decode_num_verify_steps", "Model forwards after the prefill (each verifies the last token plus a draft)", D, registry=r)
        # Per request.
        self.acceptance_rate = Histogram("treespec_spec_decode_acceptance_rate", "Per request: accepted / drafted tokens (requests that drafted nothing are not observed)", D, buckets=_RATE, registry=r)
        self.accepted_length = Histogram("treespec_spec_decode_mean_accepted_length", "Per request: tokens produced per verify step, bonus token included", D, buckets=_LENGTH, registry=r)
        self.ttft = Histogram("treespec_time_to_first_token_seconds", "From arrival to the first generated token", D, buckets=_LATENCY, registry=r)
        self.itl = Histogram("treespec_inter_token_latency_seconds", "Time per generated token after the first (a verify step's time spread over the tokens it produced)", D, buckets=_LATENCY, registry=r)
        self.e2e = Histogram("treespec_e2e_request_latency_seconds", "From arrival to the last token", D, buckets=_E2E, registry=r)
        self.queue_time = Histogram("treespec_request_queue_time_seconds", "From arrival to the start of the prefill", D, buckets=_LATENCY, registry=r)
        self.running = Gauge("treespec_requests_running", "Requests holding a KV cache and taking turns on the model", D, registry=r)
        self.waiting = Gauge("treespec_requests_waiting", "Requests admitted and waiting for a turn", D, registry=r)
        self.prompt_tokens = Counter("treespec_prompt_tokens", "Prompt tokens prefilled", D, registry=r)
        self.generation_tokens = Counter("treespec_generation_tokens", "Tokens generated (counted as each verify step produces them)", D, registry=r)
        self.success = Counter("treespec_request_success", "Requests that finished", D + ["finish_reason"], registry=r)
        self.failure = Counter("treespec_request_failure", "Requests that did not finish: validation, too_large, unauthorized, overloaded, unavailable, cancelled, disconnected, internal", D + ["reason"], registry=r)
        self.batch_size = Histogram("treespec_batch_size", "Requests whose forwards ran together in one model forward (continuous batching)", buckets=tuple(float(2 ** i) for i in range(8)), registry=r)
        self.batch_tokens = Histogram("treespec_batch_tokens", "Token rows in one model forward, over all its requests (prompt chunks and verified drafts included)", buckets=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0), registry=r)
        self.kv_cache_bytes = Gauge("treespec_kv_cache_bytes", "Bytes held by the KV caches of live requests", registry=r)
        self.cpu_busy_others = Gauge("treespec_cpu_busy_other_processes", "Share (0-1) of this server's CPUs that other processes kept busy over the last 10 s; past 0.25 its decode steps can run many times slower (docs/performance.md, Sharing the CPU)", registry=r)
        # StepStats field -> the counter it adds to, every step.
        self.step_counters = {
            "verify_steps": self.verify_steps, "generated_tokens": self.generation_tokens,
            "draft_tokens": self.num_draft_tokens, "accepted_tokens": self.num_accepted_tokens,
            "model_handbacks": self.model_handbacks, "skipped_proposals": self.skipped_proposals,
            "guess_tokens": self.guess_tokens, "accepted_guesses": self.accepted_guesses,
            "fallback_tokens": self.fallback_tokens, "accepted_fallback": self.accepted_fallback,
        }
        self._initialise(drafters)

    def observe_step(self, drafter: str, step: StepStats) -> None:
        """Count what one step of a request's loop did."""
        for name, counter in self.step_counters.items():
            n = getattr(step, name)
            if n:
                counter.labels(drafter).inc(n)
        if step.draft_tokens:
            self.num_drafts.labels(drafter).inc()
        for j in range(step.draft_tokens):
            self.num_drafted_per_pos.labels(drafter, str(j)).inc()
        for j in range(step.accepted_tokens):
            self.num_accepted_per_pos.labels(drafter, str(j)).inc()

    def _initialise(self, drafters: tuple[str, ...] | None) -> None:
        if drafters is None:
            from treespec.draft.registry import DRAFTERS as drafters
        for d in drafters:
            for reason in FAILURE_REASONS:
                self.failure.labels(d, reason)
            for reason in FINISH_REASONS:
                self.success.labels(d, reason)
            for family in (self.num_drafts, *self.step_counters.values(), self.prompt_tokens, self.running,
                           self.waiting):
                family.labels(d)
        for reason in FAILURE_REASONS:  # errors before a drafter is known (bad JSON, 401, ...)
            self.failure.labels("unknown", reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
