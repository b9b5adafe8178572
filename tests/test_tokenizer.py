import hashlib
import shutil

import pytest
import tiktoken

from treespec.model import Tokenizer
from treespec.model.tokenizer import EOT_ID, R50K_SHA256, TokenizerNotFound, find_ranks_file, sha256_file

SAMPLES = [
    "def forward(self, x):\n    return self.proj(x)  # ok\n",
    "ROMEO. But soft, what light through yonder window breaks?",
    "Café crème, naïve façade, Ærøskøbing, Ελληνικά, Русский, 中文字符, 日本語のテキスト",
    "emoji: 🎉🚀👩‍👩‍👧‍👦 and flags 🇳🇴🇯🇵, math ∑∫√∞ ≠ ≤",
    "  leading spaces\tand\ttabs\n\n\nnewlines   ",
]


@pytest.fixture(scope="module")
def tok(ranks_path):
    return Tokenizer(ranks_path)


@pytest.fixture(scope="module")
def reference(ranks_path, tmp_path_factory):
    """tiktoken's own r50k_base, fed the same ranks through its cache (no network)."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    shutil.copyfile(ranks_path, cache / hashlib.sha1(url.encode()).hexdigest())
    import os
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("r50k_base")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def test_ranks_file_is_r50k(ranks_path):
    assert sha256_file(ranks_path) == R50K_SHA256


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_tiktoken(tok, reference, text):
    assert tok.encode(text) == reference.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text


def test_eot(tok):
    assert tok.eot_id == EOT_ID == 50256
    assert tok.n_vocab == 50257
    # User text that spells the special token is ordinary text by default.
    assert EOT_ID not in tok.encode("a <|endoftext|> b")
    assert EOT_ID in tok.encode("a <|endoftext|> b", allow_eot=True)


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_detokenizer_never_splits_characters(tok, text):
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_split_characters_are_really_exercised(tok):
    # At least one sample must put a character's bytes into two tokens,
    # otherwise the test above proves nothing.
    ids = tok.encode(SAMPLES[3])
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial


def test_invalid_bytes_come_out_replaced_at_flush(tok):
    detok = tok.detokenizer()
    lone = tok.encode("é")  # a single token holding both bytes
    # Find a token whose bytes are a lone UTF-8 lead byte.
    lead = next(i for i in range(tok.n_vocab - 1) if tok.token_bytes(i) == b"\xc3")
    assert detok.push(lead) == ""
    assert detok.flush() == "\ufffd"
    assert lone


def test_missing_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_TOKENIZER", str(tmp_path / "nope.tiktoken"))
    with pytest.raises(TokenizerNotFound, match="TREESPEC_TOKENIZER"):
        find_ranks_file()
