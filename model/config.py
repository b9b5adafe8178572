"""GPTConfig: the one description of a network, saved beside its weights.

A bundle's ``config.json`` holds exactly this dataclass (plus a format
version), and ``GPTConfig.from_dict`` rebuilds it on load. Serving settings
point at a bundle; they never repeat these fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# The seed design: exits after blocks 8, 10 and 12 of a 12-block model, with
# loss weights 0.05, 0.15 and 0.8. Other depths scale these positions.
SEED_EXIT_FRACTIONS = (8 / 12, 10 / 12, 12 / 12)
SEED_EXIT_WEIGHTS = (0.05, 0.15, 0.8)

# activation name -> the ``approximate`` argument of torch's GELU.
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}

GPT2_VOCAB = 50257
PADDED_VOCAB = 50304  # 50257 rounded up to a multiple of 64: faster matmuls


class ConfigError(ValueError):
    """A GPTConfig that cannot describe a working network."""


def seed_exit_layers(n_layer: int) -> tuple[int, ...]:
    """The seed's 8/10/12-of-12 exit positions scaled to ``n_layer`` blocks."""
    layers = sorted({max(1, min(n_layer, round(f * n_layer))) for f in SEED_EXIT_FRACTIONS})
    return tuple(layers)


def default_exit_weights(n_exits: int) -> tuple[float, ...]:
    """Loss weights for ``n_exits`` exits: the seed's 0.05/0.15/0.8 for three.

    The final exit always gets 0.8 (1.0 when it is alone); the intermediate
    exits share 0.2 in proportion 1:3:5:..., which gives exactly the seed's
    0.05/0.15 for two intermediate exits.
    """
    if n_exits == 1:
        return (1.0,)
    odd = [2 * i + 1 for i in range(n_exits - 1)]
    total = sum(odd)
    return tuple(0.2 * o / total for o in odd) + (0.8,)


@dataclass
class GPTConfig:
    vocab_size: int = PADDED_VOCAB
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # 1-based indices of the blocks whose output gets an exit head; the last
    # one must be n_layer (the model's real output). None: the seed's 8/10/12
    # of 12, scaled to n_layer.
    exit_layers: tuple[int, ...] | None = None
    # One weight per exit, summing to 1. None: default_exit_weights().
    exit_loss_weights: tuple[float, ...] | None = None
    # DenseFormer depth-weighted averaging (Pagliardini et al., 2024).
    dwa: bool = False
    dwa_dilation: int = 1  # k: average only over every k-th earlier block
    dwa_period: int = 1  # p: a DWA module only after every p-th block
    # Skip connections that carry information past blocks, for a narrower
    # residual stream (a smaller n_embd) that must lose less on the way up.
    # Both start at zero weight, so a new model is exactly the plain one.
    # embed_skip: block i's input is a_i x + b_i x0, x0 the embedding output,
    #   (a_i, b_i) learned from (1, 0) (the modded-nanoGPT speedrun's x0 mix).
    embed_skip: bool = False
    # unet_skip: block i's output is added, times a learned scalar, to the
    #   input of block n_layer + 1 - i, as in a U-Net (Ronneberger et al.,
    #   2015; the modded-nanoGPT speedrun's encoder/decoder skips).
    unet_skip: bool = False
    tie_embeddings: bool = True
    # The MLP's nonlinearity: "gelu" is the exact erf GELU (nanoGPT's),
    # "gelu_tanh" the tanh approximation GPT-2 was trained with (Hugging
    # Face's "gelu_new"); an imported model must compute what it computed.
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.exit_layers is None:
            self.exit_layers = seed_exit_layers(self.n_layer)
        self.exit_layers = tuple(int(x) for x in self.exit_layers)
        if self.exit_loss_weights is None:
            self.exit_loss_weights = default_exit_weights(len(self.exit_layers))
        self.exit_loss_weights = tuple(float(w) for w in self.exit_loss_weights)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid GPTConfig: {msg}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.vocab_size >= GPT2_VOCAB,
             f"vocab_size={self.vocab_size} is smaller than the GPT-2 BPE's {GPT2_VOCAB} tokens")
        need(self.n_embd % self.n_head == 0,
             f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        ex = self.exit_layers
        need(len(ex) >= 1, "exit_layers is empty; it needs at least the final block")
        need(list(ex) == sorted(set(ex)), f"exit_layers must be strictly increasing, got {list(ex)}")
        need(all(1 <= e <= self.n_layer for e in ex),
             f"exit_layers {list(ex)} out of range: each must be in 1..n_layer={self.n_layer}")
        need(ex[-1] == self.n_layer,
             f"the last exit layer must be n_layer={self.n_layer} (the model's output), got {ex[-1]}")
        w = self.exit_loss_weights
        need(len(w) == len(ex),
             f"exit_loss_weights has {len(w)} entries but exit_layers has {len(ex)}")
        need(all(x >= 0 for x in w), f"exit_loss_weights must be non-negative, got {list(w)}")
        need(math.isclose(sum(w), 1.0, abs_tol=1e-6),
             f"exit_loss_weights must sum to 1, got {list(w)} (sum {sum(w):.6g})")
        need(self.dwa_dilation >= 1, f"dwa_dilation must be >= 1, got {self.dwa_dilation}")
        need(self.dwa_period >= 1, f"dwa_period must be >= 1, got {self.dwa_period}")
        need(self.activation in ACTIVATIONS,
             f"activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        need(isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1,
             f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    # --- JSON round trip -------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # Options that are off are left out, so code that predates them still
        # loads every bundle that does not use them; one that does is refused
        # there with "unknown field(s)" instead of being run without them.
        for name in OMITTED_WHEN_OFF:
            if not d[name]:
                del d[name]
        d["exit_layers"] = list(self.exit_layers)
        d["exit_loss_weights"] = list(self.exit_loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"invalid GPTConfig: unknown field(s) {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "GPTConfig":
        return cls.from_dict(json.loads(s))


OMITTED_WHEN_OFF = ("embed_skip", "unet_skip")


def unet_pairs(n_layer: int) -> list[tuple[int, int]]:
    """(source block, destination block), 1-based: block i's output joins
    block n_layer + 1 - i's input, for the first half of the blocks. A pair
    whose destination is the very next block is left out: its output is that
    block's input already."""
    return [(i, n_layer + 1 - i) for i in range(1, n_layer // 2 + 1) if n_layer + 1 - i > i + 1]


# Named sizes. "cpu-default" is the shipped model's shape: small enough to
# train from scratch on a 2-core CPU in a night (TRAIN_PRESETS in
# training/config.py). Its 256-wide stream (not nanoGPT's 384) is the
# compressed width that the ablation in docs/training.md, section 4, measured
# as lower loss at the same tokens and a faster one-token forward.
# "gpt2-small" is the seed design itself, for a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-default": dict(n_layer=6, n_head=4, n_embd=256, block_size=512, dropout=0.0, bias=False),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, bias=True,
                       exit_layers=(8, 10, 12), exit_loss_weights=SEED_EXIT_WEIGHTS),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


__all__ = ["GPTConfig", "ConfigError", "unet_pairs", "ACTIVATIONS", "PRESETS", "preset", "seed_exit_layers",
           "default_exit_weights", "SEED_EXIT_WEIGHTS"]
