"""``treespec export BUNDLE --to gguf OUT.gguf``: a GGUF file for llama.cpp.

The file uses llama.cpp's ``gpt2`` architecture and carries the tokenizer
(GPT-2's byte-level BPE: tokens, merges, end-of-text), so llama.cpp and its
bindings load it with nothing else beside it. It is written with the ``gguf``
package that llama.cpp publishes (the ``interop`` extra).

Two things differ from treespec's own bundle, both invisible to decoding:

* The vocabulary is cut to GPT-2's 50257 tokens: llama.cpp wants one
  embedding row per token, and the padding rows are never generated.
* llama.cpp's ``gpt2`` graph computes GELU with the tanh approximation. A
  model trained with the exact GELU (``activation: gelu``, every model
  ``treespec train`` makes) therefore differs from llama.cpp in the last
  digits of its activations; greedy tokens agree except where two logits
  are nearly tied (``bench/peers.py`` records the agreement).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import GPT2_VOCAB
from .interop import InteropError, _atomic_file, byte_to_unicode, final_exit_state, gpt2_merges
from .tokenizer import EOT_ID, EOT_TEXT

GGUF_TYPES = ("f32", "f16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InteropError("GGUF export needs the gguf package: pip install 'treespec[interop]'") from None
    return gguf


def gguf_tensors(bundle, qtype: str) -> list[tuple[str, np.ndarray, object | None]]:
    """(GGUF name, data, raw ggml type or None) for each tensor of the final exit.

    Matrices take ``qtype``; vectors (norms, biases) and the small position
    table stay f32, as llama.cpp's own converter keeps them.
    """
    gguf = _gguf()
    st = final_exit_state(bundle)
    n_vocab = min(GPT2_VOCAB, bundle.config.vocab_size)
    names = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    per_block = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    if bundle.config.tie_embeddings:  # llama.cpp reads the output head from token_embd when output is absent
        del st["lm_head.weight"]
    out = []
    for k, t in st.items():
        if k in names:
            name = names[k]
        else:
            _, i, *rest = k.split(".")
            part, kind = ".".join(rest[:-1]), rest[-1]
            name = f"blk.{i}.{per_block[part]}.{kind}"
        a = t.numpy().astype(np.float32)
        if k in ("wte.weight", "lm_head.weight"):
            a = a[:n_vocab]
        if a.ndim < 2 or k == "wpe.weight" or qtype == "f32":
            out.append((name, np.ascontiguousarray(a), None))
        elif qtype == "f16":
            out.append((name, a.astype(np.float16), None))
        else:
            q = gguf.GGMLQuantizationType.Q8_0
            out.append((name, gguf.quants.quantize(a, q), q))
    return out


def export_gguf(bundle_path: str | os.PathLike, out: str | os.PathLike, qtype: str = "f16", *,
                force: bool = False, log=print) -> Path:
    from .bundle import load_bundle
    from tiktoken.load import load_tiktoken_bpe

    if qtype not in GGUF_TYPES:
        raise InteropError(f"--type must be one of {list(GGUF_TYPES)}, got {qtype!r}")
    gguf = _gguf()
    bundle = load_bundle(bundle_path)
    c = bundle.config
    tensors = gguf_tensors(bundle, qtype)
    if c.activation != "gelu_tanh":
        log("note: llama.cpp's gpt2 architecture uses the tanh approximation of GELU; this model was "
            "trained with the exact GELU, so its logits there differ in the last digits")
    ranks = load_tiktoken_bpe(str(bundle.tokenizer.ranks_path))
    table = byte_to_unicode()
    spell = lambda b: "".join(table[x] for x in b)  # noqa: E731
    tokens = [spell(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])] + [EOT_TEXT]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    with _atomic_file(Path(out), force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="gpt2")
        w.add_name(bundle.path.resolve().name)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_eps)
        w.add_file_type(ftype)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
        w.add_token_merges([f"{spell(a)} {spell(b)}" for a, b in gpt2_merges(ranks)])
        w.add_bos_token_id(EOT_ID)
        w.add_eos_token_id(EOT_ID)
        w.add_add_bos_token(False)
        for name, data, raw in tensors:
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


__all__ = ["export_gguf", "gguf_tensors", "GGUF_TYPES"]
