"""The generation loop: speculative decoding must be exactly vanilla decoding.

Greedy: token for token, for every drafter, including an oracle that is
always right and one that is always wrong (which also pins tau). Sampling:
the distribution of the first sampled tokens matches the model's exact
distribution (chi-square), and a deliberately wrong acceptance rule fails
the same test.
"""

import copy
import math

import pytest
import torch
from scipy.stats import chi2

from treespec.draft.corpus import CorpusBigram
from treespec.draft.gate import GatedDrafter
from treespec.draft.loop import generate, generate_all, generate_steps
from treespec.draft.ngram import NgramDrafter
from treespec.draft.sampling import accept_sampled, probs_from_logits, sample
from treespec.draft.types import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Draft,
                                  SamplingParams, StatelessDrafter, StepEvent)
from treespec.model import Tokenizer

from conftest import tiny_model

N_VOCAB = 50257


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny forwards are all overhead; a second OpenMP thread only spins
    # waiting for a core that the training run is using.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(ranks_path):
    return Tokenizer(ranks_path)


# Tied embeddings make a random model repeat itself (prompt lookup then
# accepts a lot); untied ones give long non-repeating output.
@pytest.fixture(scope="module")
def looping():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def wandering():
    return tiny_model(seed=1, tie_embeddings=False)


def random_prompts(n: int, seed: int, lo: int = 1, hi: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, N_VOCAB - 1, (L,), generator=g).tolist() for L in lens]


def corpus_guesser(model, tok, k_max: int = 4) -> NgramDrafter:
    """Prompt lookup with a corpus bigram (the tree's fallback): the table
    counted on the model's own greedy text, so some guesses are right, and
    a fixed scramble for every token that text never had, so a guess is
    drafted wherever the context has nothing to copy."""
    text = []
    for prompt in random_prompts(4, seed=99):
        text += prompt + generate_all(model, prompt, SamplingParams(max_new_tokens=24), tokenizer=tok).token_ids
    table = CorpusBigram.count(torch.tensor(text).numpy(), N_VOCAB, min_count=1)
    missing = table.follower < 0
    table.follower[missing] = (torch.arange(N_VOCAB).numpy()[missing] * 7919 + 1) % N_VOCAB
    table.share[missing] = 0.1
    return NgramDrafter(k_max=k_max, corpus=CorpusBigram(table.follower, table.share))


class Oracle(StatelessDrafter):
    """Proposes the vanilla continuation: ``mode`` "right" as is, "wrong"
    with every token shifted (never the argmax), "partial" right for a
    varying number of positions and then wrong (forces rollbacks)."""

    name = "oracle"

    def __init__(self, reference: list[int], prompt_len: int, k_max: int, mode: str = "right"):
        self.ref, self.P, self.k_max, self.mode = reference, prompt_len, k_max, mode
        self.calls = []

    def propose(self, context, features, k_max):
        done = len(context) - self.P
        assert context[self.P:] == self.ref[:done], "generation diverged from vanilla"
        self.calls.append((list(context), features, k_max))
        out = self.ref[done:done + k_max]
        n_right = {"right": len(out), "wrong": 0, "partial": done % (k_max + 1)}[self.mode]
        return Draft(tokens=out[:n_right] + [(t + 1) % N_VOCAB for t in out[n_right:]])


# --- greedy losslessness ----------------------------------------------------

@pytest.mark.parametrize("model_name", ["looping", "wandering"])
def test_greedy_speculative_equals_vanilla(request, tok, model_name):
    model = request.getfixturevalue(model_name)
    params = SamplingParams(max_new_tokens=24)
    accepted = 0
    guesser, guessed = corpus_guesser(model, tok), 0
    for prompt in random_prompts(10, seed=len(model_name)):
        ref = generate_all(model, prompt, params, tokenizer=tok)
        assert ref.finish_reason == FINISH_LENGTH and len(ref.token_ids) == 24
        drafters = [NgramDrafter(k_max=3), NgramDrafter(k_max=6), guesser, Oracle(ref.token_ids, len(prompt), 4, "partial"),
                    Oracle(ref.token_ids, len(prompt), 5, "right"), Oracle(ref.token_ids, len(prompt), 2, "wrong")]
        for d in drafters:
            got = generate_all(model, prompt, params, d, tokenizer=tok)
            assert got.token_ids == ref.token_ids, d.name
            assert got.text == ref.text
            assert got.finish_reason == ref.finish_reason
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
            accepted += got.stats.accepted_tokens
            if d is guesser:
                guessed += got.stats.guess_tokens
                assert got.stats.accepted_guesses <= got.stats.guess_tokens <= got.stats.draft_tokens
            else:
                assert got.stats.guess_tokens == got.stats.accepted_guesses == 0
    assert accepted > 0 and guessed > 0


@pytest.mark.parametrize("model_name", ["looping", "wandering"])
def test_seeded_sampling_gives_vanilla_tokens_with_every_drafter(request, tok, model_name):
    """The random numbers belong to output positions, not to calls: with one
    seed, every deterministic drafter yields vanilla sampling's tokens, and an
    oracle of that sampled run is always accepted (tau = k + 1 at T = 0.9)."""
    model = request.getfixturevalue(model_name)
    outputs = set()
    guesser, guessed = corpus_guesser(model, tok), 0
    for i, prompt in enumerate(random_prompts(8, seed=20 + len(model_name))):
        params = SamplingParams(max_new_tokens=21, temperature=0.9, top_k=100, top_p=0.95, seed=100 + i)
        ref = generate_all(model, prompt, params, tokenizer=tok)
        outputs.add(tuple(ref.token_ids))
        for d in (NgramDrafter(k_max=4), guesser, Oracle(ref.token_ids, len(prompt), 4, "partial"),
                  Oracle(ref.token_ids, len(prompt), 2, "wrong")):
            got = generate_all(model, prompt, params, d, tokenizer=tok)
            assert got.token_ids == ref.token_ids, d.name
            guessed += got.stats.guess_tokens if d is guesser else 0
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
        right = generate_all(model, prompt, params, Oracle(ref.token_ids, len(prompt), 4, "right"), tokenizer=tok)
        assert right.token_ids == ref.token_ids
        assert right.stats.accepted_tokens == right.stats.draft_tokens == 4 * right.stats.verify_steps == 16
    assert len(outputs) == 8  # and the seeds do sample different continuations
    assert guessed > 0


