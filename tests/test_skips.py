"""Skip connections for a compressed width (model/config.py's embed_skip and unet_skip):
shapes, the plain model at initialisation, gradients, lossless speculation with every
drafter, bundles, and the code paths that must refuse them."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from conftest import tiny_config, tiny_model
from treespec.draft.loop import generate_all
from treespec.draft.ngram import NgramDrafter
from treespec.draft.tree import TreeDrafter
from treespec.draft.types import SamplingParams
from treespec.model import GPT, ConfigError, GPTConfig, load_bundle, save_bundle
from treespec.model.config import unet_pairs
from treespec.model.interop import InteropError, export_hf
from treespec.model.kernels import plan
from treespec.training.data import load_split

SKIPS = [dict(embed_skip=True), dict(unet_skip=True), dict(embed_skip=True, unet_skip=True, dwa=True)]


def move_skips(model: GPT, seed: int = 1) -> None:
    """Take the skip weights off their zero start so the tests exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in model.embed_skip_weights:
            w.add_(0.4 * torch.randn(2, generator=g))
        if model.unet_weights is not None:
            model.unet_weights.add_(0.5 + 0.3 * torch.randn(model.unet_weights.shape, generator=g))
        for w in model.dwa_weights:
            w.add_(0.2 * torch.randn(w.shape, generator=g))


def test_unet_pairs_join_mirror_blocks_and_leave_out_neighbours():
    assert unet_pairs(6) == [(1, 6), (2, 5)]  # (3, 4): block 3's output is block 4's input already
    assert unet_pairs(5) == [(1, 5), (2, 4)]
    assert unet_pairs(12) == [(1, 12), (2, 11), (3, 10), (4, 9), (5, 8)]
    assert unet_pairs(2) == [] and unet_pairs(1) == []


@pytest.mark.parametrize("kw", SKIPS)
def test_shapes_and_the_plain_model_at_initialisation(kw):
    plain = tiny_model(seed=4)
    torch.manual_seed(4)
    m = GPT(tiny_config(**kw)).eval()
    L = m.config.n_layer
    assert len(m.embed_skip_weights) == (L - 1 if kw.get("embed_skip") else 0)
    assert all(w.shape == (2,) and w.tolist() == [1.0, 0.0] for w in m.embed_skip_weights)
    if kw.get("unet_skip"):
        assert m.unet_weights.shape == (len(unet_pairs(L)),) and not m.unet_weights.any()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    # Every other weight is the plain model's (the same seed draws them), and the skips
    # start at zero weight: the same logits, bit for bit, in training and cached forwards.
    for a, b in zip(plain(ids).logits, m(ids).logits):
        assert torch.equal(a, b)
    cache_a, cache_b = plain.new_cache(batch_size=2), m.new_cache(batch_size=2)
    assert torch.equal(plain.forward_step(ids, 0, cache_a).logits, m.forward_step(ids, 0, cache_b).logits)
    move_skips(m)
    assert not torch.allclose(plain(ids).logits[-1], m(ids).logits[-1])


@pytest.mark.parametrize("kw", SKIPS)
def test_gradients_reach_the_skip_weights(kw):
    m = tiny_model(seed=2, **kw).train()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    m(ids, targets=ids).loss.backward()
    weights = [*m.embed_skip_weights] + ([m.unet_weights] if m.unet_weights is not None else [])
    assert weights and all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


@pytest.mark.parametrize("kw", SKIPS)
def test_cached_forwards_match_the_full_forward_with_skips_on(kw):
    m = tiny_model(seed=3, **kw)
    move_skips(m)
    ids = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(2))
    ref = m(ids).logits[-1]
    cache, out = m.new_cache(), []
    for start, n in ((0, 7), (7, 1), (8, 12)):
        out.append(m.forward_step(ids[:, start:start + n], start, cache).logits)
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-4, rtol=1e-4)
    # The decode kernels: the whole trunk in one C call, the skips between its blocks.
    plan(m, "float32", measure=lambda g, rows, c, w: 1.0 if c == "skinny" else 2.0)
    assert m.fused_trunk is not None and m.fused_trunk._mixing_arrays is not None
    cache, out = m.new_cache(), []
    for start, n in ((0, 7), (7, 1), (8, 12)):
        out.append(m.forward_step(ids[:, start:start + n], start, cache).logits)
    torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-4, rtol=1e-4)


def test_bundles_round_trip_and_old_readers_refuse_what_they_cannot_run(tmp_path, ranks_path):
    m = tiny_model(seed=5, embed_skip=True, unet_skip=True)
    move_skips(m)
    path = save_bundle(tmp_path / "skips", m, ranks_path)
    back = load_bundle(path)
    assert back.config.embed_skip and back.config.unet_skip
    ids = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(3))
    assert torch.equal(back.model(ids).logits[-1], m(ids).logits[-1])
    # config.json names an option only when it is on: a plain bundle reads as it always
    # did, and one with skips is refused by code that does not know them ("unknown
    # field"), never run without them.
    saved = json.loads((path / "config.json").read_text())["model"]
    assert saved["embed_skip"] is True and saved["unet_skip"] is True
    plain = json.loads((save_bundle(tmp_path / "plain", tiny_model(), ranks_path) / "config.json").read_text())["model"]
    assert "embed_skip" not in plain and "unet_skip" not in plain
    older = {k: v for k, v in saved.items() if k not in ("embed_skip", "unet_skip")}
    with pytest.raises(ConfigError, match="unknown field"):
        GPTConfig.from_dict({**older, "some_future_option": True})
    # A GPT-2 export cannot express the skips: refused, nothing written.
    with pytest.raises(InteropError, match="skip connections"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.fixture(scope="module")
def skip_bundle(tmp_path_factory, draft_corpus, ranks_path):
    """A tiny model with both skips (moved off zero) and a tree drafter fitted by the real
    `treespec draft-fit`."""
    from treespec.cli import main as cli_main

    m = tiny_model(seed=6, embed_skip=True, unet_skip=True)
    move_skips(m)
    path = save_bundle(tmp_path_factory.mktemp("skips") / "bundle", m, ranks_path)
    argv = ["draft-fit", "--bundle", str(path), "--data-dir", str(draft_corpus), "--contexts", "48",
            "--steps-per-context", "12", "--k-max", "4", "--classes", "12", "--pca-dims", "4",
            "--threshold", "0", "--min-context", "8", "--max-context", "24", "--rounds", "40",
            "--verify-ms", "1.9,1.9,1.9,3.2", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(argv) == 0
    return path


@pytest.mark.parametrize("precision", ["float32", "w8a8"])
def test_speculation_is_lossless_with_skips_for_every_drafter(skip_bundle, draft_corpus, precision):
    bundle = load_bundle(skip_bundle)
    plan(bundle.model, precision)
    data = load_split(draft_corpus, "test")
    drafters = {"ngram": NgramDrafter(k_max=4), "tree": TreeDrafter.load(bundle)}
    drafted = {name: 0 for name in drafters}
    for start in (0, 40, 80):
        prompt = data[start:start + 16].astype(int).tolist()
        for params in (SamplingParams(max_new_tokens=24),
                       SamplingParams(max_new_tokens=24, temperature=0.9, top_k=50, seed=start)):
            ref = generate_all(bundle.model, prompt, params, None, tokenizer=bundle.tokenizer)
            for name, d in drafters.items():
                got = generate_all(bundle.model, prompt, params, d, tokenizer=bundle.tokenizer)
                assert got.token_ids == ref.token_ids, (name, params)
                drafted[name] += got.stats.draft_tokens
    assert all(n > 0 for n in drafted.values()), drafted
