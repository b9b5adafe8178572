"""The GPT-2 BPE (tiktoken ``r50k_base``), loaded from a local ranks file.

tiktoken normally downloads its ranks; treespec never touches the network.
The ranks come from, in order: an explicit path, ``$TREESPEC_TOKENIZER``,
or ``shared/tokenizers/r50k_base.tiktoken`` beside or above the working
directory or this checkout. A model bundle carries its own copy.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

# r50k_base's split pattern and special token, as tiktoken defines them.
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TEXT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_NAME = "r50k_base.tiktoken"


class TokenizerNotFound(FileNotFoundError):
    pass


def find_ranks_file(path: str | os.PathLike | None = None) -> Path:
    """Locate the r50k_base ranks without the network."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TokenizerNotFound(f"tokenizer ranks file not found: {p}")
        return p
    env = os.environ.get("TREESPEC_TOKENIZER")
    if env:
        p = Path(env)
        if not p.is_file():
            raise TokenizerNotFound(f"TREESPEC_TOKENIZER points to {p}, which is not a file")
        return p
    here = Path(__file__).resolve().parent
    roots = [Path.cwd(), *Path.cwd().parents, here, *here.parents]
    for root in roots:
        for cand in (root / "shared" / "tokenizers" / RANKS_NAME, root / "models" / "default" / "tokenizer.tiktoken"):
            if cand.is_file():
                return cand
    raise TokenizerNotFound(
        f"could not find {RANKS_NAME}: set TREESPEC_TOKENIZER to its path, or place it at "
        f"../shared/tokenizers/{RANKS_NAME} (treespec never downloads it)")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """encode/decode over r50k_base, with the end-of-text id."""

    def __init__(self, ranks_path: str | os.PathLike | None = None):
        self.ranks_path = find_ranks_file(ranks_path)
        ranks = load_tiktoken_bpe(str(self.ranks_path))
        self.enc = tiktoken.Encoding(
            name="r50k_base", pat_str=R50K_PAT, mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: EOT_ID})
        self.eot_id = EOT_ID
        self.n_vocab = self.enc.n_vocab

    def encode(self, text: str, allow_eot: bool = False) -> list[int]:
        """Encode text. ``<|endoftext|>`` in user text is ordinary text unless ``allow_eot``."""
        if allow_eot:
            return self.enc.encode(text, allowed_special={EOT_TEXT})
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of whole UTF-8 text.

    A BPE token may end in the middle of a multi-byte character (emoji and
    many accented letters span two or more tokens). The bytes of an unfinished
    character are held back until the token that completes it arrives, so a
    stream never shows a replacement character for text that is in fact
    valid. Bytes that can never become valid UTF-8 do come out as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        return self._decoder.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is still held back, replaced if incomplete."""
        return self._decoder.decode(b"", final=True)