# --- penalties ----------------------------------------------------------------

PENALTIES = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.7, presence_penalty=0.4),
             dict(repetition_penalty=0.8, presence_penalty=-0.5),
             # OpenAI's logit_bias, alone and under a penalty: a token pushed up, one banned, one nudged
             dict(logit_bias={7: 6.0, 11: -100.0, 3: 2.5}), dict(logit_bias={5: 4.0}, repetition_penalty=1.2)]


def naive_penalised(model, prompt: list[int], n: int, rep: float = 1.0, freq: float = 0.0,
                    pres: float = 0.0, bias: dict | None = None) -> list[int]:
    """Greedy decoding the slow, obvious way: a full forward over the whole
    context each step and the bias and penalties written out token by token."""
    context = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            z = model(torch.tensor([context])).logits[-1][0, -1, :N_VOCAB].double().clone()
        for t, b in (bias or {}).items():
            z[t] += b
        generated = context[len(prompt):]
        for t in set(context):
            z[t] = z[t] / rep if z[t] > 0 else z[t] * rep
        for t in set(generated):
            z[t] -= freq * generated.count(t) + pres
        context.append(int(z.argmax()))
    return context[len(prompt):]


@pytest.mark.parametrize("penalty", PENALTIES)
def test_penalised_greedy_is_the_penalised_argmax(tok, looping, penalty):
    changed = 0
    for prompt in random_prompts(4, seed=7):
        params = SamplingParams(max_new_tokens=16, **penalty)
        got = generate_all(looping, prompt, params, tokenizer=tok).token_ids
        want = naive_penalised(looping, prompt, 16, penalty.get("repetition_penalty", 1.0),
                               penalty.get("frequency_penalty", 0.0), penalty.get("presence_penalty", 0.0),
                               penalty.get("logit_bias"))
        if 11 in penalty.get("logit_bias", {}):
            assert 11 not in got  # -100 bans it
        assert got == want
        changed += got != generate_all(looping, prompt, SamplingParams(max_new_tokens=16), tokenizer=tok).token_ids
    assert changed >= 2  # the penalty does change what this repetitive model writes


def test_repetition_penalty_breaks_a_loop(tok, looping):
    prompt = random_prompts(1, seed=3)[0]
    plain = generate_all(looping, prompt, SamplingParams(max_new_tokens=40), tokenizer=tok).token_ids
    penal = generate_all(looping, prompt, SamplingParams(max_new_tokens=40, repetition_penalty=1.5),
                         tokenizer=tok).token_ids
    assert len(set(penal)) > len(set(plain))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_speculation_is_lossless_with_penalties(tok, looping, wandering, penalty):
    """Row j of a verify step is penalised for the context plus drafts[:j], so
    every drafter reproduces penalised vanilla decoding, greedy and seeded."""
    accepted = 0
    for model in (looping, wandering):
        guesser = corpus_guesser(model, tok)
        for i, prompt in enumerate(random_prompts(3, seed=11)):
            for params in (SamplingParams(max_new_tokens=20, **penalty),
                           SamplingParams(max_new_tokens=20, temperature=0.9, top_k=100, seed=i, **penalty)):
                ref = generate_all(model, prompt, params, tokenizer=tok)
                for d in (NgramDrafter(k_max=4), guesser, Oracle(ref.token_ids, len(prompt), 4, "partial"),
                          Oracle(ref.token_ids, len(prompt), 5, "right")):
                    got = generate_all(model, prompt, params, d, tokenizer=tok)
                    assert got.token_ids == ref.token_ids, (d.name, params)
                    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs),
                                               atol=1e-4, rtol=0)
                    accepted += got.stats.accepted_tokens
    assert accepted > 0


def test_penalties_are_validated(tok, looping):
    for bad, msg in ((dict(repetition_penalty=0.0), "repetition_penalty must be >= 0.01"),
                     # 1e-39 would overflow a logit divided by it: NaN probabilities
                     (dict(repetition_penalty=1e-39), "repetition_penalty must be >= 0.01"),
                     (dict(frequency_penalty=2.5), "frequency_penalty must be in"),
                     (dict(presence_penalty=-3.0), "presence_penalty must be in"),
                     (dict(logit_bias={4: 100.5}), "logit_bias values must be in")):
        with pytest.raises(ValueError, match=msg):
            generate(looping, [1, 2], SamplingParams(max_new_tokens=2, **bad), tokenizer=tok)


def test_extreme_sampling_values_give_finite_tokens_and_log_probabilities(tok, looping):
    """Values at float32's edge: a temperature too small to divide by decodes greedily
    (as vLLM), and a top_p that flushes to zero keeps the most likely token. Never NaN."""
    import math

    prompt = random_prompts(1, seed=5)[0]
    greedy = generate_all(looping, prompt, SamplingParams(max_new_tokens=12, top_n=3), tokenizer=tok)
    for params in (SamplingParams(max_new_tokens=12, temperature=1e-39, seed=1, top_n=3),
                   SamplingParams(max_new_tokens=12, temperature=9e-6, seed=1, top_n=3)):
        assert params.greedy
        got = generate_all(looping, prompt, params, tokenizer=tok)
        assert got.token_ids == greedy.token_ids and got.logprobs == greedy.logprobs
    tiny_p = generate_all(looping, prompt, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-45,
                                                          seed=1, top_n=3), tokenizer=tok)
    assert tiny_p.token_ids == greedy.token_ids  # only the top token is left to sample
    assert tiny_p.logprobs == [0.0] * 12  # and it has all the mass
    assert all(math.isfinite(v) for v in greedy.logprobs + tiny_p.logprobs)


