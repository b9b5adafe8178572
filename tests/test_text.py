"""TextStream: whole UTF-8 only, and never a stop sequence or text that may become one."""

import pytest

from treespec.draft.text import TextStream
from treespec.model import Tokenizer


@pytest.fixture(scope="module")
def tok(ranks_path):
    return Tokenizer(ranks_path)


def stream_all(tok, ids, stop=None):
    s = TextStream(tok, stop)
    out = []
    for t in ids:
        out.append(s.push(t))
        if s.stopped:
            break
    return s, out, s.finish()


def test_emoji_split_across_tokens_never_shows_a_replacement_character(tok):
    text = "I like 🐍 and 😀 ok, naïve café 日本語"
    ids = tok.encode(text)
    # the premise: some tokens end inside a character
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    s, out, tail = stream_all(tok, ids)
    assert all("\ufffd" not in piece for piece in out)
    assert "".join(out) + tail == text == s.text
    assert tail == ""  # nothing was left over: everything came out as it completed


def test_without_stops_text_is_released_token_by_token(tok):
    text = "def f(x):\n    return x + 1\n"
    ids = tok.encode(text)
    _, out, tail = stream_all(tok, ids)
    assert out == [tok.decode([t]) for t in ids] and tail == ""


def test_stop_split_across_tokens_is_held_back_and_never_released(tok):
    ids = tok.encode("Hello world\n\nBye")
    assert ids.count(198) == 2  # "\n" and "\n" are separate tokens
    s, out, tail = stream_all(tok, ids, stop=["\n\n"])
    assert s.stopped and s.stop_string == "\n\n"
    assert out == ["Hello", " world", "", ""]  # the first "\n" was held, then the stop completed
    assert tail == "" and s.text == "Hello world"
    with pytest.raises(RuntimeError):
        s.push(ids[-1])


def test_a_held_prefix_that_does_not_become_the_stop_is_released(tok):
    ids = tok.encode("one\ntwo\n")
    s, out, tail = stream_all(tok, ids, stop=["\n\n"])
    assert not s.stopped
    assert "".join(out) == "one\ntwo"  # the trailing "\n" might still start "\n\n"
    assert tail == "\n" and s.text == "one\ntwo\n"


def test_stop_inside_a_token_cuts_there_and_drops_the_rest(tok):
    ids = tok.encode("Hello world, again")
    s, out, tail = stream_all(tok, ids, stop=["lo wor"])
    assert s.stopped and s.text == "Hel" and "".join(out) + tail == "Hel"
    assert len(out) == 2  # " world" completed it; nothing after it was pushed


def test_earliest_of_several_stops_wins(tok):
    ids = tok.encode("alpha beta gamma delta")
    s, _, _ = stream_all(tok, ids, stop=["delta", "beta", "gam"])
    assert s.text == "alpha " and s.stop_string == "beta"


def test_stop_spanning_a_multibyte_character(tok):
    text = "say 😀 twice 😀!"
    s, out, tail = stream_all(tok, tok.encode(text), stop=["😀!"])
    assert s.text == "say 😀 twice " and all("\ufffd" not in o for o in out)
