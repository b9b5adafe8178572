"""The treespec network: a nanoGPT-style GPT with several exit heads.

Read top to bottom:

* ``CausalSelfAttention``, ``MLP``, ``Block``: GPT-2's pre-LayerNorm block.
  Attention either runs causally over the whole input (training) or writes its
  keys/values into a ``KVCache`` by position and attends over the cache
  (inference; see ``GPT.forward_step``).
* Exits: the output of every block listed in ``config.exit_layers`` gets its
  own LayerNorm and vocabulary head (tied to the token embedding by default).
  The last exit is the model's real output. Intermediate exits are trained with
  small loss weights (the seed design's 0.05/0.15/0.8): they act as deep
  supervision, and at inference their agreement with the final exit is a cheap
  confidence signal for the drafter.
* DenseFormer depth-weighted averaging (DWA; Pagliardini et al., 2024,
  arXiv 2402.02622): with ``config.dwa`` the input to block i+1 is a learned
  weighted average of the embedding output and the outputs of blocks 1..i,
  instead of block i's output alone. Initialised to the identity, so a DWA
  model starts out as exactly the plain model.
* Skip connections (``config.embed_skip``, ``config.unet_skip``), for a
  narrower residual stream: the embedding mixed back into every block's
  input, and U-Net-style skips from block i's output to block L+1-i's input.
  Their learned weights start at zero, so such a model also starts out as
  the plain one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ACTIVATIONS, GPTConfig, unet_pairs
from .kv_cache import KVCache


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs an inference
    kernel when one is installed (``model.kernels.plan``: chosen per machine,
    for the few rows of a decode step) and nothing needs gradients."""

    kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and not torch.is_grad_enabled():
            return self.kernel(x)
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass
class _Segment:
    """One sequence's share of a cached forward: its cache, and where its new tokens go."""

    cache: KVCache
    pos: torch.Tensor  # (T,) positions of the new tokens
    end: int  # attend over cache positions 0..end-1
    rows: slice  # its new tokens among the forward's input rows

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """(T, end) bool, None when T == 1: for torch's attention only (the C trunk
        reads the positions), so built when first asked."""
        if self.pos.numel() == 1:
            return None
        return torch.arange(self.end, device=self.pos.device)[None, :] <= self.pos[:, None]


@dataclass
class _CacheStep:
    """What attention needs to run against KV caches for one forward: one
    segment per sequence (several in a batched forward, ``GPT.forward_batch``)."""

    segments: list[_Segment]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, layer: int, step: _CacheStep | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if step is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            # Each sequence attends over its own cache. One new token may see
            # every cached position; several new tokens (a prompt chunk, or
            # [last token] + drafts) see the cache plus the new tokens up to
            # and including themselves.
            ys = []
            for seg in step.segments:
                qs, ks, vs = (t[:, :, seg.rows] for t in (q, k, v))
                seg.cache.write(layer, seg.pos, ks, vs)
                K, V = (t.to(qs.dtype) for t in seg.cache.view(layer, seg.end))  # a bf16 cache
                ys.append(F.scaled_dot_product_attention(qs, K, V, attn_mask=seg.mask))
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.mlp = MLP(config)

    fused = None  # a kernels.FusedBlock, installed by GPT.set_kernels

    def forward(self, x: torch.Tensor, layer: int, step: _CacheStep | None = None) -> torch.Tensor:
        if (step is not None and self.fused is not None and not torch.is_grad_enabled()
                and self.fused.handles(x.shape[1], step.segments)):
            return self.fused(x, layer, step.segments)
        x = x + self.attn(self.ln_1(x), layer, step)
        return x + self.mlp(self.ln_2(x))


def dwa_sources(block: int, dilation: int) -> list[int]:
    """Indices of the representations DWA averages after ``block`` (1-based).

    Index 0 is the embedding output, index j >= 1 the output of block j. With
    dilation k only every k-th one counting back from ``block`` takes part
    (DenseFormer's "kxp" variants), which cuts the cost of the averages.
    """
    return list(range(block % dilation, block + 1, dilation))