# --- reported log-probabilities ----------------------------------------------------

def test_top_logprobs_are_the_models_and_the_same_with_every_drafter(tok, looping):
    for prompt in random_prompts(3, seed=5):
        params = SamplingParams(max_new_tokens=12, top_n=4, repetition_penalty=1.2)
        ref = generate_all(looping, prompt, params, tokenizer=tok)
        assert len(ref.top_logprobs) == len(ref.token_ids) == 12
        context = list(prompt)
        for t, lp, top in zip(ref.token_ids, ref.logprobs, ref.top_logprobs):
            with torch.no_grad():
                z = looping(torch.tensor([context])).logits[-1][0, -1, :N_VOCAB].double()
            for u in set(context):  # the penalty the request asked for, written out
                z[u] = z[u] / 1.2 if z[u] > 0 else z[u] * 1.2
            want = torch.log_softmax(z, dim=-1)
            vals, ids = torch.topk(want, 4)
            assert [i for i, _ in top] == ids.tolist()
            assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=1e-4)
            assert top[0] == (t, pytest.approx(lp, abs=1e-6))  # greedy: the token is the most likely
            context.append(t)
        for d in (NgramDrafter(k_max=4), Oracle(ref.token_ids, len(prompt), 4, "partial")):
            got = generate_all(looping, prompt, params, d, tokenizer=tok)
            assert got.token_ids == ref.token_ids
            assert got.stats.accepted_tokens > 0 or d.name == "ngram"  # the oracle's drafts were verified in bulk
            assert [[i for i, _ in r] for r in got.top_logprobs] == [[i for i, _ in r] for r in ref.top_logprobs]
            torch.testing.assert_close(torch.tensor([[v for _, v in r] for r in got.top_logprobs]),
                                       torch.tensor([[v for _, v in r] for r in ref.top_logprobs]), atol=1e-4, rtol=0)
    assert generate_all(looping, [1, 2], SamplingParams(max_new_tokens=3), tokenizer=tok).top_logprobs == []


def test_sampled_top_logprobs_leave_out_what_top_k_cut(tok, looping):
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=3, top_n=5, seed=1)
    res = generate_all(looping, [5, 6, 7], params, tokenizer=tok)
    for t, lp, top in zip(res.token_ids, res.logprobs, res.top_logprobs):
        assert 1 <= len(top) <= 3 and t in [i for i, _ in top]
        assert math.fsum(math.exp(v) for _, v in top) == pytest.approx(1.0, abs=1e-5)  # top-3 holds all of p
        assert dict(top)[t] == pytest.approx(lp, abs=1e-6)


def test_prompt_logprobs_score_the_prompt_and_change_nothing_else(tok, wandering):
    prompt = random_prompts(1, seed=8, lo=10, hi=10)[0]
    plain = generate_all(wandering, prompt, SamplingParams(max_new_tokens=8), tokenizer=tok)
    scored = generate_all(wandering, prompt, SamplingParams(max_new_tokens=8, prompt_logprobs=True, top_n=2),
                          NgramDrafter(k_max=3), tokenizer=tok)
    assert scored.token_ids == plain.token_ids and plain.prompt is None
    with torch.no_grad():
        logp = torch.log_softmax(wandering(torch.tensor([prompt])).logits[-1][0, :, :N_VOCAB].double(), dim=-1)
    want = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert scored.prompt.logprobs[0] is None and len(scored.prompt.logprobs) == len(prompt)
    assert scored.prompt.logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert scored.prompt.top_logprobs[0] == [] and len(scored.prompt.top_logprobs) == len(prompt)
    for i, top in enumerate(scored.prompt.top_logprobs[1:]):
        assert [t for t, _ in top] == torch.topk(logp[i], 2).indices.tolist()
    one = generate_all(wandering, [42], SamplingParams(max_new_tokens=2, prompt_logprobs=True), tokenizer=tok)
    assert one.prompt.logprobs == [None]
    # max_new_tokens 0: the prompt's scores and nothing else; without scoring it is refused.
    only = generate_all(wandering, prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=True, top_n=2),
                        tokenizer=tok)
    assert only.token_ids == [] and only.text == "" and only.finish_reason == FINISH_LENGTH
    assert only.prompt.logprobs == scored.prompt.logprobs and only.stats.verify_steps == 0
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(wandering, prompt, SamplingParams(max_new_tokens=0), tokenizer=tok)


@pytest.mark.parametrize("k,steps", [(1, 6), (3, 4), (4, 3)])
def test_tau_is_k_plus_1_when_always_right_and_1_when_always_wrong(tok, wandering, k, steps):
    # One token from the prefill, then `steps` verify steps of k + 1 tokens.
    params = SamplingParams(max_new_tokens=1 + steps * (k + 1))
    for prompt in random_prompts(4, seed=10 + k):
        ref = generate_all(wandering, prompt, params, tokenizer=tok)
        right = generate_all(wandering, prompt, params, Oracle(ref.token_ids, len(prompt), k, "right"),
                             tokenizer=tok)
        assert right.token_ids == ref.token_ids
        s = right.stats
        assert s.verify_steps == steps and s.accepted_tokens == steps * k == s.draft_tokens
        assert s.mean_accepted_length == k + 1
        assert s.acceptance_rate == 1.0
        assert s.drafted_per_position == s.accepted_per_position == [steps] * k

        wrong = generate_all(wandering, prompt, params, Oracle(ref.token_ids, len(prompt), k, "wrong"),
                             tokenizer=tok)
        assert wrong.token_ids == ref.token_ids
        s = wrong.stats
        assert s.verify_steps == params.max_new_tokens - 1 and s.accepted_tokens == 0
        assert s.mean_accepted_length == 1.0
        # the last step has room for its own token only, so nothing is drafted there
        assert s.accepted_per_position == [0] * k and s.drafted_per_position[0] == s.verify_steps - 1


