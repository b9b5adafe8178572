"""Model bundles: the directory that training writes and serving loads.

    bundle/
      config.json          {"format_version": 1, "model": GPTConfig, "dtype": ...}
      model.safetensors    weights (tied heads stored once, as the embedding)
      tokenizer.tiktoken   the BPE ranks, so serving never needs the network
      manifest.json        sha256 of each file above
      draft/               optional: a fitted drafter (see draft/)

Loading never unpickles anything: the config is JSON, the weights are
safetensors. Every way a bundle can be broken is refused with a
``BundleError`` that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, GPTConfig
from .gpt import GPT
from .tokenizer import Tokenizer, find_ranks_file, sha256_file

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.tiktoken"
MANIFEST_FILE = "manifest.json"
DRAFT_DIR = "draft"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the file and the problem."""


@dataclass
class Bundle:
    path: Path
    config: GPTConfig
    model: GPT
    tokenizer: Tokenizer
    weights_sha256: str
    meta: dict = field(default_factory=dict)

    @property
    def draft_dir(self) -> Path:
        return self.path / DRAFT_DIR


def _stored_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict with tied heads dropped (they are the embedding)."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if not (k.startswith("exit_heads.") and k.endswith(".weight"))}
    return sd


def save_bundle(path: str | os.PathLike, model: GPT, tokenizer_ranks: str | os.PathLike | None = None,
                dtype: torch.dtype = torch.float32, extra_meta: dict | None = None) -> Path:
    """Write ``model`` as a bundle at ``path`` (created; existing core files are replaced)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(dtype)
    if dtype_name is None:
        raise ValueError(f"unsupported bundle dtype {dtype}; use one of {sorted(_DTYPES)}")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in _stored_state(model).items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    cfg = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "dtype": dtype_name}
    if extra_meta:
        cfg["meta"] = extra_meta
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    src = find_ranks_file(tokenizer_ranks)
    if src.resolve() != (path / TOKENIZER_FILE).resolve():
        shutil.copyfile(src, path / TOKENIZER_FILE)
    manifest = {"format_version": FORMAT_VERSION,
                "files": {name: sha256_file(path / name) for name in REQUIRED_FILES}}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{file}: not valid JSON ({e})") from None


def _read_config(path: Path) -> tuple[dict, GPTConfig]:
    cfg = _read_json(path / CONFIG_FILE)
    if cfg.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path / CONFIG_FILE}: unknown bundle format version {cfg.get('format_version')!r} "
                          f"(this treespec reads {FORMAT_VERSION})")
    try:
        return cfg, GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError, ConfigError) as e:
        raise BundleError(f"{path / CONFIG_FILE}: bad model config: {e}") from None


def update_bundle_meta(path: str | os.PathLike, **changes) -> dict:
    """Set (or, with None, remove) entries of a bundle's ``config.json`` meta,
    such as its chat template, and re-record the checksum. The weights and
    the model config are untouched, so a fitted drafter stays valid. Both
    files are replaced atomically; returns the new meta."""
    path = Path(path)
    cfg, _ = _read_config(path)
    meta = dict(cfg.get("meta", {}))
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    if meta:
        cfg["meta"] = meta
    else:
        cfg.pop("meta", None)
    manifest = _read_json(path / MANIFEST_FILE)
    _replace(path / CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    manifest.setdefault("files", {})[CONFIG_FILE] = sha256_file(path / CONFIG_FILE)
    _replace(path / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return meta


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_bundle_config(path: str | os.PathLike) -> GPTConfig:
    """A bundle's ``GPTConfig`` alone, without loading (or verifying) its weights."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise BundleError(f"{path / CONFIG_FILE}: missing file; is {path} a bundle?")
    return _read_config(path)[1]


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Bundle:
    """Load and verify a bundle; the model comes back in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    for name in (*REQUIRED_FILES, MANIFEST_FILE):
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing file; a bundle needs {', '.join(REQUIRED_FILES)} "
                              f"and {MANIFEST_FILE}")
    manifest = _read_json(path / MANIFEST_FILE)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path / MANIFEST_FILE}: unknown bundle format version "
                          f"{manifest.get('format_version')!r} (this treespec reads {FORMAT_VERSION})")
    listed = manifest.get("files", {})
    for name in REQUIRED_FILES:
        if name not in listed:
            raise BundleError(f"{path / MANIFEST_FILE}: no checksum recorded for {name}")
        actual = sha256_file(path / name)
        if actual != listed[name]:
            raise BundleError(f"{path / name}: checksum mismatch (manifest says {listed[name][:12]}…, "
                              f"file is {actual[:12]}…); the file is corrupt or was changed after saving")

    cfg, config = _read_config(path)

    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path / WEIGHTS_FILE}: unreadable safetensors file ({e})") from None
    model = GPT(config)
    expected = _stored_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{path / WEIGHTS_FILE}: tensors do not match {CONFIG_FILE}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise BundleError(f"{path / WEIGHTS_FILE}: tensor {k} has shape {tuple(state[k].shape)} "
                              f"but {CONFIG_FILE} implies {tuple(v.shape)}")
    model.load_state_dict({k: t.float() if t.is_floating_point() else t for k, t in state.items()},
                          strict=False)
    model.to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer(path / TOKENIZER_FILE)
    return Bundle(path=path, config=config, model=model, tokenizer=tokenizer,
                  weights_sha256=listed[WEIGHTS_FILE], meta=cfg.get("meta", {}))
