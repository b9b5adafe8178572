import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from treespec.model import BundleError, load_bundle, save_bundle

from conftest import tiny_model


def logits(model, ids):
    return model(ids).logits[-1]


@pytest.mark.parametrize("kw", [dict(), dict(dwa=True), dict(tie_embeddings=False)])
def test_round_trip_gives_identical_logits(tmp_path, ranks_path, kw):
    model = tiny_model(**kw)
    path = save_bundle(tmp_path / "b", model, ranks_path)
    b = load_bundle(path)
    ids = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(b.model, ids), logits(model, ids), rtol=0, atol=0)
    assert b.config == model.config
    assert not b.model.training
    assert b.tokenizer.encode("hello") == [31373]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "tokenizer.tiktoken"]


def test_tied_weights_stored_once(tiny_bundle):
    keys = load_file(str(tiny_bundle / "model.safetensors")).keys()
    assert "wte.weight" in keys and not any(k.startswith("exit_heads") for k in keys)
    b = load_bundle(tiny_bundle)
    assert b.model.exit_heads[0].weight.data_ptr() == b.model.wte.weight.data_ptr()


def test_half_precision_bundle(tmp_path, ranks_path):
    model = tiny_model()
    path = save_bundle(tmp_path / "h", model, ranks_path, dtype=torch.float16)
    assert load_file(str(path / "model.safetensors"))["wte.weight"].dtype == torch.float16
    b = load_bundle(path)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(logits(b.model, ids), logits(model, ids), atol=2e-3, rtol=2e-2)


def _rewrite_manifest(path):
    from treespec.model.tokenizer import sha256_file
    m = json.loads((path / "manifest.json").read_text())
    m["files"] = {k: sha256_file(path / k) for k in m["files"]}
    (path / "manifest.json").write_text(json.dumps(m))


def test_missing_file(tiny_bundle):
    (tiny_bundle / "tokenizer.tiktoken").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.tiktoken: missing file"):
        load_bundle(tiny_bundle)


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nowhere")


def test_checksum_mismatch(tiny_bundle):
    w = tiny_bundle / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: checksum mismatch"):
        load_bundle(tiny_bundle)


def test_shape_mismatch(tiny_bundle):
    w = tiny_bundle / "model.safetensors"
    state = load_file(str(w))
    state["wpe.weight"] = state["wpe.weight"][:10].clone()
    save_file(state, str(w))
    _rewrite_manifest(tiny_bundle)
    with pytest.raises(BundleError, match=r"tensor wpe\.weight has shape \(10, 32\) but config\.json implies \(64, 32\)"):
        load_bundle(tiny_bundle)


def test_missing_tensor(tiny_bundle):
    w = tiny_bundle / "model.safetensors"
    state = load_file(str(w))
    del state["blocks.0.attn.c_attn.weight"]
    save_file(state, str(w))
    _rewrite_manifest(tiny_bundle)
    with pytest.raises(BundleError, match=r"missing \['blocks\.0\.attn\.c_attn\.weight'\]"):
        load_bundle(tiny_bundle)


def test_unknown_format_version(tiny_bundle):
    cfg = json.loads((tiny_bundle / "config.json").read_text())
    cfg["format_version"] = 99
    (tiny_bundle / "config.json").write_text(json.dumps(cfg))
    _rewrite_manifest(tiny_bundle)
    with pytest.raises(BundleError, match="unknown bundle format version 99"):
        load_bundle(tiny_bundle)


def test_bad_config(tiny_bundle):
    cfg = json.loads((tiny_bundle / "config.json").read_text())
    cfg["model"]["n_head"] = 5
    (tiny_bundle / "config.json").write_text(json.dumps(cfg))
    _rewrite_manifest(tiny_bundle)
    with pytest.raises(BundleError, match="config.json: bad model config.*not divisible"):
        load_bundle(tiny_bundle)


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint does."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_pickle_is_never_loaded(tiny_bundle, tmp_path):
    """A pickle with code in it where the weights belong (its checksum re-recorded, so only
    the format stands in the way) is refused, and its code never runs."""
    import pickle

    sentinel = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Payload(sentinel)})
    pickle.loads(payload)  # the payload is live: unpickling it does create the file
    assert sentinel.exists()
    sentinel.unlink()
    (tiny_bundle / "model.safetensors").write_bytes(payload)
    _rewrite_manifest(tiny_bundle)
    with pytest.raises(BundleError, match="unreadable safetensors"):
        load_bundle(tiny_bundle)
    assert not sentinel.exists()