def test_events_prefill_first_then_one_per_verify_step(tok, looping):
    prompt = random_prompts(1, seed=5)[0]
    events = list(generate(looping, prompt, SamplingParams(max_new_tokens=20), NgramDrafter(), tokenizer=tok))
    assert len(events[0].tokens) == 1 and events[0].stats.verify_steps == 0
    assert events[0].stats.prefill_time_s > 0
    assert [e.stats.verify_steps for e in events] == list(range(len(events)))
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason == FINISH_LENGTH
    assert all(len(e.tokens) == len(e.texts) == len(e.logprobs) for e in events)
    last = events[-1].stats
    assert sum(len(e.tokens) for e in events) == last.generated_tokens == 20
    assert last.verify_time_s > 0 and last.drafter_time_s > 0 and last.drafter == "ngram"
    assert last.accepted_tokens + last.verify_steps + 1 == 20  # the loop accepts whole drafts


def drive_batched(model, requests, tok) -> list[list[int]]:
    """Run several requests' loops (generate_steps) the way the server does:
    each goes on to its next Forward, then all of those run as one forward_batch."""
    steps = [generate_steps(model, p, params, d, tokenizer=tok) for p, params, d in requests]
    tokens, pending, outputs = [[] for _ in steps], [None] * len(steps), [None] * len(steps)
    live = set(range(len(steps)))
    while live:
        for i in sorted(live):
            try:
                item = steps[i].send(outputs[i]) if pending[i] is not None else next(steps[i])
                while isinstance(item, StepEvent):
                    tokens[i] += item.tokens
                    item = next(steps[i])
                pending[i] = item
            except StopIteration:
                live.discard(i)
        batch = sorted(i for i in live)
        if batch:
            outs = model.forward_batch([(pending[i].ids, pending[i].start, pending[i].cache, pending[i].last_only)
                                        for i in batch])
            for i, o in zip(batch, outs):
                outputs[i] = o
    return tokens


@pytest.mark.parametrize("model_name", ["looping", "wandering"])
def test_requests_batched_together_give_their_solo_tokens(request, tok, model_name):
    model = request.getfixturevalue(model_name)
    prompts = random_prompts(4, seed=31)
    guesser = corpus_guesser(model, tok)
    requests = [(prompts[0], SamplingParams(max_new_tokens=20), NgramDrafter(k_max=4)),
                (prompts[1], SamplingParams(max_new_tokens=12, temperature=0.9, top_k=100, seed=3), guesser),
                (prompts[2], SamplingParams(max_new_tokens=16, prompt_logprobs=True, repetition_penalty=1.2), None),
                (prompts[3], SamplingParams(max_new_tokens=9, temperature=0.8, seed=5), NgramDrafter(k_max=2))]
    solo = [generate_all(model, p, params, d, tokenizer=tok).token_ids for p, params, d in requests]
    assert drive_batched(model, requests, tok) == solo
    assert [len(t) for t in solo] == [20, 12, 16, 9]


# --- KV rollback and the drafter's features ----------------------------------

def test_rollback_after_partial_acceptance_matches_a_fresh_forward(tok, wandering):
    prompt = random_prompts(1, seed=7, lo=6, hi=6)[0]
    params = SamplingParams(max_new_tokens=30)
    ref = generate_all(wandering, prompt, params, tokenizer=tok)
    oracle = Oracle(ref.token_ids, len(prompt), 4, "partial")
    cache = wandering.new_cache()
    got = generate_all(wandering, prompt, params, oracle, tokenizer=tok, cache=cache)
    assert got.token_ids == ref.token_ids
    assert 0 < got.stats.accepted_tokens < got.stats.draft_tokens  # some drafts were rejected

    # Every drafter call saw the model's view at the last accepted position:
    # the logits that chose the newest token, as a fresh forward computes them.
    for context, features, _ in oracle.calls:
        fresh = wandering(torch.tensor([context[:-1]])).logits[-1][0, -1, :N_VOCAB]
        torch.testing.assert_close(features.logits, fresh, atol=1e-4, rtol=1e-4)
        assert int(features.logits.argmax()) == context[-1]
        assert features.hidden.shape == (wandering.config.n_embd,)
        assert len(features.exit_hidden) == len(wandering.config.exit_layers) - 1

    # The cache now holds exactly the context but its last token; one more
    # step over it gives the logits of a fresh forward over the whole text.
    full = prompt + got.token_ids
    assert cache.length == len(full) - 1
    step = wandering.forward_step(torch.tensor([full[-1:]]), len(full) - 1, cache).logits[0, -1]
    fresh = wandering(torch.tensor([full])).logits[-1][0, -1]
    torch.testing.assert_close(step, fresh, atol=1e-4, rtol=1e-4)


# --- stopping -----------------------------------------------------------------

def _cut_inside_a_step(events) -> bool:
    """Did the last verify step accept more tokens than it released?"""
    prev, last = events[-2].stats, events[-1].stats
    produced = last.accepted_tokens - prev.accepted_tokens + 1
    return len(events[-1].tokens) < produced


def _first_new_token_index(ids: list[int], start: int) -> int:
    return next(j for j in range(start, len(ids)) if ids[j] not in ids[:j])


@pytest.mark.parametrize("k", [3, 5])
def test_end_of_text_inside_an_accepted_draft_stops_like_vanilla(tok, wandering, k):
    prompt = random_prompts(1, seed=11)[0]
    params = SamplingParams(max_new_tokens=40)
    ref = generate_all(wandering, prompt, params, tokenizer=tok)
    # Stand in for end-of-text with a token the model emits mid-way, in the
    # middle of a draft (not at a bonus position) for the always-right oracle.
    j = next(j for j in range(4, 40) if ref.token_ids[j] not in ref.token_ids[:j] and (j - 1) % (k + 1) != k)
    eot_tok = copy.copy(tok)
    eot_tok.eot_id = ref.token_ids[j]

    vanilla = generate_all(wandering, prompt, params, tokenizer=eot_tok)
    assert vanilla.finish_reason == FINISH_EOS and vanilla.token_ids == ref.token_ids[:j + 1]
    assert vanilla.text == tok.decode(ref.token_ids[:j])  # end-of-text adds no text
    events = list(generate(wandering, prompt, params, Oracle(ref.token_ids, len(prompt), k), tokenizer=eot_tok))
    assert _cut_inside_a_step(events)
    assert [t for e in events for t in e.tokens] == vanilla.token_ids
    assert "".join(t for e in events for t in e.texts) == vanilla.text
    assert events[-1].finish_reason == FINISH_EOS


