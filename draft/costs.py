"""What a verify forward costs on the machine at hand.

A drafter trades longer verify forwards against accepted tokens, so its
stopping rule and its DraftGate (draft/gate.py) need the model's verify cost for
T = 1, 2, ... new positions. That curve belongs to a machine, not to a
model: the same bundle verified one position in 3.9 ms on the 2-core CPU
it was fitted on and in 13.6 ms on another 2-core CPU, where nine positions
cost 1.75x one position instead of 2.3x (docs/speculative.md). ``draft-fit``
times it when fitting, and ``TreeDrafter.calibrate`` times it again where
the drafter serves.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import torch

from ..model.kernels import BUSY_SHARE, CpuShare


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None or 0: unchanged) for the block."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class NoisyTimingWarning(UserWarning):
    """The machine was not quiet while the verify forward was timed."""


def measure_verify_ms(model, k_max: int, ctx_len: int, reps: int = 30, threads: int | None = None,
                      advice: str = "refit on a quiet machine or pass --verify-ms") -> list[float]:
    """Wall time (median ms) of a forward over T = 1..k_max+1 new positions
    after ``ctx_len`` cached ones, on ``threads`` torch threads (None: the
    current number).

    Wall time at the serving thread count, because the drafter trades
    verify latency against accepted tokens: process CPU time on the fit's
    own thread count rises far more steeply with T than the serving
    forward does, and a drafter priced on it stops drafting too soon.
    Run it on a quiet machine: ``advice`` ends the warning given when the
    machine was busy."""
    ctx_len = max(1, min(ctx_len, model.config.block_size - k_max - 1))
    with torch_threads(threads):
        return _verify_ms(model, k_max, ctx_len, reps, advice)


def _verify_ms(model, k_max: int, ctx_len: int, reps: int, advice: str) -> list[float]:
    share = CpuShare()
    cache = model.new_cache(batch_size=1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(model.config.vocab_size, 50257), (1, ctx_len), generator=g)
    model.forward_step(prompt, 0, cache, last_only=True)

    def forward_s(T: int) -> float:
        cache.rollback(ctx_len)
        t0 = time.perf_counter()
        model.forward_step(prompt[:, :T], ctx_len, cache)
        return time.perf_counter() - t0

    # Round-robin over the lengths, not one length after another: a slow
    # spell of the machine then costs every length one sample, which the
    # medians ignore, instead of shifting one length's median (timed one
    # after another, a spell during T = 3 once made 3, 4 and 5 positions
    # cost 20.4 ms against 14.9 for two, and the drafter's lengths moved).
    lengths = range(1, k_max + 2)
    times: dict[int, list[float]] = {T: [] for T in lengths}
    for r in range(reps + 3):  # 3 warm-up rounds
        for T in lengths:
            dt = forward_s(T)
            if r >= 3:
                times[T].append(dt)
    out = [round(float(np.median(times[T])) * 1e3, 4) for T in lengths]
    # The one-position forward again: a spell of other work during the timing
    # makes the two disagree. Where /proc/stat says how busy the machine was
    # (CpuShare), that decides; the two medians then only catch what it
    # cannot see (a VM's host taking the cores), at 2x. Alone they are a poor
    # judge of small gaps: on a quiet machine two medians of ten 1.7 ms
    # forwards differed by over 25% in 6 timings of 40, and a server whose two
    # timings both did kept draft-fit's costs, float32's at 8x its int8
    # forward (bench/verify_timing_noise.py; bench/results/verify-noise-*.json).
    again = round(float(np.median([forward_s(1) for _ in range(reps)])) * 1e3, 4)
    busy = share.others()
    apart = max(again, out[0]) / max(1e-9, min(again, out[0]))
    if busy is not None and busy > BUSY_SHARE:
        # A machine busy all along times every length slowly and alike (beside a
        # training run: 248 ms for one position), which the medians cannot see.
        warnings.warn(NoisyTimingWarning(
            f"other processes kept {busy:.0%} of the CPUs busy while the verify forward was timed "
            f"({out[0]:.2f} ms for one position), so the drafter's costs are unreliable; {advice}"), stacklevel=3)
    elif apart > (1.25 if busy is None else 2.0):
        warnings.warn(NoisyTimingWarning(
            f"the one-position verify forward took {out[0]:.2f} ms and then {again:.2f} ms: the machine is "
            f"busy, so the drafter's costs are unreliable; {advice}"), stacklevel=3)
    # A longer verify never costs less: the closest monotone curve (pooling
    # adjacent violators), so that one noisy length is averaged with its
    # neighbours rather than lifting every length after it.
    return [round(v, 4) for v in monotone(out)]


def monotone(values) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares
    (isotonic regression by pooling adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]
