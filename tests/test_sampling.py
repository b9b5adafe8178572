"""The processed distribution p (temperature, top-k, top-p) and the sampler."""

import math

import pytest
import torch

from treespec.draft.sampling import accept_greedy, make_generator, probs_from_logits, sample, validate_params
from treespec.draft.types import SamplingParams


def test_temperature_and_top_k():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = probs_from_logits(logits, SamplingParams(temperature=0.5, top_k=2))
    e = torch.tensor([math.exp(6.0), math.exp(4.0)])
    torch.testing.assert_close(p, torch.cat([e / e.sum(), torch.zeros(2)]))
    # rows are independent
    both = probs_from_logits(torch.stack([logits, logits.flip(0)]), SamplingParams(temperature=0.5, top_k=2))
    torch.testing.assert_close(both[1], p.flip(0))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    p = probs_from_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)
    p = probs_from_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.81))
    torch.testing.assert_close(p, torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95)
    p = probs_from_logits(probs.log(), SamplingParams(temperature=1.0, top_p=0.01))
    torch.testing.assert_close(p, torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_sample_follows_the_weights_and_never_picks_zero_weight():
    w = torch.zeros(1000)
    w[[0, 7, 999]] = torch.tensor([1.0, 2.0, 1.0])
    g = make_generator(0)
    draws = [sample(w, g) for _ in range(2000)]
    assert set(draws) == {0, 7, 999}
    assert abs(draws.count(7) / 2000 - 0.5) < 0.05
    # same seed, same draws
    assert [sample(w, make_generator(5)) for _ in range(3)] == [sample(w, make_generator(5)) for _ in range(3)]


def test_greedy_acceptance_is_the_matching_prefix():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 9]) == 2
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == 3
    assert accept_greedy([4], []) == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(max_new_tokens=0), dict(k_max=-2)])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValueError):
        validate_params(SamplingParams(**bad))


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])  # flat (nucleus needs a full sort) to peaked
def test_top_p_shortcut_equals_the_full_sort(scale):
    g = torch.Generator().manual_seed(0)
    logits = scale * torch.randn(3, 50257, generator=g)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    p = probs_from_logits(logits, params)
    full = torch.softmax(logits, dim=-1)
    sp, si = torch.sort(full, dim=-1, descending=True)
    keep = (torch.cumsum(sp, dim=-1) - sp) < 0.9
    ref = torch.zeros_like(full).scatter_(-1, si, sp * keep)
    torch.testing.assert_close(p, ref / ref.sum(dim=-1, keepdim=True))


def test_position_draws_follow_p_and_belong_to_positions():
    from scipy.stats import chisquare

    from treespec.draft.sampling import PositionDraws

    w = torch.tensor([0.0, 0.1, 0.2, 0.0, 0.3, 0.4])
    draws = PositionDraws(4000, make_generator(0))
    got = torch.bincount(torch.tensor([draws.token(w, i) for i in range(4000)]), minlength=6)
    assert got[0] == got[3] == 0  # zero weight is never picked
    assert chisquare(got[[1, 2, 4, 5]].numpy(), (4000 * w[[1, 2, 4, 5]]).numpy()).pvalue > 1e-3
    # A position's draws do not depend on which positions were asked before, or how often.
    a, b = PositionDraws(50, make_generator(9)), PositionDraws(50, make_generator(9))
    forward = [a.token(w, i) for i in range(50)]
    assert [b.token(w, i) for i in reversed(range(50))][::-1] == forward == [a.token(w, i) for i in range(50)]
    assert a.uniform(3) == b.uniform(3) and 0 <= a.uniform(3) < 1
    assert forward != [PositionDraws(50, make_generator(10)).token(w, i) for i in range(50)]