def test_stop_string_inside_an_accepted_draft_stops_like_vanilla(tok, wandering):
    prompt = random_prompts(1, seed=12)[0]
    params = SamplingParams(max_new_tokens=40)
    ref = generate_all(wandering, prompt, params, tokenizer=tok)
    # A stop string that spans a token boundary well inside the output.
    pieces = [tok.decode([t]) for t in ref.token_ids]
    j = next(j for j in range(6, 38) if len(pieces[j]) >= 2 and len(pieces[j + 1]) >= 2
             and "".join(pieces[:j + 2]) == tok.decode(ref.token_ids[:j + 2])
             and ref.text.find(pieces[j][-2:] + pieces[j + 1][:2]) == len("".join(pieces[:j + 1])) - 2)
    stop = pieces[j][-2:] + pieces[j + 1][:2]
    expected = ref.text[:ref.text.find(stop)]

    p = SamplingParams(max_new_tokens=40, stop=["never appears", stop])
    vanilla = generate_all(wandering, prompt, p, tokenizer=tok)
    assert vanilla.finish_reason == FINISH_STOP and vanilla.text == expected
    assert vanilla.token_ids == ref.token_ids[:j + 2]
    for k in (2, 3, 4, 5, 6):
        events = list(generate(wandering, prompt, p, Oracle(ref.token_ids, len(prompt), k), tokenizer=tok))
        assert [t for e in events for t in e.tokens] == vanilla.token_ids
        assert "".join(t for e in events for t in e.texts) == expected
        assert events[-1].finish_reason == FINISH_STOP
        assert all(stop not in t for e in events for t in e.texts)
        # Token j + 1 completes the stop; unless it is a step's bonus token,
        # the always-right oracle had drafted past it and the step was cut.
        assert _cut_inside_a_step(events) == (j % (k + 1) != k)


def test_should_stop_cancels_within_one_step(tok, looping):
    prompt = random_prompts(1, seed=13)[0]
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) >= 3

    events = list(generate(looping, prompt, SamplingParams(max_new_tokens=50), NgramDrafter(),
                           tokenizer=tok, should_stop=should_stop))
    assert events[-1].finish_reason == FINISH_CANCELLED and events[-1].tokens == []
    assert events[-1].stats.verify_steps == 2  # polled before each step; the third poll said stop
    assert len(events) == 1 + 2 + 1


def test_prompt_plus_max_new_tokens_must_fit_the_context(tok, looping):
    block = looping.config.block_size
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(looping, [1] * (block - 5), SamplingParams(max_new_tokens=6), tokenizer=tok)  # eagerly
    with pytest.raises(ValueError, match="empty"):
        generate(looping, [], SamplingParams(), tokenizer=tok)
    # exactly at the limit works
    r = generate_all(looping, [1] * (block - 6), SamplingParams(max_new_tokens=6), NgramDrafter(k_max=8),
                     tokenizer=tok)
    assert len(r.token_ids) == 6


# --- sampling exactness -------------------------------------------------------

TEMP, TOP_K, DEPTH, N_SAMPLES = 0.9, 4, 3, 400


@pytest.fixture(scope="module")
def sharp():
    """A tiny model whose top-4 tokens carry clearly different probabilities,
    with the exact distribution of its first three sampled tokens."""
    model = tiny_model(seed=3, n_layer=2, exit_layers=(1, 2))
    with torch.no_grad():
        model.wte.weight.mul_(5.0)
    prompt = [464, 3290, 318, 257, 1332]
    params = SamplingParams(temperature=TEMP, top_k=TOP_K)
    table = {}  # context suffix (generated tokens) -> processed p, from the plain forward

    @torch.no_grad()
    def fill(gen: tuple):
        logits = model(torch.tensor([prompt + list(gen)])).logits[-1][0, -1, :N_VOCAB]
        table[gen] = probs_from_logits(logits, params)
        if len(gen) < DEPTH - 1:
            for t in torch.nonzero(table[gen]).flatten().tolist():
                fill(gen + (t,))

    fill(())
    exact = {}
    for gen in table:
        if len(gen) == DEPTH - 1:
            for t in torch.nonzero(table[gen]).flatten().tolist():
                seq = gen + (t,)
                exact[seq] = float(torch.prod(torch.tensor([table[seq[:i]][seq[i]] for i in range(DEPTH)])))
    assert len(exact) == TOP_K ** DEPTH
    return model, prompt, table, exact


class TableDrafter(StatelessDrafter):
    """Drafts from the exact table: deterministic (the second most likely
    token, then the most likely) or sampled from its own q (uniform over the
    top-4), so both acceptance paths run."""

    name = "table"
    k_max = DEPTH - 1

    def __init__(self, table, prompt_len, sampled: bool, seed: int):
        self.table, self.P, self.sampled = table, prompt_len, sampled
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, context, features, k_max):
        gen, tokens, qs = tuple(context[self.P:]), [], []
        for depth in range(k_max):
            p = self.table[gen]
            if self.sampled:
                q = (p > 0).float()
                q /= q.sum()
                d = sample(q, self.g)
                qs.append(q)
            else:
                d = torch.argsort(p, descending=True)[1 if depth == 0 else 0].item()
            tokens.append(d)
            gen += (d,)
        return Draft(tokens=tokens, q=qs if self.sampled else None)


def accept_always(p, drafts, q, r):
    """Wrong: every draft accepted."""
    return len(drafts), r.token(p[len(drafts)], len(drafts))


