"""Import from Hugging Face GPT-2 and nanoGPT, export to Hugging Face and GGUF (docs/interop.md).

Every source model is built here, randomly initialised: nothing downloads.
Hugging Face's own GPT2LMHeadModel is the reference the imported bundle must
match; a nanoGPT checkpoint is built from one with the exact GELU, which is
nanoGPT's network in Hugging Face's layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from treespec.cli import main as cli_main
from treespec.draft.loop import generate_all
from treespec.draft.types import SamplingParams
from treespec.model import load_bundle, save_bundle
from treespec.model.gguf_export import export_gguf
from treespec.model.interop import InteropError, export_hf, gpt2_merges, import_hf, import_nanogpt, write_gpt2_tokenizer
from treespec.model.tokenizer import EOT_ID

from conftest import tiny_model

PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n",
           "To be, or not to be, that is the question:",
           "import os\nimport sys\n\nclass Config:\n"]


def hf_model(seed: int = 0, **kw) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    base = dict(vocab_size=50257, n_positions=96, n_embd=48, n_layer=3, n_head=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(kw)
    m = GPT2LMHeadModel(GPT2Config(**base)).eval()
    with torch.no_grad():  # larger than the 0.02 init, so the logits are not all near zero
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def gpt2_tokenizer_dir(tmp_path_factory, ranks_path):
    """A GPT-2 tokenizer built from the r50k ranks and saved by Hugging Face itself
    (so the directory has whatever files its current version writes)."""
    src = tmp_path_factory.mktemp("tok_src")
    write_gpt2_tokenizer(src, ranks_path, 96)
    tok = GPT2Tokenizer(str(src / "vocab.json"), str(src / "merges.txt"))
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


def save_hf(model: GPT2LMHeadModel, tok_dir: Path, out: Path, **tokenizer_config) -> Path:
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    if tokenizer_config:
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc.update(tokenizer_config)
        (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out


def treespec_logits(bundle, ids: list[int]) -> torch.Tensor:
    m = bundle.model
    return m.forward_step(torch.tensor([ids]), 0, m.new_cache()).logits[0]


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


# --- Hugging Face import -----------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_hf_import_matches_transformers(tmp_path, gpt2_tokenizer_dir, activation):
    hf = hf_model(activation_function=activation)
    src = save_hf(hf, gpt2_tokenizer_dir, tmp_path / "hf",
                  chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    import_hf(src, tmp_path / "bundle", log=lambda m: None)
    b = load_bundle(tmp_path / "bundle")
    c = b.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (3, 4, 48, 96)
    assert c.exit_layers == (3,) and c.exit_loss_weights == (1.0,) and not c.dwa and c.bias
    assert c.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation]
    assert c.vocab_size == 50304 and c.tie_embeddings
    assert b.meta["chat_template"] == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert (tmp_path / "bundle" / "tokenizer.tiktoken").read_bytes() == Path(b.tokenizer.ranks_path).read_bytes()
    for text in PROMPTS:
        ids = b.tokenizer.encode(text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        got = treespec_logits(b, ids)
        assert (got[:, :50257] - ref).abs().max().item() < 1e-4
        # the padded ids' logits are there but never generated (sliced to 50257 everywhere)
        assert got.shape[-1] == 50304
        out = generate_all(b.model, ids, SamplingParams(max_new_tokens=32), tokenizer=b.tokenizer)
        with torch.no_grad():
            hf_ids = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=EOT_ID, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        hf_new = hf_ids[0, len(ids):].tolist()
        assert out.token_ids == hf_new[:len(out.token_ids)]
        assert len(out.token_ids) == 32 or out.token_ids[-1] == EOT_ID


def test_hf_import_untied_head_and_pytorch_bin(tmp_path, gpt2_tokenizer_dir):
    hf = hf_model(seed=1, tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.copy_(torch.randn_like(hf.lm_head.weight) * 0.05)
    src = save_hf(hf, gpt2_tokenizer_dir, tmp_path / "hf")
    # The same weights as a pickle: read with weights_only=True, and the log says safetensors is preferred.
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    logs: list[str] = []
    import_hf(src, tmp_path / "bundle", log=logs.append)
    assert any("safetensors is preferred" in m for m in logs)
    b = load_bundle(tmp_path / "bundle")
    assert not b.config.tie_embeddings
    ids = b.tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (treespec_logits(b, ids)[:, :50257] - ref).abs().max().item() < 1e-4


def test_imported_bundle_serves_and_fits_a_drafter(tmp_path, gpt2_tokenizer_dir, draft_corpus):
    """`inspect`, `generate` and `draft-fit` work on an imported bundle, unchanged."""
    src = save_hf(hf_model(seed=2), gpt2_tokenizer_dir, tmp_path / "hf")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(["import", "--from", "hf", str(src), "--out", str(tmp_path / "b")]) == 0
        assert cli_main(["inspect", str(tmp_path / "b"), "--json"]) == 0
        assert cli_main(["draft-fit", "--bundle", str(tmp_path / "b"), "--data-dir", str(draft_corpus),
                         "--contexts", "24", "--steps-per-context", "8", "--k-max", "3", "--classes", "8",
                         "--pca-dims", "4", "--threshold", "0", "--min-context", "8", "--max-context", "24",
                         "--rounds", "20", "--verify-ms", "1.9,1.9,1.9,3.2", "--no-progress"]) == 0
        assert cli_main(["generate", "--bundle", str(tmp_path / "b"), "--prompt", "the cat sat",
                         "--drafter", "tree", "--max-new-tokens", "12", "--json"]) == 0
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'b'}: ") and "activation gelu_tanh" in lines[0]
    assert (tmp_path / "b" / "draft" / "meta.json").is_file()
    result = json.loads(buf.getvalue()[buf.getvalue().rindex("\n{"):])
    assert len(result["token_ids"]) == 12


# --- nanoGPT import --------------------------------------------------------------

def nanogpt_checkpoint(hf: GPT2LMHeadModel, path: Path, bias: bool = True) -> Path:
    """nanoGPT's ckpt.pt for ``hf`` (exact GELU): its Linear layout, the `_orig_mod.`
    prefix torch.compile leaves, the causal-mask buffers, and the training extras."""
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith(".weight") and any(f".{m}." in k for m in ("c_attn", "c_proj", "c_fc")):
            v = v.t().contiguous()
        if not bias and k.endswith(".bias"):
            continue
        sd[f"_orig_mod.{k}"] = v
    c = hf.config
    for i in range(c.n_layer):  # nanoGPT's non-flash causal mask buffer
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(c.n_positions, c.n_positions)).view(
            1, 1, c.n_positions, c.n_positions)
    sd["_orig_mod.lm_head.weight"] = sd["_orig_mod.transformer.wte.weight"]
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                      bias=bias, vocab_size=c.vocab_size, dropout=0.0)
    torch.save({"model": sd, "model_args": model_args, "optimizer": {"state": {}, "param_groups": []},
                "iter_num": 5000, "best_val_loss": torch.tensor(3.25), "config": {"dataset": "openwebtext"}},
               path)
    return path


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_import_matches_source(tmp_path, bias):
    hf = hf_model(seed=3, activation_function="gelu")
    if not bias:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    ckpt = nanogpt_checkpoint(hf, tmp_path / "ckpt.pt", bias=bias)
    import_nanogpt(ckpt, tmp_path / "bundle", log=lambda m: None)
    b = load_bundle(tmp_path / "bundle")
    assert b.config.activation == "gelu" and b.config.bias is bias and b.config.tie_embeddings
    assert b.meta["imported_from"]["iter_num"] == 5000
    assert b.meta["imported_from"]["best_val_loss"] == pytest.approx(3.25)
    for text in PROMPTS:
        ids = b.tokenizer.encode(text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (treespec_logits(b, ids)[:, :50257] - ref).abs().max().item() < 1e-4


# --- export ----------------------------------------------------------------------

def test_export_hf_loads_in_transformers_and_round_trips(tmp_path, ranks_path):
    model = tiny_model(seed=4, block_size=64)  # three exits, exact GELU, biases
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_bundle(tmp_path / "bundle", model, ranks_path)
    logs: list[str] = []
    export_hf(path, tmp_path / "hf", log=logs.append)
    assert any("intermediate exits [2, 3]" in m for m in logs)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.activation_function == "gelu"
    tok = GPT2Tokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    b = load_bundle(path)
    for text in PROMPTS[:2]:
        ids = b.tokenizer.encode(text)
        assert tok(text)["input_ids"] == ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (treespec_logits(b, ids) - ref).abs().max().item() < 1e-4

    import_hf(tmp_path / "hf", tmp_path / "again", log=lambda m: None)
    again = load_bundle(tmp_path / "again")
    src, back = b.model.state_dict(), again.model.state_dict()
    last = len(b.config.exit_layers) - 1
    for k, v in back.items():
        orig = src[k.replace("exit_ln.0", f"exit_ln.{last}").replace("exit_heads.0", f"exit_heads.{last}")]
        assert torch.equal(v, orig), k
    ids = b.tokenizer.encode(PROMPTS[2])
    assert torch.equal(treespec_logits(again, ids), treespec_logits(b, ids))


def test_export_refuses_dwa(tmp_path, ranks_path):
    path = save_bundle(tmp_path / "bundle", tiny_model(dwa=True), ranks_path)
    with pytest.raises(InteropError, match="depth-weighted averaging"):
        export_hf(path, tmp_path / "hf")
    assert_nothing_written(tmp_path, tmp_path / "hf")
    with pytest.raises(InteropError, match="depth-weighted averaging"):
        export_gguf(path, tmp_path / "m.gguf", "f16", log=lambda m: None)
    assert_nothing_written(tmp_path, tmp_path / "m.gguf")


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_export_gguf_reads_back(tmp_path, ranks_path, qtype):
    model = tiny_model(seed=5, block_size=64)
    path = save_bundle(tmp_path / "bundle", model, ranks_path)
    out = export_gguf(path, tmp_path / "m.gguf", qtype, log=lambda m: None)
    r = gguf.GGUFReader(str(out))

    def field(name):
        f = r.fields[name]
        return f.contents()

    assert field("general.architecture") == "gpt2"
    assert field("gpt2.block_count") == 4 and field("gpt2.embedding_length") == 32
    assert field("gpt2.context_length") == 64 and field("gpt2.feed_forward_length") == 128
    assert field("gpt2.attention.head_count") == 2
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[EOT_ID] == "<|endoftext|>" and tokens[220] == "Ġ"
    assert field("tokenizer.ggml.token_type")[EOT_ID] == gguf.TokenType.CONTROL
    merges = field("tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert field("tokenizer.ggml.eos_token_id") == EOT_ID
    tensors = {t.name: t for t in r.tensors}
    # tied: no output.weight, llama.cpp reads the head from token_embd
    names = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(4):
        names |= {f"blk.{i}.{p}.{k}" for p in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up",
                                                 "ffn_down") for k in ("weight", "bias")}
    assert set(tensors) == names
    want_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[qtype]
    # GGUF lists shapes innermost first: (in, out) for a (out, in) matrix
    assert tensors["token_embd.weight"].shape.tolist() == [32, 50257]
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [32, 96]
    assert tensors["blk.0.ffn_down.weight"].shape.tolist() == [128, 32]
    assert tensors["blk.0.attn_qkv.weight"].tensor_type.name == want_type
    assert tensors["position_embd.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    qkv = model.blocks[0].attn.c_attn.weight.detach().numpy()
    data = np.asarray(tensors["blk.0.attn_qkv.weight"].data)
    if qtype == "q8_0":
        data = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
    tol = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2}[qtype]
    assert np.abs(data.reshape(qkv.shape).astype(np.float32) - qkv).max() <= tol * np.abs(qkv).max()


def test_export_gguf_untied_head(tmp_path, ranks_path):
    model = tiny_model(seed=5, tie_embeddings=False)
    path = save_bundle(tmp_path / "bundle", model, ranks_path)
    r = gguf.GGUFReader(str(export_gguf(path, tmp_path / "m.gguf", "f32", log=lambda m: None)))
    head = {t.name: t for t in r.tensors}["output.weight"]
    assert head.shape.tolist() == [32, 50257]
    want = model.exit_heads[-1].weight.detach().numpy()[:50257]
    assert np.array_equal(np.asarray(head.data).reshape(want.shape), want)


def test_merges_rebuild_the_ranks(ranks_path):
    """Merge i makes token 256 + i, and its two parts are tokens ranked below it."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(ranks_path))
    merges = gpt2_merges(ranks)
    assert len(merges) == 50000
    for i, (a, b) in enumerate(merges):
        assert ranks[a + b] == 256 + i and ranks[a] < 256 + i and ranks[b] < 256 + i


