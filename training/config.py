"""TrainConfig: every knob of a training run, with presets and overrides.

Precedence, lowest first: the dataclass defaults, the preset (``--preset``),
a config file (``--config FILE.json``), then ``--key=value`` arguments.
Model architecture fields are set with ``--model.FIELD=value`` (any
``GPTConfig`` field) on top of the preset named by ``model``; they are not
repeated here, so the saved bundle's config.json stays the one source.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..model.bundle import BundleError, read_bundle_config
from ..model.config import GPTConfig, PRESETS


class TrainConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # what to train
    model: str = "cpu-default"  # a model preset from model/config.py
    model_overrides: dict = field(default_factory=dict)  # --model.FIELD=value
    # A bundle to start from: its GPTConfig and weights, with a fresh optimizer
    # and schedule (fine-tuning, or more training for a model whose checkpoint
    # is gone). "" trains from scratch. ``model`` and ``model_overrides`` do not apply.
    init_from: str = ""
    data_dir: str = "data/default"
    out_dir: str = "runs/default"
    # batch: tokens per optimizer step = batch_size * seq_len * grad_accum * world size
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 4
    max_steps: int = 2000
    # AdamW; weight decay on matrices only
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant | hypergradient
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # hypergradient descent (Baydin et al., 2018): lr += -beta * g_t . (dθ_{t-1}/dlr)
    hypergrad_beta: float = 1e-7
    hypergrad_lr_min: float = 1e-5
    hypergrad_lr_max: float = 3e-3
    # intermediate exits' loss on this fraction of positions (1.0 = all)
    exit_sample_frac: float = 0.25
    # evaluation, logging, checkpoints
    eval_interval: int = 200
    eval_tokens: int = 16384  # per domain per evaluation
    log_interval: int = 10
    ckpt_interval: int = 100
    # hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # bf16 autocast (weights and optimizer stay fp32). "auto": on CUDA with bf16,
    # and on CPUs with native bf16 dot products (AVX-512 BF16 or AMX), where it
    # doubled training throughput (bench/train_throughput.py: 544 -> 1071
    # tokens/s for cpu-default). Elsewhere, e.g. an AVX2-only CPU, PyTorch's bf16
    # matmul falls back to a slow reference kernel, so "auto" trains in fp32 there.
    autocast_bf16: str = "auto"  # auto | on | off
    compile: bool = False  # torch.compile, on CUDA only
    threads: int = 0  # CPU threads (0 = torch's default)
    seed: int = 1337
    save_dtype: str = "float16"  # bundle weights: float32 | float16 | bfloat16
    progress: bool = True

    def validate(self) -> None:
        if self.model not in PRESETS:
            raise TrainConfigError(f"unknown model preset {self.model!r}; choose one of {sorted(PRESETS)}")
        if self.lr_schedule not in ("cosine", "constant", "hypergradient"):
            raise TrainConfigError(f"lr_schedule must be cosine, constant or hypergradient, got {self.lr_schedule!r}")
        if not 0 < self.exit_sample_frac <= 1:
            raise TrainConfigError(f"exit_sample_frac must be in (0, 1], got {self.exit_sample_frac}")
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_interval", "ckpt_interval",
                     "log_interval"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")
        words = {"true": "on", "1": "on", "yes": "on", "on": "on", "false": "off", "0": "off", "no": "off",
                 "off": "off", "auto": "auto"}
        mode = words.get(str(self.autocast_bf16).lower())  # TrainConfig(autocast_bf16=True) reads as "true"
        if mode is None:
            raise TrainConfigError(f"autocast_bf16 must be auto, on or off, got {self.autocast_bf16!r}")
        self.autocast_bf16 = mode
        if self.lr_schedule == "cosine" and self.min_lr > self.lr:
            raise TrainConfigError(f"min_lr={self.min_lr} exceeds lr={self.lr}: the cosine would rise, not decay "
                                   f"(a preset's min_lr may need lowering with its lr)")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise TrainConfigError(f"save_dtype must be float32, float16 or bfloat16, got {self.save_dtype!r}")
        if self.init_from and self.model_overrides:
            raise TrainConfigError(f"init_from={self.init_from!r} takes the model config from that bundle; "
                                   f"--model.* overrides ({sorted(self.model_overrides)}) cannot change it")
        cfg = self.gpt_config()
        if self.seq_len > cfg.block_size:
            raise TrainConfigError(f"seq_len={self.seq_len} exceeds the model's block_size={cfg.block_size}")

    def gpt_config(self) -> GPTConfig:
        if self.init_from:
            try:
                return read_bundle_config(self.init_from)
            except BundleError as e:
                raise TrainConfigError(f"init_from: {e}") from None
        return GPTConfig(**{**PRESETS[self.model], **self.model_overrides})

    def tokens_per_step(self, world_size: int = 1) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# `treespec train --help`: every field, grouped as the dataclass groups them,
# with one line each (tests/test_train.py checks that none is missing).
FIELD_GROUPS: dict[str, dict[str, str]] = {
    "what to train": {
        "model": "model preset from model/config.py (cpu-default, gpt2-small, ...)",
        "model_overrides": "any GPTConfig field of the model preset (e.g. --model.n_layer=8)",
        "init_from": "a bundle to start from (its config and weights; fresh optimizer); empty: from scratch",
        "data_dir": "a corpus made by treespec prepare-data",
        "out_dir": "where ckpt.pt, metrics.jsonl, loss.png and bundle/ go",
    },
    "batch (tokens per step = batch_size * seq_len * grad_accum * processes)": {
        "batch_size": "sequences per micro-batch",
        "seq_len": "tokens per sequence (at most the model's block_size)",
        "grad_accum": "micro-batches per optimizer step",
        "max_steps": "optimizer steps in the whole run",
    },
    "optimizer (AdamW; weight decay on matrices only)": {
        "lr": "peak learning rate",
        "min_lr": "learning rate at the end of the cosine",
        "warmup_steps": "linear warm-up steps",
        "lr_schedule": "cosine, constant or hypergradient",
        "weight_decay": "AdamW weight decay",
        "beta1": "AdamW beta1",
        "beta2": "AdamW beta2",
        "grad_clip": "clip the gradient norm to this (0: off)",
        "hypergrad_beta": "hypergradient descent's step on the learning rate (Baydin et al., 2018)",
        "hypergrad_lr_min": "hypergradient: lowest learning rate",
        "hypergrad_lr_max": "hypergradient: highest learning rate",
        "exit_sample_frac": "intermediate exits' loss on this fraction of positions (1.0: all)",
    },
    "evaluation, logging, checkpoints": {
        "eval_interval": "steps between held-out evaluations",
        "eval_tokens": "held-out tokens per domain per evaluation",
        "log_interval": "steps between log lines",
        "ckpt_interval": "steps between checkpoints (ckpt.pt; --resume continues from it)",
    },
    "hardware": {
        "device": "auto, cpu, cuda or cuda:N",
        "autocast_bf16": "auto (where bf16 is native), on or off",
        "compile": "torch.compile the model (CUDA only)",
        "threads": "CPU threads (0: torch's default)",
        "seed": "seed of the weights, the data order and dropout",
        "save_dtype": "bundle weights: float32, float16 or bfloat16",
        "progress": "show a progress bar (false: a plain line every log_interval steps, for log files)",
    },
}


def config_help() -> str:
    """Every TrainConfig field with its type, default and one line, by group."""
    defaults = TrainConfig()
    types = {f.name: f.type for f in fields(TrainConfig)}
    lines = ["training settings (--key=value; --model.FIELD=value for the architecture):"]
    for group, names in FIELD_GROUPS.items():
        lines.append(f"\n  {group}:")
        for name, text in names.items():
            default = getattr(defaults, name)
            shown = "{}" if default == {} else repr(default) if isinstance(default, str) else default
            flag = "--model.FIELD=<value>" if name == "model_overrides" else f"--{name}=<{types[name]}>"
            lines.append(f"    {flag}  {text} (default {shown})")
    return "\n".join(lines)


# A run is a preset of TrainConfig plus overrides.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The shipped models/default's budget: 4,400 steps = 18.0M tokens. Its
    # 6 x 256 run logged 564 tokens/s (median) in fp32 on a 2-core Zen 3
    # EPYC, about 9 h; the 6 x 384 model before it logged 1,275 in
    # its last 1,560 steps, on an earlier session's CPU. Intermediate-exit
    # losses on 10% of positions.
    "cpu-default": dict(model="cpu-default", batch_size=4, seq_len=512, grad_accum=2, max_steps=4400,
                        lr=1.2e-3, min_lr=1.2e-4, warmup_steps=60, eval_interval=100, ckpt_interval=25,
                        exit_sample_frac=0.1, threads=2),
    # The seed design on one GPU.
    "gpt2-small": dict(model="gpt2-small", batch_size=16, seq_len=1024, grad_accum=8, max_steps=20000,
                       lr=6e-4, min_lr=6e-5, warmup_steps=700, eval_interval=500, ckpt_interval=500,
                       exit_sample_frac=1.0, compile=True),
}


def _coerce(name: str, typ: Any, raw: str) -> Any:
    typ = typing.get_origin(typ) or typ
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ in (int, float, str):
            return typ(raw)
        value = json.loads(raw)
        if typ in (list, dict) and not isinstance(value, typ):
            raise ValueError(raw)
        return value
    except (ValueError, json.JSONDecodeError):
        what = "a JSON list such as [4,5,6]" if typ is list else getattr(typ, "__name__", typ)
        raise TrainConfigError(f"--{name}={raw!r}: expected {what}") from None


def _check_file_value(name: str, typ: Any, value: Any) -> Any:
    """A config file's JSON value against the field's type (ints pass as floats)."""
    typ = typing.get_origin(typ) or typ
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          dict: lambda v: isinstance(v, dict)}.get(typ, lambda v: isinstance(v, list))
    if not ok(value):
        raise TrainConfigError(f"config file: {name}={value!r} should be {getattr(typ, '__name__', typ)}")
    return float(value) if typ is float else value


def _model_field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(GPTConfig)
    return {f.name: hints[f.name] for f in fields(GPTConfig)}


def build_train_config(preset: str | None = None, config_file: str | None = None,
                       overrides: list[str] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise TrainConfigError(f"unknown training preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
        values.update(TRAIN_PRESETS[preset])
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in fields(TrainConfig)}
    model_types = _model_field_types()
    if config_file is not None:
        try:
            from_file = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainConfigError(f"cannot read config file {config_file}: {e}") from None
        if not isinstance(from_file, dict):
            raise TrainConfigError(f"config file {config_file}: expected a JSON object of TrainConfig fields")
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise TrainConfigError(f"config file {config_file}: unknown training option(s) {unknown}")
        if isinstance(from_file.get("autocast_bf16"), bool):  # train_config.json of runs before "auto"
            from_file["autocast_bf16"] = "on" if from_file["autocast_bf16"] else "off"
        values.update({k: _check_file_value(k, hints[k], v) for k, v in from_file.items()})
    model_overrides = dict(values.pop("model_overrides", {}))
    bad = sorted(set(model_overrides) - set(model_types))
    if bad:
        raise TrainConfigError(f"model_overrides: unknown model field(s) {bad}; GPTConfig has {sorted(model_types)}")
    for arg in overrides or []:
        if not arg.startswith("--") or "=" not in arg:
            raise TrainConfigError(f"expected --key=value, got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        if key.startswith("model."):
            mk = key[len("model."):]
            if mk not in model_types:
                raise TrainConfigError(f"unknown model field {mk!r}; GPTConfig has {sorted(model_types)}")
            t = model_types[mk]
            model_overrides[mk] = _coerce(key, t if t in (int, float, str, bool) else list, raw)
            continue
        if key not in known or key == "model_overrides":
            raise TrainConfigError(f"unknown training option {key!r}; known: {sorted(known - {'model_overrides'})}")
        values[key] = _coerce(key, hints[key], raw)
    unknown = set(values) - known
    if unknown:
        raise TrainConfigError(f"unknown training option(s) {sorted(unknown)}")
    cfg = TrainConfig(**values, model_overrides=model_overrides)
    try:
        cfg.validate()
    except (ValueError, TypeError) as e:  # GPTConfig's ConfigError; a model override of the wrong type
        raise TrainConfigError(str(e)) from None
    return cfg