def accept_without_residual(p, drafts, q, r):
    """Wrong: accepts d with probability p(d) but then resamples from p with d still in it."""
    for j, d in enumerate(drafts):
        if r.uniform(j) >= float(p[j][d]):
            return j, r.token(p[j], j)
    return len(drafts), r.token(p[len(drafts)], len(drafts))


def chi_square(counts: dict, exact: dict, n: int) -> tuple[float, float]:
    """Pearson's statistic and its 0.1% critical value. Cells expecting
    fewer than 5 are pooled; sequences outside the support land there too."""
    stat, pool_obs, pool_exp, cells = 0.0, 0, 0.0, 0
    for seq, p in exact.items():
        if p * n >= 5:
            stat += (counts.get(seq, 0) - p * n) ** 2 / (p * n)
            cells += 1
        else:
            pool_obs += counts.get(seq, 0)
            pool_exp += p * n
    pool_obs += sum(c for seq, c in counts.items() if seq not in exact)
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        cells += 1
    elif pool_obs:
        stat = float("inf")
    return stat, float(chi2.ppf(0.999, cells - 1))


def sampled_counts(tok, sharp, drafter_kind, accept=accept_sampled) -> dict:
    model, prompt, table, _ = sharp
    params = SamplingParams(max_new_tokens=DEPTH + 1, temperature=TEMP, top_k=TOP_K)
    counts, stats_accepted = {}, 0
    for i in range(N_SAMPLES):
        params.seed = 1000 + i
        drafter = None if drafter_kind is None else TableDrafter(table, len(prompt), drafter_kind == "q", seed=i)
        r = generate_all(model, prompt, params, drafter, tokenizer=tok, accept=accept)
        seq = tuple(r.token_ids[:DEPTH])
        counts[seq] = counts.get(seq, 0) + 1
        stats_accepted += r.stats.accepted_tokens
    if drafter_kind is not None:
        assert stats_accepted > 0
    return counts


def test_exact_distribution_is_not_degenerate(sharp):
    _, _, table, exact = sharp
    assert max(exact.values()) < 0.5 and sorted(table[()].tolist())[-2] > 0.1


@pytest.mark.parametrize("drafter_kind", [None, "deterministic", "q"])
def test_sampling_matches_the_exact_distribution(tok, sharp, drafter_kind):
    counts = sampled_counts(tok, sharp, drafter_kind)
    stat, critical = chi_square(counts, sharp[3], N_SAMPLES)
    print(f"chi2 {drafter_kind}: {stat:.1f} (critical {critical:.1f})")
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize("rule", [accept_always, accept_without_residual])
def test_a_wrong_acceptance_rule_fails_the_same_test(tok, sharp, rule):
    counts = sampled_counts(tok, sharp, "deterministic", accept=rule)
    stat, critical = chi_square(counts, sharp[3], N_SAMPLES)
    print(f"chi2 {rule.__name__}: {stat:.1f} (critical {critical:.1f})")
    assert stat > critical, (stat, critical)


def test_sampling_is_reproducible_per_seed(tok, sharp):
    model, prompt, table, _ = sharp
    params = SamplingParams(max_new_tokens=12, temperature=TEMP, top_k=TOP_K, seed=42)
    a = generate_all(model, prompt, params, NgramDrafter(), tokenizer=tok)
    b = generate_all(model, prompt, params, NgramDrafter(), tokenizer=tok)
    assert a.token_ids == b.token_ids
    draws = {tuple(generate_all(model, prompt, SamplingParams(max_new_tokens=12, temperature=TEMP, top_k=TOP_K,
                                                              seed=s), tokenizer=tok).token_ids) for s in range(6)}
    assert len(draws) > 1


# --- the draft gate -------------------------------------------------------------

class CostedOracle(Oracle):
    """An Oracle with a cost model, for a DraftGate in front of it (``gated``):
    every proposal costs ``cost_ms``, an accepted token saves ``forward_ms``."""

    verify_ms = None  # no verify curve unless a test sets one
    fallback = None  # what drafts while the gate is closed, if a test sets one

    def __init__(self, *a, cost_ms: float, forward_ms: float = 10.0, **kw):
        super().__init__(*a, **kw)
        self.cost_ms, self.forward_ms = cost_ms, forward_ms

    def step_cost_ms(self, drafted: int) -> float:
        return self.cost_ms


def gated(d: CostedOracle) -> GatedDrafter:
    return GatedDrafter(d, d.fallback)


