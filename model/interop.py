"""Bring your own model: Hugging Face GPT-2 and nanoGPT checkpoints in, Hugging Face out.

``import_hf(DIR, OUT)`` and ``import_nanogpt(CKPT, OUT)`` turn a checkpoint
into a normal single-exit bundle (DWA off); ``export_hf(BUNDLE, OUT)`` writes
a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads.
GGUF export for llama.cpp is in ``gguf_export.py``.

The three layouts of the same network:

    treespec               Hugging Face GPT-2                nanoGPT
    wte, wpe               transformer.wte, .wpe             transformer.wte, .wpe
    blocks.i.ln_1          transformer.h.i.ln_1              transformer.h.i.ln_1
    blocks.i.attn.c_attn   transformer.h.i.attn.c_attn (*)   transformer.h.i.attn.c_attn
    blocks.i.attn.c_proj   transformer.h.i.attn.c_proj (*)   ...
    blocks.i.mlp.c_fc      transformer.h.i.mlp.c_fc (*)
    blocks.i.mlp.c_proj    transformer.h.i.mlp.c_proj (*)
    exit_ln.0              transformer.ln_f                  transformer.ln_f
    exit_heads.0           lm_head (tied to wte)             lm_head (tied to wte)

(*) Hugging Face stores these as ``Conv1D``: the weight is (in, out), the
transpose of ``nn.Linear``'s (out, in).

Nothing is written until everything has been read and checked: a bundle is
built in a temporary directory beside ``OUT`` and renamed into place, so a
refused input never leaves a half-written bundle behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .bundle import Bundle, load_bundle, save_bundle
from .config import GPT2_VOCAB, PADDED_VOCAB, GPTConfig
from .gpt import GPT
from .tokenizer import EOT_ID, EOT_TEXT, find_ranks_file
from tiktoken.load import load_tiktoken_bpe


class InteropError(ValueError):
    """A checkpoint or bundle that cannot be converted; the message says why."""


# --- GPT-2's byte-level BPE in Hugging Face's spelling ----------------------

def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, as vocab.json/merges.txt spell tokens.

    Bytes that are printable Latin-1 stand for themselves; the other 68
    (control characters, space, ...) are moved to code points 256 and up, in
    byte order, so every token is a string of visible characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _spell(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def gpt2_vocab(ranks: dict[bytes, int]) -> dict[str, int]:
    """vocab.json for the r50k ranks: spelled token -> id, with <|endoftext|>."""
    table = byte_to_unicode()
    vocab = {_spell(tok, table): rank for tok, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT_ID
    return vocab


def gpt2_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that produces ``ranks``: merge i creates token 256 + i.

    Each token's pair is found by running BPE over its bytes with only the
    merges ranked below it, which must leave exactly two parts (that is what
    makes a ranks file a BPE, and how tiktoken checks GPT-2's own files).
    """
    merges: list[tuple[bytes, bytes]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if rank < 256:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise InteropError(f"the ranks are not a BPE: token {rank} does not split into a merge")
        merges.append((parts[0], parts[1]))
    return merges


def write_gpt2_tokenizer(out: Path, ranks_path: str | os.PathLike, max_length: int) -> None:
    """vocab.json, merges.txt and tokenizer_config.json for Hugging Face's GPT2Tokenizer."""
    ranks = load_tiktoken_bpe(str(ranks_path))
    table = byte_to_unicode()
    (out / "vocab.json").write_text(json.dumps(gpt2_vocab(ranks), ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{_spell(a, table)} {_spell(b, table)}" for a, b in gpt2_merges(ranks)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}, indent=2) + "\n")


def _read_hf_tokenizer(src: Path) -> tuple[dict[str, int], list[str] | None]:
    """(vocab, merges as "a b" lines or None) from tokenizer.json or vocab.json/merges.txt."""
    if (src / "tokenizer.json").is_file():
        tj = json.loads((src / "tokenizer.json").read_text())
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise InteropError(f"{src / 'tokenizer.json'}: a {model.get('type')!r} tokenizer, not GPT-2's "
                               "byte-level BPE; treespec speaks GPT-2 BPE (tiktoken r50k_base) only")
        vocab = dict(model.get("vocab") or {})
        for added in tj.get("added_tokens") or []:
            vocab.setdefault(added["content"], added["id"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        return vocab, merges
    if (src / "vocab.json").is_file():
        vocab = json.loads((src / "vocab.json").read_text())
        merges = None
        if (src / "merges.txt").is_file():
            merges = [ln for ln in (src / "merges.txt").read_text(encoding="utf-8").split("\n")
                      if ln and not ln.startswith("#version")]
        return vocab, merges
    raise InteropError(f"{src}: no tokenizer.json or vocab.json; treespec needs to check that the model "
                       "uses GPT-2's BPE (pass --skip-tokenizer-check only if you know it does)")


def check_gpt2_tokenizer(src: Path, ranks_path: Path) -> None:
    """Refuse a Hugging Face directory whose tokenizer is not GPT-2's BPE."""
    vocab, merges = _read_hf_tokenizer(src)
    ranks = load_tiktoken_bpe(str(ranks_path))
    want = gpt2_vocab(ranks)
    if vocab != want:
        extra = sorted(set(vocab) - set(want), key=lambda t: vocab[t])[:3]
        moved = [t for t in want if t in vocab and vocab[t] != want[t]][:3]
        raise InteropError(
            f"{src}: the tokenizer is not GPT-2's BPE ({len(vocab)} tokens against GPT-2's {len(want)}"
            + (f"; tokens GPT-2 lacks: {extra}" if extra else "")
            + (f"; tokens with other ids: {moved}" if moved else "")
            + "). treespec speaks GPT-2 BPE (tiktoken r50k_base) only")
    if merges is not None:
        inv = {v: k for k, v in vocab.items()}
        bad = next((i for i, m in enumerate(merges)
                    if len(m.split(" ")) != 2 or vocab.get(m.replace(" ", "")) != 256 + i
                    or inv.get(256 + i) != m.replace(" ", "")), None)
        if len(merges) != len(ranks) - 256 or bad is not None:
            raise InteropError(f"{src}: the tokenizer's merges are not GPT-2's "
                               f"({len(merges)} merges; first difference at merge {bad}); "
                               "treespec speaks GPT-2 BPE (tiktoken r50k_base) only")


# --- reading checkpoints -------------------------------------------------------

def _load_pickle(path: Path) -> dict:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InteropError(f"{path}: refused: its pickle holds more than tensors and plain containers, and "
                           f"treespec never unpickles code (torch.load weights_only=True said: {first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InteropError(f"{path}: not a readable PyTorch checkpoint ({e})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InteropError(f"{path}: unreadable safetensors file ({e})") from None


def _hf_weights(src: Path, log) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return _load_safetensors(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_safetensors(src / shard))
        return state
    if (src / "pytorch_model.bin").is_file():
        log(f"note: reading {src / 'pytorch_model.bin'} with torch.load(weights_only=True); "
            "safetensors is preferred (no pickle at all)")
        return _load_pickle(src / "pytorch_model.bin")
    raise InteropError(f"{src}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


# Hugging Face activation names -> GPTConfig.activation.
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "gelu": "gelu"}
_HF_OUT = {v: k for k, v in {"gelu_new": "gelu_tanh", "gelu": "gelu"}.items()}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Buffers older checkpoints carry beside the weights (causal masks); not parameters.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise InteropError(f"{path}: missing; a Hugging Face model directory needs its config.json")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}: not valid JSON ({e})") from None
    mt = hf.get("model_type")
    if mt != "gpt2":
        raise InteropError(f"{path}: model_type {mt!r} is not supported; treespec imports GPT-2 "
                           "(model_type 'gpt2', architecture GPT2LMHeadModel) and nanoGPT checkpoints")
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise InteropError(f"{path}: activation_function {act!r} is not supported "
                           f"(supported: {sorted(_HF_ACTIVATIONS)})")
    n_embd = hf.get("n_embd", 768)
    refuse = {
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": bool(hf.get("add_cross_attention", False)),
    }
    bad = [k for k, v in refuse.items() if v]
    if bad:
        raise InteropError(f"{path}: {', '.join(f'{k}={hf.get(k)!r}' for k in bad)} is not supported: "
                           "treespec's GPT has a 4x MLP and attention scaled by 1/sqrt(head_dim)")
    return hf


def _padded(vocab_size: int) -> int:
    """The vocabulary rows treespec keeps: GPT-2's 50257 padded to 50304 (a
    multiple of 64, for faster matmuls); the padded ids are never generated."""
    if vocab_size < GPT2_VOCAB:
        raise InteropError(f"vocab_size {vocab_size} is smaller than GPT-2's {GPT2_VOCAB}: the model does not "
                           "use GPT-2's BPE (a character-level model?); treespec speaks GPT-2 BPE only")
    return PADDED_VOCAB if vocab_size == GPT2_VOCAB else vocab_size


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _to_treespec(state: dict[str, torch.Tensor], config: GPTConfig, prefix: str, conv1d: bool,
                 lm_head: str, source: str) -> dict[str, torch.Tensor]:
    """Rename (and for Conv1D, transpose) a GPT-2-layout state dict into GPT's,
    checking that every tensor is there, none is left over, and every shape fits."""
    state = {k: v for k, v in state.items() if not k.endswith(_BUFFERS)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        t = state.get(name)
        if t is not None:
            used.add(name)
        return t

    want = GPT(config).state_dict()
    for key in want:
        if key.startswith("exit_heads."):
            continue
        if key in ("wte.weight", "wpe.weight"):
            src_key = f"{prefix}{key}"
        elif key.startswith("exit_ln.0."):
            src_key = f"{prefix}ln_f.{key.split('.')[-1]}"
        else:
            src_key = f"{prefix}h.{key[len('blocks.'):]}"
        t = take(src_key)
        if t is None:
            raise InteropError(f"{source}: tensor {src_key!r} is missing")
        if conv1d and t.ndim == 2 and any(f".{m}." in src_key for m in _CONV1D):
            t = t.t()
        out[key] = t
    head = take(lm_head)
    if not config.tie_embeddings:
        if head is None:
            raise InteropError(f"{source}: tensor {lm_head!r} is missing (the output head is not tied)")
        out["exit_heads.0.weight"] = head
    extra = sorted(set(state) - used)
    if extra:
        raise InteropError(f"{source}: unexpected tensors {extra[:5]}{' …' if len(extra) > 5 else ''}: "
                           "not a GPT-2-shaped model")
    for k in ("wte.weight", "exit_heads.0.weight"):
        if k in out:
            out[k] = _pad_rows(out[k], config.vocab_size)
    for k, t in out.items():
        if tuple(t.shape) != tuple(want[k].shape):
            raise InteropError(f"{source}: tensor for {k} has shape {tuple(t.shape)}, "
                               f"but the config implies {tuple(want[k].shape)}")
    return {k: t.contiguous() for k, t in out.items()}


def _tied(state: dict[str, torch.Tensor], wte: str, head: str) -> bool:
    """An output head that is absent, or equal to the embedding, is tied to it."""
    return head not in state or (state[head].shape == state[wte].shape and torch.equal(state[head], state[wte]))


def _float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes), None) in (
        torch.float32, torch.float16, torch.bfloat16) else torch.float32


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise InteropError(f"{out}: already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def _atomic_file(out: Path, force: bool) -> Iterator[Path]:
    """A temporary file beside ``out`` that becomes ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise InteropError(f"{out}: already exists; pass --force to replace it")
    if out.is_dir():
        raise InteropError(f"{out}: is a directory; give a file name such as model.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _build_bundle(tmp: Path, config: GPTConfig, state: dict[str, torch.Tensor], ranks: Path,
                  dtype: torch.dtype, meta: dict) -> None:
    model = GPT(config)
    state = {k: v.float() for k, v in state.items()}
    if config.tie_embeddings:  # one matrix, shared: the state dict lists it twice
        state["exit_heads.0.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True)
    save_bundle(tmp, model, tokenizer_ranks=ranks, dtype=dtype, extra_meta=meta)


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
              dtype: torch.dtype | None = None, tokenizer: str | os.PathLike | None = None,
              log=print) -> Path:
    """A Hugging Face GPT-2 directory -> a single-exit treespec bundle at ``out``."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise InteropError(f"{src}: not a directory; --from hf takes a Hugging Face model directory")
    if out.exists() and not force:
        raise InteropError(f"{out}: already exists; pass --force to replace it")
    hf = _hf_config(src)
    ranks = find_ranks_file(tokenizer)
    check_gpt2_tokenizer(src, ranks)
    state = _hf_weights(src, log)
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    tie = hf.get("tie_word_embeddings", True) and _tied(state, f"{prefix}wte.weight", "lm_head.weight")
    n_layer = hf.get("n_layer", 12)
    config = GPTConfig(
        vocab_size=_padded(hf.get("vocab_size", GPT2_VOCAB)), block_size=hf.get("n_positions", 1024),
        n_layer=n_layer, n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768), dropout=0.0, bias=True,
        exit_layers=(n_layer,), exit_loss_weights=(1.0,), dwa=False, tie_embeddings=tie,
        activation=_HF_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    params = _to_treespec(state, config, prefix, conv1d=True, lm_head="lm_head.weight", source=str(src))
    meta = {"imported_from": {"format": "hf", "path": str(src.resolve()),
                              "architectures": hf.get("architectures")}}
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        template = json.loads(tc.read_text()).get("chat_template")
        if template:
            meta["chat_template"] = template
    with atomic_dir(out, force) as tmp:
        _build_bundle(tmp, config, params, ranks, dtype or _float_dtype(state), meta)
    return out


def import_nanogpt(ckpt: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                   dtype: torch.dtype | None = None, tokenizer: str | os.PathLike | None = None,
                   log=print) -> Path:
    """A nanoGPT ``ckpt.pt`` (``model_args`` + ``model``) -> a single-exit treespec bundle."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_file():
        raise InteropError(f"{ckpt}: file not found; --from nanogpt takes nanoGPT's ckpt.pt")
    if out.exists() and not force:
        raise InteropError(f"{out}: already exists; pass --force to replace it")
    data = _load_pickle(ckpt)
    if not isinstance(data, dict) or "model_args" not in data or "model" not in data:
        hint = ("; for a treespec run's ckpt.pt use --from checkpoint"
                if isinstance(data, dict) and "model_config" in data else "")
        raise InteropError(f"{ckpt}: not a nanoGPT checkpoint (it needs 'model_args' and 'model'; "
                           f"found {sorted(data)[:6] if isinstance(data, dict) else type(data).__name__}){hint}")
    args = data["model_args"]
    # torch.compile'd models save their parameters under "_orig_mod.".
    state = {k.removeprefix("_orig_mod."): v for k, v in data["model"].items()}
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise InteropError(f"{ckpt}: model_args lacks {missing}")
    n_layer = int(args["n_layer"])
    vocab = _padded(int(args["vocab_size"]))
    try:
        config = GPTConfig(
            vocab_size=vocab, block_size=int(args["block_size"]), n_layer=n_layer,
            n_head=int(args["n_head"]), n_embd=int(args["n_embd"]), dropout=0.0,
            bias=bool(args.get("bias", True)), exit_layers=(n_layer,), exit_loss_weights=(1.0,),
            tie_embeddings=_tied(state, "transformer.wte.weight", "lm_head.weight"))
    except ValueError as e:
        raise InteropError(f"{ckpt}: model_args do not describe a GPT ({e})") from None
    params = _to_treespec(state, config, "transformer.", conv1d=False, lm_head="lm_head.weight",
                          source=str(ckpt))
    ranks = find_ranks_file(tokenizer)
    meta = {"imported_from": {"format": "nanogpt", "path": str(ckpt.resolve()),
                              "iter_num": data.get("iter_num"),
                              "best_val_loss": float(data["best_val_loss"]) if "best_val_loss" in data else None}}
    log("note: nanoGPT checkpoints carry no tokenizer; assuming GPT-2's BPE (tiktoken r50k_base)")
    with atomic_dir(out, force) as tmp:
        _build_bundle(tmp, config, params, ranks, dtype or _float_dtype(state), meta)
    return out


# --- export ------------------------------------------------------------------

def exportable(bundle: Bundle) -> None:
    """Refuse what a plain GPT-2 cannot express."""
    c = bundle.config
    if c.dwa:
        raise InteropError(f"{bundle.path}: this model uses DenseFormer depth-weighted averaging (dwa=true), "
                           "which GPT-2 (Hugging Face, llama.cpp) has no equivalent for; it cannot be exported")
    skips = [name for name in ("embed_skip", "unet_skip") if getattr(c, name)]
    if skips:
        raise InteropError(f"{bundle.path}: this model uses skip connections ({', '.join(f'{n}=true' for n in skips)}), "
                           "which GPT-2 (Hugging Face, llama.cpp) has no equivalent for; it cannot be exported")


def final_exit_state(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The bundle's weights as a single-exit GPT-2 in treespec's names: the
    final exit's LayerNorm and head; zero biases where the model has none."""
    exportable(bundle)
    c, sd = bundle.config, bundle.model.state_dict()
    last = len(c.exit_layers) - 1
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
           "ln_f.weight": sd[f"exit_ln.{last}.weight"],
           "ln_f.bias": sd.get(f"exit_ln.{last}.bias", torch.zeros(c.n_embd)),
           "lm_head.weight": sd[f"exit_heads.{last}.weight"]}
    for i in range(c.n_layer):
        for name in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = sd[f"blocks.{i}.{name}.weight"]
            out[f"h.{i}.{name}.weight"] = w
            out[f"h.{i}.{name}.bias"] = sd.get(f"blocks.{i}.{name}.bias",
                                              torch.zeros(w.shape[0]) if w.ndim == 2 else torch.zeros_like(w))
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def export_hf(bundle_path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
              log=print) -> Path:
    """A bundle's final exit -> a Hugging Face GPT2LMHeadModel directory (fp32 safetensors)."""
    from safetensors.torch import save_file

    bundle = load_bundle(bundle_path)
    c = bundle.config
    state = final_exit_state(bundle)
    tied = c.tie_embeddings or torch.equal(state["lm_head.weight"], state["wte.weight"])
    hf = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            if not tied:
                hf[k] = v
            continue
        if v.ndim == 2 and any(f".{m}." in f".{k}" for m in _CONV1D):
            v = v.t().contiguous()  # Conv1D stores (in, out)
        hf[f"transformer.{k}"] = v
    if len(c.exit_layers) > 1:
        log(f"note: exporting the final exit (after block {c.n_layer}); the intermediate exits "
            f"{list(c.exit_layers[:-1])} have no Hugging Face equivalent")
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None, "activation_function": _HF_OUT[c.activation],
        "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": bool(tied), "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
        "torch_dtype": "float32",
    }
    with atomic_dir(Path(out), force) as tmp:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}, indent=2) + "\n")
        write_gpt2_tokenizer(tmp, bundle.tokenizer.ranks_path, c.block_size)
        template = bundle.meta.get("chat_template")
        if template:
            tc = json.loads((tmp / "tokenizer_config.json").read_text())
            tc["chat_template"] = template
            (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return Path(out)


__all__ = ["InteropError", "import_hf", "import_nanogpt", "export_hf", "final_exit_state",
           "check_gpt2_tokenizer", "write_gpt2_tokenizer", "gpt2_vocab", "gpt2_merges", "byte_to_unicode"]
