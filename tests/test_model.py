import pytest
import torch
import torch.nn.functional as F

from treespec.model import GPT, ConfigError, GPTConfig, KVCache, preset
from treespec.model.config import default_exit_weights, seed_exit_layers
from treespec.model.gpt import LinearCrossEntropy

from conftest import tiny_config, tiny_model

DWA_VARIANTS = [dict(dwa=False), dict(dwa=True), dict(dwa=True, dwa_dilation=2, dwa_period=2)]


def randomise_dwa(model: GPT) -> None:
    """Move DWA weights off the identity so the tests exercise the averaging."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in model.dwa_weights:
            w.add_(0.3 * torch.randn(w.shape, generator=g))


def full_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits[-1]


@pytest.mark.parametrize("kw", DWA_VARIANTS)
def test_cached_one_at_a_time_matches_full_forward(kw):
    model = tiny_model(**kw)
    randomise_dwa(model)
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = full_logits(model, ids)
    cache = model.new_cache(batch_size=2)
    out = [model.forward_step(ids[:, t:t + 1], t, cache).logits for t in range(ids.size(1))]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", DWA_VARIANTS)
@pytest.mark.parametrize("chunks", [(7, 5, 8), (1, 4, 15), (20,)])
def test_cached_chunks_match_full_forward(kw, chunks):
    model = tiny_model(**kw)
    randomise_dwa(model)
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(2))
    ref = full_logits(model, ids)
    cache = model.new_cache()
    out, start = [], 0
    for n in chunks:
        out.append(model.forward_step(ids[:, start:start + n], torch.arange(start, start + n), cache).logits)
        start += n
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", DWA_VARIANTS)
def test_a_batched_forward_is_each_sequences_own(kw):
    """forward_batch: sequences at different lengths, some prefilling, some
    verifying several tokens, one wanting the last row only, each over its
    own cache: every output and every cache is what forward_step gives."""
    model = tiny_model(**kw)
    randomise_dwa(model)
    g = torch.Generator().manual_seed(4)
    prefixes = [torch.randint(0, 50257, (1, n), generator=g) for n in (5, 0, 17, 9)]
    new = [torch.randint(0, 50257, (1, n), generator=g) for n in (1, 6, 4, 1)]
    last_only = [False, True, False, False]
    solo, batched = [], []
    for pre in prefixes:
        caches = [model.new_cache(max_len=32) for _ in range(2)]
        for c in caches:
            if pre.shape[1]:
                model.forward_step(pre, 0, c)
        solo.append(caches[0])
        batched.append(caches[1])
    want = [model.forward_step(x, p.shape[1], c, last_only=lo) for x, p, c, lo in zip(new, prefixes, solo, last_only)]
    got = model.forward_batch([(x, p.shape[1], c, lo) for x, p, c, lo in zip(new, prefixes, batched, last_only)])
    for w, o, cs, cb in zip(want, got, solo, batched):
        assert o.logits.shape == w.logits.shape and o.hidden.shape == w.hidden.shape
        torch.testing.assert_close(o.logits, w.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(o.hidden, w.hidden, atol=1e-5, rtol=1e-4)
        for a, b in zip(o.exit_hidden, w.exit_hidden):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert cb.length == cs.length
        for layer in range(model.config.n_layer):
            torch.testing.assert_close(cb.view(layer, cb.length)[0], cs.view(layer, cs.length)[0], atol=1e-5, rtol=1e-4)
    # One sequence alone is exactly forward_step: the same matrices, the same bits.
    c1, c2 = model.new_cache(max_len=32), model.new_cache(max_len=32)
    a = model.forward_step(new[1], 0, c1)
    b = model.forward_batch([(new[1], 0, c2, False)])[0]
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    with pytest.raises(ValueError, match="cache holds only"):
        model.forward_batch([(new[0], 0, model.new_cache(max_len=32), False), (new[0], 3, model.new_cache(), False)])


@pytest.mark.parametrize("kw", DWA_VARIANTS[:2])
def test_rollback_then_new_tokens_matches_fresh_forward(kw):
    model = tiny_model(**kw)
    randomise_dwa(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50257, (1, 16), generator=g)
    cache = model.new_cache()
    model.forward_step(ids, 0, cache)
    cache.rollback(11)  # reject the last 5 positions
    assert cache.length == 11
    new = torch.randint(0, 50257, (1, 4), generator=g)
    got = model.forward_step(new, 11, cache).logits
    ref = full_logits(model, torch.cat([ids[:, :11], new], dim=1))[:, 11:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert cache.length == 15


def test_overwrite_without_explicit_rollback():
    """Writing below cache.length overwrites: the gpt-fast way to discard drafts."""
    model = tiny_model()
    ids = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache()
    model.forward_step(ids, 0, cache)
    alt = torch.tensor([[5, 6, 7]])
    got = model.forward_step(alt, 8, cache).logits
    ref = full_logits(model, torch.cat([ids[:, :8], alt], dim=1))[:, 8:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert cache.length == 11


def test_forward_step_errors_and_last_only():
    model = tiny_model()
    cache = model.new_cache(max_len=8)
    with pytest.raises(ValueError, match="cache holds only 0"):
        model.forward_step(torch.tensor([[1]]), 3, cache)
    out = model.forward_step(torch.tensor([[1, 2, 3]]), 0, cache, last_only=True)
    assert out.logits.shape == (1, 1, model.config.vocab_size)
    assert out.hidden.shape == (1, 1, model.config.n_embd)  # the same row as the logits
    assert len(out.exit_hidden) == len(model.config.exit_layers) - 1
    full = model.forward_step(torch.tensor([[1, 2, 3]]), 0, model.new_cache())
    torch.testing.assert_close(out.hidden[:, 0], full.hidden[:, -1])
    torch.testing.assert_close(out.exit_hidden[0][:, 0], full.exit_hidden[0][:, -1])
    with pytest.raises(ValueError, match="exceed the KV cache"):
        model.forward_step(torch.ones(1, 6, dtype=torch.long), 3, cache)
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(9)
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        KVCache.for_model(model.config, max_len=1000)


def test_exit_logits_match_training_forward_and_token_subset():
    model = tiny_model()
    ids = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(5))
    train_logits = model(ids).logits
    out = model.forward_step(ids, 0, model.new_cache())
    for e, h in enumerate(out.exit_hidden):
        torch.testing.assert_close(model.exit_logits(e, h), train_logits[e], atol=1e-4, rtol=1e-4)
    subset = torch.tensor([3, 50, 1000])
    torch.testing.assert_close(model.exit_logits(0, out.exit_hidden[0], subset),
                               train_logits[0][..., subset], atol=1e-4, rtol=1e-4)


def test_dwa_at_init_equals_plain_model():
    plain = tiny_model(dwa=False)
    dwa = GPT(tiny_config(dwa=True, dwa_dilation=2)).eval()
    missing = dwa.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("dwa_weights") for k in missing)
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(6))
    for a, b in zip(plain(ids).logits, dwa(ids).logits):
        torch.testing.assert_close(a, b)
    # ...and moving the weights changes the output, so DWA is really wired in.
    randomise_dwa(dwa)
    assert not torch.allclose(plain(ids).logits[-1], dwa(ids).logits[-1])


def test_exit_loss_is_weighted_sum_of_per_exit_cross_entropies():
    model = tiny_model()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50257, (2, 16), generator=g)
    tgt = torch.randint(0, 50257, (2, 16), generator=g)
    out = model(ids, tgt)
    ces = [F.cross_entropy(lg.view(-1, lg.size(-1)), tgt.view(-1)) for lg in out.logits]
    for a, b in zip(out.exit_losses, ces):
        torch.testing.assert_close(a, b)
    expect = sum(w * c for w, c in zip(model.config.exit_loss_weights, ces))
    torch.testing.assert_close(out.loss, expect)


@pytest.mark.parametrize("chunk", [1000, 64, 7])  # one chunk; several with a remainder; many
def test_linear_cross_entropy_equals_cross_entropy_of_linear_in_loss_and_gradients(chunk):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 48, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(1000, 48, generator=g)).requires_grad_()
    tgt = torch.randint(0, 1000, (300,), generator=g)
    tgt[::7] = -1  # ignored rows count neither in the mean nor in the gradient
    ref = F.cross_entropy(F.linear(z, w), tgt, ignore_index=-1)
    gz, gw = torch.autograd.grad(3 * ref, (z, w))
    out = LinearCrossEntropy.apply(z, w, tgt, chunk, True)
    fz, fw = torch.autograd.grad(3 * out, (z, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fz, gz)
    torch.testing.assert_close(fw, gw)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(LinearCrossEntropy.apply(z, w, tgt, chunk, False), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # products in bf16, as F.linear's would be
        ref16 = F.cross_entropy(F.linear(z, w), tgt, ignore_index=-1)
        out16 = LinearCrossEntropy.apply(z, w, tgt, chunk, True)
    torch.testing.assert_close(out16, ref16, atol=1e-3, rtol=1e-3)
    assert abs(out16.item() - ref.item()) > 1e-6  # it really ran in bf16


@pytest.mark.parametrize("kw", DWA_VARIANTS[:2] + [dict(embed_skip=True, unet_skip=True)])
def test_training_forward_without_logits_gives_the_same_losses_and_gradients(kw):
    """What the trainer runs (return_logits=False: the chunked loss) against
    the plain logits and F.cross_entropy, tied head included."""
    model = tiny_model(**kw)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 50257, (2, 16), generator=g)
    tgt = torch.randint(0, 50257, (2, 16), generator=g)
    tgt[0, :3] = -1
    grads = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, tgt, exit_sample_frac=0.5, generator=torch.Generator().manual_seed(0),
                    return_logits=return_logits)
        out.loss.backward()
        grads.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (fused, fused_grads) = grads
    assert all(l is None for l in fused.logits) and ref.logits[-1] is not None
    for a, b in zip(fused.exit_losses, ref.exit_losses):
        torch.testing.assert_close(a, b)
    assert ref_grads.keys() == fused_grads.keys() and "wte.weight" in ref_grads
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], atol=1e-6, rtol=1e-4)


def test_sampled_intermediate_exit_loss_uses_a_subset_but_full_final_loss():
    model = tiny_model()
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 50257, (2, 16), generator=g)
    tgt = torch.randint(0, 50257, (2, 16), generator=g)
    full = model(ids, tgt)
    sampled = model(ids, tgt, exit_sample_frac=0.25, generator=torch.Generator().manual_seed(0))
    assert sampled.logits[0] is None and sampled.logits[-1] is not None
    torch.testing.assert_close(sampled.exit_losses[-1], full.exit_losses[-1])
    assert not torch.isclose(sampled.exit_losses[0], full.exit_losses[0])


def test_tied_heads_share_storage_and_untied_do_not():
    model = tiny_model()
    for head in model.exit_heads:
        assert head.weight.data_ptr() == model.wte.weight.data_ptr()
    untied = tiny_model(tie_embeddings=False)
    ptrs = {h.weight.data_ptr() for h in untied.exit_heads} | {untied.wte.weight.data_ptr()}
    assert len(ptrs) == len(untied.exit_heads) + 1


def test_gpt2_init_scales_residual_projections():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128, block_size=32))
    std = model.blocks[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.002
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


# --- config --------------------------------------------------------------

def test_seed_exit_design_scales_with_depth():
    assert seed_exit_layers(12) == (8, 10, 12)
    assert seed_exit_layers(6) == (4, 5, 6)
    assert default_exit_weights(3) == pytest.approx((0.05, 0.15, 0.8))
    assert default_exit_weights(1) == (1.0,)
    c = GPTConfig(n_layer=6, n_head=6, n_embd=384)
    assert c.exit_layers == (4, 5, 6) and c.exit_loss_weights == pytest.approx((0.05, 0.15, 0.8))
    assert c.vocab_size == 50304 and c.vocab_size % 64 == 0


@pytest.mark.parametrize("kw, msg", [
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(exit_layers=(2, 9)), "out of range"),
    (dict(exit_layers=(0, 4)), "out of range"),
    (dict(exit_layers=(2, 3)), "last exit layer must be n_layer"),
    (dict(exit_layers=(3, 2, 4)), "strictly increasing"),
    (dict(exit_layers=(2, 4), exit_loss_weights=(0.5, 0.6)), "must sum to 1"),
    (dict(exit_layers=(2, 4), exit_loss_weights=(1.0,)), "has 1 entries but exit_layers has 2"),
    (dict(vocab_size=1000), "smaller than the GPT-2 BPE"),
    (dict(dwa_dilation=0), "dwa_dilation"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
])
def test_config_validation_messages(kw, msg):
    base = dict(n_layer=4, n_head=2, n_embd=32, block_size=64)
    base.update(kw)
    with pytest.raises(ConfigError, match=msg):
        GPTConfig(**base)


def test_config_json_round_trip_and_unknown_fields():
    c = tiny_config(dwa=True, dwa_dilation=2, tie_embeddings=False)
    back = GPTConfig.from_json(c.to_json())
    assert back == c
    with pytest.raises(ConfigError, match="unknown field"):
        GPTConfig.from_dict({**c.to_dict(), "n_layers": 3})


def test_presets():
    cpu = preset("cpu-default")
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd) == (6, 4, 256)
    g2 = preset("gpt2-small")
    assert (g2.n_layer, g2.n_embd, g2.exit_layers) == (12, 768, (8, 10, 12))
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("huge")