def test_gate_skips_a_drafter_that_costs_more_than_it_earns_and_stays_lossless(tok, wandering):
    from treespec.draft.gate import DraftGate

    params = SamplingParams(max_new_tokens=40)  # the tiny model's context is 64
    for prompt in random_prompts(3, seed=21):
        ref = generate_all(wandering, prompt, params, tokenizer=tok)
        # Never accepted: it only costs, so the gate asks it after 1, 2, 4, ... skipped steps.
        never = CostedOracle(ref.token_ids, len(prompt), 3, "wrong", cost_ms=1.0)
        got = generate_all(wandering, prompt, params, gated(never), tokenizer=tok)
        assert got.token_ids == ref.token_ids
        s = got.stats
        assert len(never.calls) + s.skipped_proposals == s.verify_steps - 1  # the last step cannot draft
        # 38 steps that could draft: 6 proposals with 1, 2, 4, 8 and 16 steps skipped after
        # the first five (6 + 31 = 37), and the last step skipped too (closed for 32 now).
        assert (len(never.calls), s.skipped_proposals, s.verify_steps) == (6, 32, 39)
        # Always right: each proposal saves 3 forwards, the gate never closes.
        right = CostedOracle(ref.token_ids, len(prompt), 3, "right", cost_ms=1.0)
        got = generate_all(wandering, prompt, params, gated(right), tokenizer=tok)
        assert got.token_ids == ref.token_ids and got.stats.skipped_proposals == 0
        # A drafter without a cost model is always asked.
        plain = Oracle(ref.token_ids, len(prompt), 3, "wrong")
        got = generate_all(wandering, prompt, params, plain, tokenizer=tok)
        assert got.stats.skipped_proposals == 0 and len(plain.calls) == got.stats.verify_steps - 1

        # While the gate is closed, a drafter's fallback drafts instead.
        never = CostedOracle(ref.token_ids, len(prompt), 3, "wrong", cost_ms=1.0)
        never.fallback = Oracle(ref.token_ids, len(prompt), 2, "right")
        got = generate_all(wandering, prompt, params, gated(never), tokenizer=tok)
        assert got.token_ids == ref.token_ids
        # every step but possibly the last (no room left to draft) asked one of them
        assert 0 <= got.stats.verify_steps - (len(never.calls) + len(never.fallback.calls)) <= 1
        assert len(never.fallback.calls) == got.stats.skipped_proposals > 0
        assert all(k <= 2 for _, _, k in never.fallback.calls)  # at the fallback's own k_max
        assert got.stats.accepted_tokens >= len(never.fallback.calls)
        # Every token the right fallback drafted was accepted; the drafter's never were.
        assert got.stats.accepted_fallback == got.stats.fallback_tokens == got.stats.accepted_tokens > 0

    # A negative mean closes the gate for a step; failed probes double the
    # wait up to its cap; a probe that earns reopens it.
    gate = DraftGate(forward_ms=10.0, step_cost_ms=lambda n: 1.0, max_backoff=4)
    gate.record(drafted=3, accepted=1)  # earns 9
    losses = 0
    while gate.open():
        gate.record(drafted=3, accepted=0)  # earns -1
        losses += 1
    assert losses == 7 and gate.backoff == 1  # 9 -> 6.0 -> 3.9 -> 2.4 -> 1.4 -> 0.7 -> 0.2 -> -0.2
    waits = [1]
    for _ in range(3):
        while gate.wait:
            assert not gate.open()
        assert gate.open()
        gate.record(drafted=3, accepted=0)  # a failed probe
        waits.append(gate.wait)
    assert waits == [1, 2, 4, 4]
    while gate.wait:
        assert not gate.open()
    gate.record(drafted=3, accepted=1)  # the probe earns 9
    assert gate.wait == 0 and gate.backoff == 0 and gate.open()


def test_gate_sets_the_fallbacks_length_from_its_acceptance_and_the_verify_cost(tok, wandering):
    from treespec.draft.gate import DraftGate

    gate = DraftGate(forward_ms=4.0, step_cost_ms=lambda n: 1.0)
    assert gate.fallback_k(5) == 5  # no verify curve: the fallback's own length
    gate = DraftGate(forward_ms=4.0, step_cost_ms=lambda n: 1.0, verify_ms=[4.0, 4.2, 5.0, 5.0, 6.0])
    # Unseen positions count as even odds: 1.5, 1.75, 1.875, 1.94 tokens for
    # 1-4 drafts in steps of 4.2, 5.0, 5.0, 6.0 ms, i.e. 2.80, 2.86, 2.67, 3.10
    # ms a token: 3 drafts are fastest, and with at most 2, one is.
    assert gate.fallback_k(4) == 3 and gate.fallback_k(2) == 1
    for _ in range(40):
        gate.record_fallback(drafted=3, accepted=0)  # the first draft always wrong
    assert gate.fallback_acceptance[0] < 0.01 and len(gate.fallback_acceptance) == 1
    # Then drafting does not pay: vanilla steps, but one token every
    # max_backoff + 1 steps, so that the estimate can recover.
    ks = [gate.fallback_k(4) for _ in range(2 * (gate.max_backoff + 1))]
    assert ks.count(1) == 2 and set(ks) == {0, 1} and ks[gate.max_backoff] == 1
    for _ in range(60):
        gate.record_fallback(drafted=4, accepted=4)
    assert gate.fallback_k(4) == 4 and min(gate.fallback_acceptance) > 0.99

    # In the loop: a costly drafter that is never right, whose fallback is
    # never right either, ends up doing vanilla steps, and stays lossless.
    params = SamplingParams(max_new_tokens=40)
    for prompt in random_prompts(3, seed=22):
        ref = generate_all(wandering, prompt, params, tokenizer=tok)
        never = CostedOracle(ref.token_ids, len(prompt), 3, "wrong", cost_ms=1.0, forward_ms=4.0)
        never.verify_ms = [4.0, 4.2, 5.0, 5.0, 6.0]
        never.fallback = Oracle(ref.token_ids, len(prompt), 3, "wrong")
        got = generate_all(wandering, prompt, params, gated(never), tokenizer=tok)
        assert got.token_ids == ref.token_ids
        assert 0 < len(never.fallback.calls) < got.stats.skipped_proposals  # some steps were vanilla
        # With a right fallback, it keeps drafting while the gate is closed.
        never = CostedOracle(ref.token_ids, len(prompt), 3, "wrong", cost_ms=1.0, forward_ms=4.0)
        never.verify_ms = [4.0, 4.2, 5.0, 5.0, 6.0]
        never.fallback = Oracle(ref.token_ids, len(prompt), 3, "right")
        got = generate_all(wandering, prompt, params, gated(never), tokenizer=tok)
        assert got.token_ids == ref.token_ids
        assert len(never.fallback.calls) == got.stats.skipped_proposals > 0


def test_gate_books_the_fallbacks_draft_on_the_tokens_a_step_emitted():
    from treespec.draft.gate import DraftGate

    gate = DraftGate(forward_ms=4.0, step_cost_ms=lambda n: 1.0, verify_ms=[4.0] * 5, has_fallback=True)
    gate.record_counterfactual([1, 2, 3, 4], [1, 2])  # both known positions right; 3 and 4 unknown
    assert len(gate.fallback_acceptance) == 2 and min(gate.fallback_acceptance) > DraftGate.FALLBACK_PRIOR
    gate.record_counterfactual([1, 9], [1, 2, 5])  # right, then wrong
    acc = gate.fallback_acceptance
    assert acc[0] > DraftGate.FALLBACK_PRIOR > acc[1] and len(acc) == 2
    gate.record_counterfactual([], [7])  # no lookup candidate: says nothing
    assert gate.fallback_acceptance == acc