def test_compiled_race_picks_what_the_full_race_picks(monkeypatch):
    """csrc/skinny.c's race skips the logs of tokens that cannot win: on dense, peaked
    and top-k-sparse distributions it must pick exactly the token the full race over
    the same uniforms picks (the torch path, which the CPU falls back to without it)."""
    from treespec.draft.sampling import PositionDraws, race_uniforms
    from treespec.model import kernels

    assert kernels.SKINNY.load(), kernels.SKINNY.error
    g = torch.Generator().manual_seed(3)
    draws = PositionDraws(600, make_generator(4))
    compiled, full = [], []
    for i in range(600):
        z = torch.randn(50257, generator=g) * (0.5 + i % 7)
        if i % 3 == 0:
            z[torch.randperm(50257, generator=g)[:50000]] = float("-inf")  # top-k: most weights 0
        p = torch.softmax(z, dim=0)
        compiled.append(draws.token(p, i))
        u = race_uniforms(p.numel(), draws.seeds[i][0])
        full.append(int(torch.argmax(p / u.log().neg())))
    assert compiled == full and len(set(compiled)) > 500
    # Without the compiled kernel the same tokens come from torch.
    monkeypatch.setattr(kernels.SKINNY, "load", lambda: False)
    assert [draws.token(torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(i)), 0), i)
            for i in range(20)] == [int(torch.argmax(torch.softmax(torch.randn(
                64, generator=torch.Generator().manual_seed(i)), 0) / race_uniforms(64, draws.seeds[i][0]).log().neg()))
                for i in range(20)]


def test_position_draws_shrug_off_rounding_that_flips_inverse_cdf():
    """A flat distribution over the whole vocabulary, and the same one with
    every probability moved by a few parts in a million (the rounding between
    a one-position and a several-position forward): the exponential race
    keeps its token, inverse-CDF sampling often picks a neighbouring one."""
    from treespec.draft.sampling import PositionDraws

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(2.0 * torch.randn(50257, generator=g), dim=0)
    noisy = p * (1 + 5e-6 * torch.randn(50257, generator=g))
    draws = PositionDraws(2000, make_generator(1))
    race_flips = sum(draws.token(p, i) != draws.token(noisy, i) for i in range(2000))
    cdf_flips = sum(sample(p, make_generator(i)) != sample(noisy, make_generator(i)) for i in range(2000))
    assert race_flips == 0 and cdf_flips >= 4  # 8 of 2000 when written


def _dense_penalties(logits, prompt, generated, drafts, params):
    """The penalties written out over the whole vocabulary, row by row: the definition
    ``Penalties`` computes sparsely (row j also sees drafts[:j])."""
    V = logits.size(1)
    out = logits.float().clone()
    for j in range(logits.size(0)):
        gen = generated + drafts[:j]
        seen = torch.zeros(V, dtype=torch.bool)
        seen[prompt + gen] = True
        count = torch.zeros(V)
        for t in gen:
            count[t] += 1
        z = out[j]
        for t, b in (params.logit_bias or {}).items():
            z[t] = z[t] + b
        if params.repetition_penalty != 1.0:
            r = params.repetition_penalty
            z = torch.where(seen, torch.where(z > 0, z / r, z * r), z)
        z = z - params.frequency_penalty * count - params.presence_penalty * (count > 0).float()
        out[j] = z
    return out


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.3), dict(frequency_penalty=0.5, presence_penalty=0.2),
                                     dict(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.1,
                                          logit_bias={7: -100.0, 31: 2.5, 400: 1.0})])
def test_sparse_penalties_equal_the_dense_definition_bit_for_bit(penalty):
    """Only the columns of tokens already there are touched, and each once: drafts that
    repeat one another, repeat the prompt or the generated text, or are new, on every row."""
    from treespec.draft.sampling import Penalties

    g = torch.Generator().manual_seed(0)
    V, prompt, generated = 500, [3, 5, 5, 31, 77], [5, 9, 9, 400]
    params = SamplingParams(**penalty)
    pen = Penalties(prompt, V, params)
    for t in generated:
        pen.push(t)
    for drafts in ([], [9], [12, 12, 5, 77, 12, 400, 13], [499, 0, 499]):
        logits = torch.randn(len(drafts) + 1, V, generator=g) * 5
        before = logits.clone()
        got = pen.apply(logits, drafts)
        assert torch.equal(got, _dense_penalties(logits, prompt, generated, drafts, params)), drafts
        assert torch.equal(logits, before)  # the model's logits are left as they were
    # Fewer rows than drafts + 1: the drafts past the last row change nothing.
    logits = torch.randn(2, V, generator=g)
    assert torch.equal(pen.apply(logits, [12, 13, 14]), _dense_penalties(logits, prompt, generated, [12], params))