# --- refusals: the message, and nothing written ---------------------------------

def _import_cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(["import", *argv])
    return rc, err.getvalue()


def test_import_refusals_write_nothing(tmp_path, gpt2_tokenizer_dir):
    good = save_hf(hf_model(seed=6), gpt2_tokenizer_dir, tmp_path / "good")
    out = tmp_path / "out"
    cases = {}

    cases["missing"] = (tmp_path / "nope", "not a directory")

    llama = save_hf(hf_model(seed=6), gpt2_tokenizer_dir, tmp_path / "llama")
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    cases["llama"] = (llama, "model_type 'llama' is not supported")

    def edited(name, edit):
        d = save_hf(hf_model(seed=6), gpt2_tokenizer_dir, tmp_path / name)
        sd = load_file(str(d / "model.safetensors"))
        edit(sd)
        save_file(sd, str(d / "model.safetensors"))
        return d

    cases["missing tensor"] = (edited("m1", lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight")),
                               "'transformer.h.1.mlp.c_fc.weight' is missing")
    cases["extra tensor"] = (edited("m2", lambda sd: sd.__setitem__("transformer.h.9.mlp.c_fc.weight",
                                                                    torch.zeros(3))),
                             "unexpected tensors ['transformer.h.9.mlp.c_fc.weight']")
    cases["shape"] = (edited("m3", lambda sd: sd.__setitem__("transformer.h.0.attn.c_proj.weight",
                                                             torch.zeros(48, 40))),
                      "has shape (40, 48), but the config implies (48, 48)")

    other_tok = save_hf(hf_model(seed=6), gpt2_tokenizer_dir, tmp_path / "tok")
    for f in ("tokenizer.json", "vocab.json"):
        p = other_tok / f
        if p.exists():
            j = json.loads(p.read_text())
            v = j["model"]["vocab"] if f == "tokenizer.json" else j
            v["Ġthe"], v["Ġand"] = v["Ġand"], v["Ġthe"]
            p.write_text(json.dumps(j))
    cases["tokenizer"] = (other_tok, "the tokenizer is not GPT-2's BPE")

    for name, (src, message) in cases.items():
        rc, err = _import_cli("--from", "hf", str(src), "--out", str(out))
        assert rc == 2, name
        assert message in err, (name, err)
        assert_nothing_written(tmp_path, out)

    out.mkdir()
    rc, err = _import_cli("--from", "hf", str(good), "--out", str(out))
    assert rc == 2 and "already exists; pass --force" in err
    assert list(out.iterdir()) == []
    rc, err = _import_cli("--from", "hf", str(good), "--out", str(out), "--force")
    assert rc == 0, err
    assert load_bundle(out).config.n_layer == 3


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_pickle_with_code_is_refused(tmp_path, gpt2_tokenizer_dir):
    sentinel = tmp_path / "pwned"
    src = save_hf(hf_model(seed=7), gpt2_tokenizer_dir, tmp_path / "hf")
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save({**sd, "evil": _Payload(sentinel)}, src / "pytorch_model.bin")
    rc, err = _import_cli("--from", "hf", str(src), "--out", str(tmp_path / "out"))
    assert rc == 2 and "refused: its pickle holds more than tensors" in err
    assert not sentinel.exists()
    assert_nothing_written(tmp_path, tmp_path / "out")

    torch.save({"model": sd, "model_args": {}, "evil": _Payload(sentinel)}, tmp_path / "ckpt.pt")
    rc, err = _import_cli("--from", "nanogpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "refused: its pickle holds more than tensors" in err
    assert not sentinel.exists()
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_nanogpt_refusals(tmp_path):
    hf = hf_model(seed=8, activation_function="gelu")
    ckpt = nanogpt_checkpoint(hf, tmp_path / "ckpt.pt")
    data = torch.load(ckpt, weights_only=True)
    char = {**data, "model_args": {**data["model_args"], "vocab_size": 65}}
    torch.save(char, tmp_path / "char.pt")
    rc, err = _import_cli("--from", "nanogpt", str(tmp_path / "char.pt"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "vocab_size 65 is smaller than GPT-2's 50257" in err
    torch.save({"state_dict": data["model"]}, tmp_path / "other.pt")
    rc, err = _import_cli("--from", "nanogpt", str(tmp_path / "other.pt"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "not a nanoGPT checkpoint" in err
    rc, err = _import_cli("--from", "nanogpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "file not found" in err
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_export_cli_refuses_existing_output(tmp_path, ranks_path):
    path = save_bundle(tmp_path / "bundle", tiny_model(), ranks_path)
    (tmp_path / "m.gguf").write_text("keep me")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(["export", str(path), "--to", "gguf", str(tmp_path / "m.gguf"), "--type", "q8_0"])
    assert rc == 2 and "already exists; pass --force" in err.getvalue()
    assert (tmp_path / "m.gguf").read_text() == "keep me"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".m.gguf.")] == []
