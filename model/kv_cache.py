"""A KV cache written by position, in the style of gpt-fast.

Every layer owns preallocated K and V buffers of shape
``(batch, n_head, max_len, head_dim)``. A forward writes the new keys and
values at the positions it is given, so nothing is ever appended or copied.
Rolling back after rejected draft tokens only moves ``length``: the stale
entries beyond it are never read (attention is limited to ``length``) and the
next forward at those positions overwrites them. Rollback is therefore O(1).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.dtype = dtype
        # Number of valid positions: 0..length-1 hold keys/values that belong
        # to the current sequence.
        self.length = 0

    @classmethod
    def for_model(cls, config, batch_size: int = 1, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        max_len = config.block_size if max_len is None else max_len
        if max_len > config.block_size:
            raise ValueError(f"KV cache max_len={max_len} exceeds the model's block_size={config.block_size}")
        return cls(config.n_layer, batch_size, config.n_head, max_len, config.head_dim, dtype, device)

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` of shape (B, H, T, D) at sequence positions ``pos`` (T,)."""
        self.k[layer].index_copy_(2, pos, k.to(self.dtype))
        self.v[layer].index_copy_(2, pos, v.to(self.dtype))

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for positions ``0..end-1``."""
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def rollback(self, length: int) -> None:
        """Forget every position from ``length`` on, in O(1)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} positions")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
