"""Per-step statistics as data: every event carries its step's StepStats,
SpecStats sums them, the server's metrics count them, and a response's
speculative details are the stats' own report. Also the serving layer
without HTTP, and the one request check shared by admission and the loop."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from treespec.draft.loop import check_request, generate
from treespec.draft.ngram import NgramDrafter
from treespec.draft.types import UNREPORTED, SamplingParams, SpecStats, StepStats
from treespec.model import Tokenizer

from conftest import REPO, tiny_model


@pytest.fixture(scope="module")
def tok(ranks_path):
    return Tokenizer(ranks_path)


@pytest.fixture(scope="module")
def looping():
    torch.manual_seed(0)
    return tiny_model(seed=0)  # tied embeddings: it repeats itself, so prompt lookup drafts and is accepted


def test_events_steps_sum_to_the_running_totals(tok, looping):
    params = SamplingParams(max_new_tokens=30)
    events = list(generate(looping, [5, 6, 7, 5, 6], params, NgramDrafter(k_max=4), tokenizer=tok))
    total = SpecStats(drafter="ngram", prompt_tokens=5)
    for ev in events:
        total.add(ev.step)
        assert ev.step.generated_tokens == len(ev.tokens)
        assert ev.stats.draft_tokens == total.draft_tokens and ev.stats.accepted_tokens == total.accepted_tokens
    last = events[-1].stats
    assert last.draft_tokens > 0 and last.accepted_tokens > 0  # the case means something
    assert total.to_dict() | {"prefill_time_s": 0} == last.to_dict() | {"prefill_time_s": 0}
    assert events[0].step.verify_steps == 0 and all(ev.step.verify_steps == 1 for ev in events[1:])
    assert sum(ev.step.accepted_tokens for ev in events) == last.accepted_tokens


def test_spec_stats_counts_positions_as_far_as_any_draft_reached():
    s = SpecStats()
    s.add(StepStats(verify_steps=1, draft_tokens=3, accepted_tokens=1))
    s.add(StepStats(verify_steps=1, draft_tokens=2, accepted_tokens=2))
    assert s.drafted_per_position == [2, 2, 1] and s.accepted_per_position == [2, 1, 0]
    assert (s.verify_steps, s.draft_tokens, s.accepted_tokens) == (2, 5, 3)
    assert s.mean_accepted_length == pytest.approx(2.5) and s.acceptance_rate == pytest.approx(0.6)


def test_every_step_counter_is_summed_reported_and_exported():
    """A counter added to StepStats reaches SpecStats, the response, and a Prometheus series."""
    from treespec.server import protocol
    from treespec.server.metrics import Metrics

    counters = [f.name for f in dataclasses.fields(StepStats) if f.type in ("int", int)]
    reported = set(protocol.Speculative.model_fields)
    for name in counters:
        if name not in UNREPORTED:
            assert name in reported, name
    m = Metrics(drafters=("x",))
    assert set(counters) <= set(m.step_counters), "a StepStats counter has no Prometheus series"
    values = {name: i + 1 for i, name in enumerate(counters)}
    values["draft_tokens"] = 20  # a distinct value for every counter, and no more accepted than drafted
    step = StepStats(**values)
    m.observe_step("x", step)
    m.observe_step("x", step)
    for name in counters:
        assert m.step_counters[name].labels("x")._value.get() == 2 * values[name], name
    assert m.num_drafts.labels("x")._value.get() == 2
    assert m.num_drafted_per_pos.labels("x", str(step.draft_tokens - 1))._value.get() == 2
    stats = SpecStats(drafter="x")
    stats.add(step)
    body = protocol.Speculative(**stats.report()).model_dump()
    assert body["drafter"] == "x" and body["draft_tokens"] == step.draft_tokens
    assert not set(UNREPORTED) & set(body)


def test_admission_and_the_loop_share_one_check(tok, looping):
    block, n_vocab = looping.config.block_size, tok.n_vocab
    bad = [([], SamplingParams(), "token list is empty"),
           ([n_vocab], SamplingParams(), "prompt token ids"),
           ([1] * (block - 2), SamplingParams(max_new_tokens=8), "exceeds the model's context"),
           ([1], SamplingParams(max_new_tokens=block), "max_new_tokens must be <="),
           ([1], SamplingParams(logit_bias={n_vocab + 3: 1.0}), "logit_bias token ids"),
           ([1], SamplingParams(temperature=-1.0), "temperature")]
    for prompt, params, words in bad:
        with pytest.raises(ValueError, match=words):
            check_request(prompt, params, block, n_vocab)
        with pytest.raises(ValueError, match=words):
            generate(looping, prompt, params, tokenizer=tok)


def test_serving_builds_responses_without_http(tiny_bundle):
    """The serving layer runs against a real scheduler, no HTTP: a TGI request
    in, its response and its speculative details out, as data."""
    from treespec.server import protocol
    from treespec.server.metrics import Metrics
    from treespec.server.scheduler import Scheduler
    from treespec.server.serving import Serving
    from treespec.server.settings import Settings

    settings = Settings(bundle=str(tiny_bundle), dtype="float32", calibrate_drafter=False)
    scheduler = Scheduler(settings, Metrics())
    scheduler.load()
    serving = Serving(scheduler, settings, scheduler.metrics)
    try:
        req = protocol.GenerateRequest.model_validate(
            {"inputs": "def f(x):", "parameters": {"max_new_tokens": 6, "details": True, "drafter": "ngram"}})
        state = SimpleNamespace()

        async def run():
            job = await serving.generate(req, state)
            return await serving.generate_response(req, job)

        body = asyncio.run(run())
        assert state.drafter == "ngram"
        d = body.details
        assert d.generated_tokens == len(d.tokens) == 6 and d.finish_reason == "length"
        sp = d.speculative
        assert sp.drafter == "ngram" and sp.verify_steps + sp.accepted_tokens == 5  # the prefill made the first
        assert body.generated_text == "".join(t.text for t in d.tokens)
        info = serving.info()
        assert info["drafters"]["settings"]["ngram"] == NgramDrafter().describe()
    finally:
        scheduler.shutdown(0)


def test_the_scheduler_reports_and_warns_when_other_processes_take_its_cpus(tiny_bundle, monkeypatch, caplog):
    """Every CPU_CHECK_S the share of its CPUs other processes took goes to a
    gauge; past BUSY_SHARE, and only if it decoded meanwhile, to a warning, at
    most one per CPU_WARN_EVERY_S."""
    import logging
    import time

    from treespec.server import scheduler as sched
    from treespec.server.metrics import Metrics
    from treespec.server.settings import Settings

    busy = [0.7]

    class Share:
        def others(self):
            return busy[0]

    monkeypatch.setattr(sched, "CpuShare", Share)
    monkeypatch.setattr(sched, "CPU_CHECK_S", 0.02)
    settings = Settings(bundle=str(tiny_bundle), dtype="float32", calibrate_drafter=False)
    scheduler = sched.Scheduler(settings, Metrics())
    gauge = scheduler.metrics.cpu_busy_others

    def warnings_after(seconds: float) -> list[str]:
        time.sleep(seconds)
        return [r.getMessage() for r in caplog.records if "CPUs busy while it decoded" in r.getMessage()]

    def decode():
        prepared = scheduler.prepare("def f(x):", SamplingParams(max_new_tokens=8), "none")

        async def run():
            return [ev async for ev in scheduler.submit(prepared).events()]

        assert asyncio.run(run())[-1].finish_reason == "length"

    with caplog.at_level(logging.WARNING, logger="treespec.server"):
        scheduler.load()
        try:
            assert warnings_after(0.2) == [] and gauge._value.get() == 0.7  # busy, but nothing was decoding
            decode()
            warned = warnings_after(0.2)
            assert len(warned) == 1 and "70%" in warned[0], warned
            decode()
            assert len(warnings_after(0.2)) == 1  # not again within CPU_WARN_EVERY_S
            busy[0] = 0.05
            assert warnings_after(0.2) and gauge._value.get() == 0.05
        finally:
            scheduler.shutdown(0)


def test_the_documented_drafter_example_serves_through_the_registry(tok, looping, monkeypatch):
    """docs/architecture.md's example drafter, as written there: registered with one
    FACTORIES entry, it is served by name, keeps greedy output exact, and its
    per-request state sees each verify's outcome."""
    import re

    from treespec.draft import registry
    from treespec.draft.loop import generate_all

    text = (REPO / "docs" / "architecture.md").read_text()
    code = re.search(r"## Writing a drafter.*?```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), ns)
    monkeypatch.setitem(registry.FACTORIES, "repeat", lambda bundle, calibrate: ns["RepeatDrafter"]())
    drafter = registry.make_drafter("repeat")
    states = []
    real_open = type(drafter).open
    monkeypatch.setattr(type(drafter), "open", lambda self: states.append(real_open(self)) or states[-1])
    params = SamplingParams(max_new_tokens=30)
    for prompt in ([7, 7, 7, 7], [5, 6, 7, 5, 6]):
        ref = generate_all(looping, prompt, params, tokenizer=tok)
        got = generate_all(looping, prompt, params, drafter, tokenizer=tok)
        assert got.token_ids == ref.token_ids
        state = states[-1]
        assert state.drafted == got.stats.draft_tokens and state.accepted == got.stats.accepted_tokens
    assert len(states) == 2 and states[0] is not states[1]  # one state per request
    assert sum(s.drafted for s in states) > 0