# Rows of logits alive at once in LinearCrossEntropy (200 MB at a 50k vocabulary). Chunks of
# 256-4096 rows timed alike (docs/training.md, bench/results/train_loss_*.json).
LOSS_CHUNK_ROWS = 1024


class LinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(F.linear(z, w), targets, ignore_index=-1)`` (the mean
    over non-ignored rows), run ``chunk`` rows at a time.

    The whole (rows x vocab) logits never exist: with a 50k vocabulary they
    are hundreds of MB per micro-batch, and their log_softmax, its backward
    and the zero-filled gradient buffers were about a quarter of a CPU
    training step. The gradient is taken in the forward, chunk by chunk,
    while each chunk's probabilities are at hand (as Liger-Kernel's fused
    linear cross-entropy does); backward only scales it.
    """

    @staticmethod
    def forward(ctx, z, w, targets, chunk, grad_enabled):
        dev = z.device.type
        # Under autocast the products run in its dtype, as F.linear's would.
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else z.dtype
        # (grad mode is always off in here, so the caller says whether it was on)
        need_grad = grad_enabled and any(ctx.needs_input_grad[:2])
        with torch.autocast(dev, enabled=False):
            wc = w.to(cd)
            keep = targets != -1
            count = keep.sum()
            total = torch.zeros((), dtype=torch.float32, device=z.device)
            gz = torch.empty_like(z) if need_grad else None
            gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
            for s in range(0, z.shape[0], chunk):
                zc, tc, kc = z[s:s + chunk].to(cd), targets[s:s + chunk].clamp(min=0), keep[s:s + chunk]
                logits = (zc @ wc.T).float()
                picked = logits.gather(1, tc[:, None]).squeeze(1)
                peak = logits.amax(dim=-1, keepdim=True)
                e = logits.sub_(peak).exp_()  # in place: one pass of exp over the chunk
                norm = e.sum(dim=-1, keepdim=True)
                total += ((peak + norm.log()).squeeze(1) - picked).mul(kc).sum()
                if need_grad:
                    # d(mean loss)/d(logits) = (softmax - onehot(target)) / count on kept rows
                    scale = kc[:, None] / count
                    p = e.mul_(scale / norm)
                    p[torch.arange(len(tc), device=z.device), tc] -= scale.squeeze(1)
                    pc = p.to(cd)
                    gz[s:s + chunk] = pc @ wc
                    if cd == torch.float32:
                        gw.addmm_(pc.T, zc)
                    else:
                        gw.add_(pc.T @ zc)
        ctx.save_for_backward(gz, gw.to(w.dtype) if need_grad else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        gz, gw = ctx.saved_tensors
        return (gz * grad_loss if gz is not None else None,
                gw * grad_loss if gw is not None else None, None, None, None)


@dataclass
class GPTOutput:
    """What the training forward returns.

    ``logits[i]`` belongs to exit ``config.exit_layers[i]``. Intermediate
    exits whose loss was computed on a sample of positions have ``None``
    logits (only the sampled rows were ever materialised).
    """

    logits: list[torch.Tensor | None]
    loss: torch.Tensor | None = None
    exit_losses: list[torch.Tensor] | None = None


@dataclass
class StepOutput:
    """What the inference forward returns for the new positions.

    logits:      (B, T, vocab) final-exit logits. With ``last_only`` all
                 three fields hold the last new position only (T=1).
    hidden:      (B, T, C) final hidden state, after the final LayerNorm: the
                 vector the output head reads, and the drafter's main feature.
    exit_hidden: one (B, T, C) residual stream per intermediate exit, before
                 that exit's LayerNorm. ``GPT.exit_logits`` turns a row of it
                 into that exit's prediction, so the drafter pays for a head
                 only on the rows (and tokens) it needs.
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    exit_hidden: list[torch.Tensor]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.exit_ln = nn.ModuleList([LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
                                     for _ in config.exit_layers])
        self.exit_heads = nn.ModuleList(
            [nn.Linear(config.n_embd, config.vocab_size, bias=False) for _ in config.exit_layers])
        # Map block index (1-based) -> exit index, for the forward loops.
        self._exit_at = {layer: i for i, layer in enumerate(config.exit_layers)}

        # DWA weights: one vector per DWA module, over dwa_sources(block).
        self.dwa_blocks: list[int] = []
        self.dwa_weights = nn.ParameterList()
        if config.dwa:
            for block in range(1, config.n_layer + 1):
                if block % config.dwa_period == 0:
                    self.dwa_blocks.append(block)
                    self.dwa_weights.append(nn.Parameter(torch.zeros(len(dwa_sources(block, config.dwa_dilation)))))
        self._dwa_index = {b: i for i, b in enumerate(self.dwa_blocks)}

        # Skips: (a, b) per block from block 2 on (block 1's input is x0
        # already), and one scalar per U-Net pair.
        self.embed_skip_weights = nn.ParameterList(
            [nn.Parameter(torch.tensor([1.0, 0.0])) for _ in range(config.n_layer - 1)] if config.embed_skip else [])
        pairs = unet_pairs(config.n_layer) if config.unet_skip else []
        self.unet_weights = nn.Parameter(torch.zeros(len(pairs))) if pairs else None
        self._unet_into = {dst: (j, src) for j, (src, dst) in enumerate(pairs)}  # destination -> (weight, source)
        self._unet_from = {src for src, _ in pairs}
        self.head_kernel = None  # set by set_kernels
        self.fused_trunk = None  # a kernels.FusedTrunk, set by set_kernels
        self.kv_dtype: torch.dtype | None = None  # the KV cache's, when the plan sets one (else the weights')

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        with torch.no_grad():
            for w in self.dwa_weights:  # identity: all weight on the current block
                w.zero_()
                w[-1] = 1.0
        if config.tie_embeddings:
            # Every exit reads the vocabulary through the token embedding
            # (Press & Wolf, 2017): one matrix, shared storage.
            for head in self.exit_heads:
                head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                n += p.numel()
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    # --- the shared trunk ------------------------------------------------

    def _trunk(self, idx: torch.Tensor, pos: torch.Tensor, step: _CacheStep | None):
        """Run the blocks; yield (exit index, residual stream) at each exit."""
        x0 = x = self.drop(self.wte(idx) + self.wpe(pos))
        history = [x] if self.dwa_blocks else None  # DWA's X_0, X_1, ...
        outputs = {}  # block -> its output, for the U-Net skips that start there
        for i, block in enumerate(self.blocks, start=1):
            if self.embed_skip_weights and i > 1:
                a, b = self.embed_skip_weights[i - 2]
                x = a * x + b * x0
            if i in self._unet_into:
                j, src = self._unet_into[i]
                x = x + self.unet_weights[j] * outputs.pop(src)
            x = block(x, i - 1, step)
            if i in self._unet_from:
                outputs[i] = x
            if history is not None:
                history.append(x)
                if i in self._dwa_index:
                    w = self.dwa_weights[self._dwa_index[i]]
                    srcs = dwa_sources(i, self.config.dwa_dilation)
                    x = sum(w[j] * history[s] for j, s in enumerate(srcs))
            if i in self._exit_at:
                yield self._exit_at[i], x

    def exit_logits(self, exit_index: int, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Exit ``exit_index``'s logits for residual stream ``h`` (..., C).

        With ``tokens`` (a 1-D index tensor) only those vocabulary rows are
        computed: a few hundred dot products instead of 50k.
        """
        z = self.exit_ln[exit_index](h)
        w = self.exit_heads[exit_index].weight
        return F.linear(z, w if tokens is None else w[tokens])

    # --- training forward ------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                exit_sample_frac: float = 1.0, generator: torch.Generator | None = None,
                return_logits: bool = True) -> GPTOutput:
        """Training/evaluation forward over whole sequences.

        ``exit_sample_frac`` < 1 computes each intermediate exit's loss on
        that random fraction of positions only: the full-vocabulary head is
        the most expensive layer of a small model, and the intermediate exits
        carry small weights, so a sampled (unbiased but noisier) estimate of
        their loss costs little quality for a large saving.

        ``return_logits=False`` (with targets; what the trainer uses) computes
        the losses with ``LinearCrossEntropy`` and returns no logits.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        n_exits = len(self.config.exit_layers)
        logits: list[torch.Tensor | None] = [None] * n_exits
        losses: list[torch.Tensor] = []
        fused = targets is not None and not return_logits
        for e, h in self._trunk(idx, pos, None):
            final = e == n_exits - 1
            h, tgt = h.reshape(B * T, -1), None if targets is None else targets.reshape(-1)
            sampled = not (targets is None or final or exit_sample_frac >= 1.0)
            if sampled:
                k = max(1, int(round(exit_sample_frac * B * T)))
                rows = torch.randperm(B * T, device=idx.device, generator=generator)[:k]
                h, tgt = h[rows], tgt[rows]
            if fused:
                losses.append(LinearCrossEntropy.apply(self.exit_ln[e](h), self.exit_heads[e].weight,
                                                       tgt, LOSS_CHUNK_ROWS, torch.is_grad_enabled()))
                continue
            z = self.exit_logits(e, h)
            if not sampled:  # every position: keep the logits
                logits[e] = z.view(B, T, -1)
            if targets is not None:
                losses.append(F.cross_entropy(z, tgt, ignore_index=-1))
        if targets is None:
            return GPTOutput(logits=logits)
        weights = self.config.exit_loss_weights
        loss = sum(w * l for w, l in zip(weights, losses))
        return GPTOutput(logits=logits, loss=loss, exit_losses=losses)

    # --- inference forward -----------------------------------------------

    @torch.no_grad()
    def forward_step(self, idx: torch.Tensor, input_pos: torch.Tensor | int, cache: KVCache,
                     last_only: bool = False) -> StepOutput:
        """Run new tokens ``idx`` (B, T) at positions ``input_pos`` over ``cache``.

        ``input_pos`` is the position of the first new token (an int) or the
        tensor of all T positions, which must be consecutive. The first
        position may be anywhere up to ``cache.length``: writing below the
        current length overwrites (that is how rejected drafts are discarded).
        Afterwards ``cache.length`` is the last new position + 1.

        ``last_only`` computes logits for the last new position only, which
        is all a prompt prefill needs.
        """
        start = int(input_pos) if isinstance(input_pos, int) else int(input_pos[0])
        seg = self._segment(cache, start, idx.shape[1], 0, idx.device)
        T = idx.shape[1]
        hidden, exit_hidden, logits = self._cached_trunk(idx, [seg], head_from=T - 1 if last_only else 0)
        if last_only:  # every field then describes the same (last) row
            hidden, exit_hidden = hidden[:, -1:], [h[:, -1:] for h in exit_hidden]
        if logits is None:
            logits = self._head(hidden)
        return StepOutput(logits=logits, hidden=hidden, exit_hidden=exit_hidden)

    @torch.no_grad()
    def forward_batch(self, items: list[tuple[torch.Tensor, int, KVCache, bool]]) -> list[StepOutput]:
        """Several sequences in one forward (continuous batching): item i is
        ``(idx (1, T_i), start_i, cache_i, last_only_i)``, as ``forward_step``
        takes them, and comes back as its ``StepOutput``.

        The sequences' new tokens go through the dense layers (QKV, MLP, the
        head) as one matrix of sum(T_i) rows, which on a memory-bound CPU
        costs little more than one sequence's; attention runs per sequence
        over its own cache. A row's result can differ from ``forward_step``'s
        in the last bits (the matrix has more rows), as in any batched server.
        """
        device = self.wte.weight.device
        segments, off = [], 0
        for idx, start, cache, _ in items:
            segments.append(self._segment(cache, int(start), idx.shape[-1], off, device))
            off += idx.shape[-1]
        flat = torch.cat([idx.reshape(-1) for idx, *_ in items])[None]
        hidden, exit_hidden, _ = self._cached_trunk(flat, segments)
        # The head only for the rows that need it: every row, or the last one.
        keep = [torch.arange(s.rows.stop - 1 if last else s.rows.start, s.rows.stop, device=device)
                for s, (*_, last) in zip(segments, items)]
        rows = torch.cat(keep)
        logits = self._head(hidden[:, rows])
        outs, at = [], 0
        for r in keep:
            n = r.numel()
            outs.append(StepOutput(logits=logits[:, at:at + n], hidden=hidden[:, r],
                                   exit_hidden=[h[:, r] for h in exit_hidden]))
            at += n
        return outs

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final exit's logits: the installed kernel, or F.linear."""
        if self.head_kernel is not None:
            return self.head_kernel(hidden)
        return F.linear(hidden, self.exit_heads[-1].weight)

    def set_kernels(self, kernels: dict | None, fused: dict | None = None, trunk=None) -> None:
        """Install inference kernels (``model.kernels.plan`` builds them): a
        ``LinearKernel`` per trunk ``Linear`` module, one for "head", and
        optionally a ``FusedBlock`` per block and a ``FusedTrunk`` for the
        whole trunk. ``None`` removes them. They hold their own (possibly
        rounded) copies of the weights: plan again after changing the weights."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.kernel = None
        for b in self.blocks:
            b.fused = (fused or {}).get(b)
        self.fused_trunk = trunk
        self.kv_dtype = None
        self.head_kernel = None
        for key, k in (kernels or {}).items():
            if key == "head":
                self.head_kernel = k
            else:
                key.kernel = k

    def _segment(self, cache: KVCache, start: int, T: int, offset: int, device) -> _Segment:
        if start > cache.length:
            raise ValueError(f"input starts at position {start} but the cache holds only {cache.length}")
        end = start + T
        if end > cache.max_len:
            raise ValueError(f"{end} tokens exceed the KV cache's {cache.max_len} positions "
                             f"(block_size {self.config.block_size})")
        pos = torch.arange(start, end, device=device)
        return _Segment(cache, pos, end, slice(offset, offset + T))

    def _cached_trunk(self, idx: torch.Tensor, segments: list[_Segment], head_from: int | None = None):
        """The trunk over KV caches: the final exit's normalised hidden state
        and the intermediate exits' residual streams, for every input row, and
        the final exit's logits for rows ``head_from``.. where the fused trunk
        computes them in the same call (else None: the caller runs the head)."""
        logits = None
        if (self.fused_trunk is not None and not torch.is_grad_enabled()
                and self.fused_trunk.handles(idx.shape[1], segments)):
            hidden, exit_hidden, logits = self.fused_trunk(idx, segments, head_from)
        else:
            pos = segments[0].pos if len(segments) == 1 else torch.cat([s.pos for s in segments])
            exit_hidden, n_exits = [], len(self.config.exit_layers)
            for e, h in self._trunk(idx, pos, _CacheStep(segments)):
                if e < n_exits - 1:
                    exit_hidden.append(h)
                else:
                    hidden = self.exit_ln[e](h)
        for s in segments:
            s.cache.length = s.end
        return hidden, exit_hidden, logits

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        p = self.wte.weight
        return KVCache.for_model(self.config, batch_size, max_len, dtype=self.kv_dtype or p.dtype, device=p.device)