def test_gate_prefers_the_fallback_where_it_saves_more_per_token():
    from treespec.draft.gate import DraftGate

    def gate_after(fallback_right: bool):
        g = DraftGate(forward_ms=10.0, step_cost_ms=lambda n: 4.0 + n, verify_ms=[10.0] * 9, has_fallback=True,
                      k_cap=4)
        for _ in range(30):
            g.record_fallback(drafted=4, accepted=4 if fallback_right else 0)
        for _ in range(3):
            g.record(drafted=4, accepted=2)  # earns 2 * 10 - 8 = 12 ms, 4 ms a token: better than vanilla
        return g

    # A free fallback that is right four times a step saves 8 ms a token: the drafter is closed.
    assert gate_after(True).fallback_saving() > 7 and gate_after(True).wait > 0
    # A fallback that is almost never right saves next to nothing: the drafter stays asked.
    assert gate_after(False).fallback_saving() < 1 and gate_after(False).open()
    # Without a fallback the floor is vanilla decoding, as before.
    g = DraftGate(forward_ms=10.0, step_cost_ms=lambda n: 4.0 + n, verify_ms=[10.0] * 9)
    g.record(drafted=4, accepted=2)
    assert g.fallback_saving() == 0 and g.open()


class CopyingOracle(CostedOracle):
    """A costed oracle that also reports what its fallback would have drafted
    (``fallback_mode``: the vanilla continuation, or shifted off it)."""

    def __init__(self, *a, fallback_mode: str, **kw):
        super().__init__(*a, **kw)
        self.fallback_mode = fallback_mode

    def propose(self, context, features, k_max):
        d = super().propose(context, features, k_max)
        done = len(context) - self.P
        alt = self.ref[done:done + 4]
        d.fallback = alt if self.fallback_mode == "right" else [(t + 1) % N_VOCAB for t in alt]
        return d


def test_a_costly_drafter_gives_way_to_a_free_fallback_that_is_as_right(tok, wandering):
    params = SamplingParams(max_new_tokens=40)
    for prompt in random_prompts(3, seed=23):
        ref = generate_all(wandering, prompt, params, tokenizer=tok)
        runs = {}
        for mode in ("right", "wrong"):
            d = CopyingOracle(ref.token_ids, len(prompt), 3, "right", cost_ms=3.0, forward_ms=4.0,
                              fallback_mode=mode)
            d.verify_ms = [4.0] * 5
            d.fallback = Oracle(ref.token_ids, len(prompt), 3, mode)
            got = generate_all(wandering, prompt, params, gated(d), tokenizer=tok)
            assert got.token_ids == ref.token_ids
            runs[mode] = got.stats
        # Both save 3 forwards (12 ms) a step, but the drafter costs 3 ms of them:
        # where the fallback would have been as right, the gate hands the steps to it.
        assert runs["right"].skipped_proposals > 0 and runs["wrong"].skipped_proposals == 0


def test_gate_books_what_a_proposal_took_where_it_has_a_verify_curve():
    """A drafter that prices its proposals low but takes long (a whole tree walk on prose)
    is closed off on its measured time; a proposal faster than estimated is still booked at
    the estimate; without a verify curve the gate keeps the estimate."""
    from treespec.draft.gate import DraftGate

    cheap = lambda n: 0.2 + 0.3 * n  # noqa: E731 - what the drafter thinks a proposal costs
    g = DraftGate(forward_ms=3.0, step_cost_ms=cheap, verify_ms=[3.0, 3.3, 3.6])
    g.record(drafted=1, accepted=0, drafter_ms=0.1)  # its estimate, 0.2 (> 0.1), + 0.3 ms: a loss, closed
    assert not g.open()
    g.record(drafted=2, accepted=1, drafter_ms=0.2)  # a probe that earns 3 - 0.2 - 0.6 = 2.2: open again
    assert g.mean == pytest.approx(2.2) and g.open()
    slow = DraftGate(forward_ms=3.0, step_cost_ms=cheap, verify_ms=[3.0, 3.3, 3.6])
    slow.record(drafted=2, accepted=1, drafter_ms=3.0)  # took 3 ms: 3 - 3 - 0.6 < 0, closed
    assert slow.mean == pytest.approx(-0.6) and not slow.open()
    estimate = DraftGate(forward_ms=3.0, step_cost_ms=cheap)  # no curve: the estimate, 3 - 0.8
    estimate.record(drafted=2, accepted=1, drafter_ms=3.0)
    assert estimate.mean == pytest.approx(2.2) and estimate.open()


def test_a_gate_that_closes_again_after_a_lucky_probe_waits_long():
    """A drafter that loses on average but sometimes gets a probe right: after closing
    again it waits half the reopening probe's wait, not one step; a run of paying
    proposals wears that memory away."""
    from treespec.draft.gate import DraftGate

    g = DraftGate(forward_ms=10.0, step_cost_ms=lambda n: 1.0, max_backoff=32)
    g.record(drafted=3, accepted=0)  # closes: wait 1
    for want in (2, 4, 8, 16):  # failed probes double the wait
        while g.wait:
            assert not g.open()
        g.record(drafted=3, accepted=0)
        assert g.wait == want
    while g.wait:
        assert not g.open()
    g.record(drafted=3, accepted=1)  # a lucky probe after waiting 16: open, mean 9
    assert g.open() and g.backoff == 0
    while not g.wait:
        g.record(drafted=3, accepted=0)  # losses until it closes
    assert g.wait == 8  # half of 16, not 1
    # after the memory wears off (paying proposals), a close starts at one step again
    while g.wait:
        assert not g.open()
    g.record(drafted=3, accepted=1)  # probe succeeds (after waiting 8)
    for _ in range(4):
        g.record(drafted=3, accepted=1)  # paying: 8 -> 4 -> 2 -> 1 -> 0
    while not g.wait:
        g.record(drafted=3, accepted=0)
    assert g.wait == 1
