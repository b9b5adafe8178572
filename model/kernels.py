"""Hardware-dependent choices for inference, in one place: in which precision
a decode step's matrix products run, with which kernel, on how many threads.

Nothing here is a constant tuned on one machine. A threshold that was right on
an AMD EPYC (run up to 128 rows as ``W @ h^T``) made an Intel Xeon's forward
1.85x slower. So ``plan()`` times the candidates on the machine that serves,
at load, for the row counts a decode step has (1 for vanilla decoding, a few
for a verify step or a batch), and installs the fastest for each; ``/info``,
the startup log and ``treespec bench`` say what it chose and why
(bench/results/kernels-*.json hold the timings of the CPUs we measured).

Candidates, each y = x W^T (+ b) for x of R rows:

* ``torch``: ``F.linear`` (MKL/oneDNN); in bfloat16 oneDNN's bf16 GEMM, which
  uses AVX-512 BF16/AMX where the CPU has them; in int8 PyTorch's
  ``_weight_int8pack_mm``.
* ``torch_wt``: ``W @ h^T``, one row doubled: on some CPUs MKL's GEMM on 2
  rows reads a large W much faster than its matrix-vector path on 1.
* ``skinny``: csrc/skinny.c, built here with ``-O3 -march=native``: each
  weight row read once and dotted with all R rows, in register tiles with
  AVX-512 or AVX2 (a portable loop elsewhere). fp32, bf16 or int8 weights
  (one scale per output row), fp32 activations and sums, so a bf16 or int8
  model loses only its weights' rounding.

Precisions: ``float32``; ``bfloat16`` (weights rounded to bf16); ``int8``
(weight-only, symmetric, one scale per output channel); ``w8a8`` (those int8
weights times activations rounded to int8 per row, multiplied on bytes by
the C kernel where the CPU has AVX2; prefills keep fp32 activations). ``auto`` takes the
fastest measured precision whose quality cost stays within QUALITY_BOUNDS,
checked at load on this model: the KL divergence of its next-token
distributions from float32's on two short texts, code and prose
(``quality_cost``). bench/precision_quality.py measures it and the loss on
held-out data.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

PRECISIONS = ("float32", "bfloat16", "int8", "w8a8")
# Row counts a decode step has: vanilla (1), verify steps (2-10), a batch of
# several requests' verify steps (up to tens); the last bucket stands for every
# product of more rows than the one before it (a prompt, a large batch) and is
# timed at its own size. Its choice is not torch's GEMM by default: with int8
# weights BLAS multiplies an fp32 copy, slower than the C kernel on bytes
# (bench/results/prefill-*.json).
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SKINNY_SOURCE = Path(__file__).with_name("csrc") / "skinny.c"
# The most rows one sequence's decode step has: [last token] + up to 15 drafts.
DECODE_ROWS = 16
# The most a precision may cost against float32 (nats/token, on every domain)
# for ``auto`` to take it: at load as KL from float32's predictions
# (``quality_cost``), in bench/precision_quality.py also as held-out loss.
QUALITY_BOUNDS = {"bfloat16": 0.005, "int8": 0.02, "w8a8": 0.02}


# --- what the CPU has -------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuShare:
    """How much of this process's cores other processes kept busy over a span
    (0: none, 1: every core, all the time), from /proc/stat's busy time less
    this process's own. Timings taken while another job runs say little about
    an idle machine: libgomp's threads spin between parallel regions, so beside
    a training run on the same cores ``treespec serve`` timed every precision's
    one-row pass at ~200 ms, where the idle forward takes 1-5 ms, and ``auto``
    once picked float32 that way (docs/performance.md, "Sharing the CPU";
    bench/results/contention-*.json). None where /proc/stat is missing."""

    def __init__(self):
        # Only the cores this process may run on: a container pinned to 2 of
        # a host's 64 does not care how busy the other 62 are.
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            return None
        names = {f"cpu{c}" for c in self.cpus}
        busy = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in names:
                # user, nice, system, irq, softirq: not idle, iowait, nor a VM's steal
                # (time its host gave to other machines, which no process here took)
                user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
                busy += user + nice + system + irq + softirq
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()

    def others(self) -> float | None:
        end = self._sample()
        if not self.cpus or self.start is None or end is None or end[2] - self.start[2] < 0.05:
            return None
        return other_share(self.start, end, len(self.cpus))


def other_share(start: tuple[float, float, float], end: tuple[float, float, float], cpus: int) -> float:
    """The share of ``cpus`` that processes other than this one kept busy
    between two (busy seconds of the machine, of this process, wall time)."""
    machine, own, wall = (e - s for e, s in zip(end, start))
    return min(1.0, max(0.0, (machine - own) / (wall * cpus)))


# Above this share of the CPUs busy with other work, timings are not the
# machine's and decoding slows down: the plan, the verify-cost timer, the
# benchmark and the server say so (one busy core of two is 0.5; an idle
# machine's background is a few hundredths).
BUSY_SHARE = 0.25


def cpu_slug() -> str:
    """The suffix of a benchmark's result files, one per CPU kind: the vendor
    and the widest vector ISA, e.g. "amd-avx2", "amd-avx512", "intel-avx512"
    (two AMD EPYCs we ran on differ in exactly that, and it decides the kernels)."""
    m, flags = cpu_model(), cpu_flags()
    vendor = "intel" if "Intel" in m else "amd" if "AMD" in m else "cpu"
    return f"{vendor}-" + ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "base")


def cpu_summary() -> dict:
    flags = cpu_flags()
    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    return {"model": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in keep if f in flags]}


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether this device multiplies bf16 natively (AVX-512 BF16 or AMX on a CPU).
    Without it, torch's bf16 GEMM falls back to a reference kernel that ran
    0.03x fp32 on an AVX2-only EPYC (the trainer's autocast test)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        flags = cpu_flags()
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return False


# --- the compiled kernel ----------------------------------------------------------

class _Weight(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Mixing(ctypes.Structure):
    """csrc/skinny.c's Mixing: what a model has between its blocks (skips, DWA)."""
    _fields_ = [("embed", ctypes.c_void_p), ("a", ctypes.c_void_p), ("b", ctypes.c_void_p),
                ("unet_src", ctypes.c_void_p), ("unet_w", ctypes.c_void_p), ("dwa_n", ctypes.c_void_p),
                ("dwa_off", ctypes.c_void_p), ("dwa_idx", ctypes.c_void_p), ("dwa_w", ctypes.c_void_p),
                ("hist", ctypes.c_void_p)]


class _Skinny:
    """csrc/skinny.c, compiled once per source and CPU into a cache directory."""

    def __init__(self, march: str | None = None, source: Path | None = None, defines: tuple[str, ...] = ()):
        # -march: the serving CPU's own by default; TREESPEC_KERNEL_MARCH (e.g.
        # x86-64-v3 for AVX2 only) builds for an older one. ``source`` and
        # ``defines`` are for the benchmarks (another revision; the profile build).
        self.march = march or os.environ.get("TREESPEC_KERNEL_MARCH", "native")
        self.source = Path(source) if source is not None else SKINNY_SOURCE
        self.defines = tuple(defines)
        self.lib = None
        self.error: str | None = None

    def load(self) -> bool:
        if self.lib is not None or self.error is not None:
            return self.lib is not None
        try:
            self.lib = self._build()
        except (OSError, subprocess.SubprocessError) as e:
            self.error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            warnings.warn(f"treespec: the skinny matmul kernel could not be built ({self.error}); "
                          "decoding uses torch's kernels only", RuntimeWarning, stacklevel=3)
            return False
        P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        F_, D_, Wp = ctypes.c_float, ctypes.c_double, ctypes.POINTER(_Weight)
        signatures = {  # name: (argument types, result type)
            "skinny_f32": ([P, P, P, P, L, L, L, I], None),
            "skinny_bf16": ([P, P, P, P, L, L, L, I], None),
            "skinny_int8": ([P, P, P, P, P, L, L, L, I], None),
            "skinny_w8a8": ([P, P, P, P, P, L, L, L, I], None),
            "skinny_has_w8a8": ([], ctypes.c_int),
            "skinny_vector_bits": ([], ctypes.c_int),
            "gpt_block": ([P, L, L, L, I, F_, I, P, P, P, P, Wp, Wp, Wp, Wp, P, P, I, P, L, P, I], None),
            "gpt_trunk": ([P, P, P, P, L, L, L, L, I, F_, I, P, Wp, P, P, I, P, L, P, P, P, P, P,
                           Wp, I, L, L, P, ctypes.POINTER(_Mixing), P, I], None),
            "rows_argmax_lse": ([P, L, L, L, P, P], None),
            "race_argmax": ([P, L, ctypes.c_uint64], ctypes.c_long),
            "gelu_erf_rows": ([P, L], None),
            "round_bf16": ([P, P, L], None),
            "logit_stats": ([P, L, L, L, L, P, P, P, P], None),
            "exit_scores": ([P, L, L, P, P, D_, P, P, L, P], None),
            "skinny_set_prefetch": ([L, L], None),
            "skinny_get_prefetch": ([L], L),
        }
        for name, (args, res) in signatures.items():
            if not hasattr(self.lib, name):
                if self.source == SKINNY_SOURCE:  # cannot happen with this file's source: say so if it does
                    self.lib, self.error = None, f"the built kernel lacks {name}"
                    warnings.warn(f"treespec: {self.error}; decoding uses torch's kernels only", RuntimeWarning,
                                  stacklevel=2)
                    return False
                continue  # another revision's source, built for a benchmark: what it has
            f = getattr(self.lib, name)
            f.argtypes, f.restype = args, res
        return True

    def path(self) -> str:
        """Which of the kernel's paths this build runs (csrc/skinny.c)."""
        bits = self.lib.skinny_vector_bits()
        path = {512: "AVX-512 tiles", 256: "AVX2 tiles"}.get(bits, "portable loop")
        return path + (", w8a8 on bytes" if self.lib.skinny_has_w8a8() else "")

    def _build(self):
        src = self.source.read_bytes()
        cc = os.environ.get("CC", "cc")
        # Not -ffast-math: results must not depend on how the compiler reorders sums. No
        # errno and no FP traps let it vectorise libm calls and branch-free selects.
        flags = ["-O3", f"-march={self.march}", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
                 "-shared", *(f"-D{d}" for d in self.defines)]
        key = hashlib.sha256(src + " ".join([cc, *flags, cpu_model(), *sorted(cpu_flags())]).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("TREESPEC_KERNEL_CACHE", Path.home() / ".cache" / "treespec" / "kernels"))
        so = cache / f"skinny-{key}.so"
        if not so.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            try:
                subprocess.run([cc, *flags, "-o", tmp, str(self.source), "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(tmp, so)
            except subprocess.CalledProcessError as e:
                raise OSError(f"{cc} failed: {e.stderr.strip()[-300:]}") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        # torch is imported, so its libgomp.so.1 is loaded: ours resolves to the
        # same runtime by soname, and both share one thread pool.
        return ctypes.CDLL(str(so))


SKINNY = _Skinny()
_NATIVE_BF16 = native_bf16()


def argmax_logsumexp(logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Each row's first argmax and its log-sum-exp, for rows (R, V) of logits: greedy's
    choice and the denominator of its log-probability. csrc/skinny.c does both in two
    passes per row (torch took 65 us for each over one 50k row); torch elsewhere."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and logits.shape[1] > 0 and SKINNY.load()):
        rows = logits.shape[0]
        idx = torch.empty(rows, dtype=torch.int64)
        lse = torch.empty(rows, dtype=torch.float32)
        SKINNY.lib.rows_argmax_lse(logits.data_ptr(), rows, logits.shape[1], logits.stride(0), idx.data_ptr(),
                                   lse.data_ptr())
        return idx.tolist(), lse
    return logits.argmax(dim=-1).tolist(), torch.logsumexp(logits.float(), dim=-1)



def logit_stats(logits: np.ndarray, a: int):
    """For rows (R, V) of float32 logits: each row's ``a`` largest columns (largest
    first, ties to the lower column) and their values, log sum exp(l - max), and the
    entropy of its softmax, as ``(top (R, a) int64, values (R, a), log_s (R,),
    entropy (R,))`` in float64; None where csrc/skinny.c is not built (the caller
    computes them in NumPy). What the tree drafter reads once a proposal."""
    if not (a <= logits.shape[1] and SKINNY.load()):
        return None
    x = np.ascontiguousarray(logits, dtype=np.float32)
    rows = x.shape[0]
    top, vals = np.empty((rows, a), dtype=np.int64), np.empty((rows, a))
    log_s, entropy = np.empty(rows), np.empty(rows)
    SKINNY.lib.logit_stats(x.ctypes.data, rows, x.shape[1], x.shape[1], a, top.ctypes.data, vals.ctypes.data,
                           log_s.ctypes.data, entropy.ctypes.data)
    return top, vals, log_s, entropy


def exit_scores(h: torch.Tensor, g: torch.Tensor, b: torch.Tensor | None, eps: float, head: torch.Tensor,
                top: np.ndarray):
    """An exit's logits for each row's own few tokens: ``LayerNorm(h[r]) . head[top[r, j]]``
    in float64, (N, a), for fp32 CPU tensors h (N, C), the LayerNorm's g and b, head (V, C)
    and int64 top (N, a); None where csrc/skinny.c is not built."""
    ts = (h, g, head) + ((b,) if b is not None else ())
    if not (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in ts)
            and SKINNY.load()):
        return None
    top = np.ascontiguousarray(top, dtype=np.int64)
    out = np.empty(top.shape)
    SKINNY.lib.exit_scores(h.data_ptr(), h.shape[0], h.shape[1], g.data_ptr(), None if b is None else b.data_ptr(),
                           float(eps), head.data_ptr(), top.ctypes.data, top.shape[1], out.ctypes.data)
    return out

# --- packed weights and the candidates ----------------------------------------------

@dataclass
class Packed:
    """One weight in the precision it is served in."""

    precision: str
    weight: torch.Tensor  # fp32 or bf16 (N, K); int8 (N, K)
    bias: torch.Tensor | None  # fp32 (N,)
    scale: torch.Tensor | None = None  # int8: fp32 (N,), weight = int8 * scale
    _full: torch.Tensor | None = None  # fp32 copy of the rounded weight, made on first need

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, precision: str) -> "Packed":
        w = weight.detach().float().contiguous()
        b = None if bias is None else bias.detach().float().contiguous()
        if precision == "float32":
            return cls(precision, w, b)
        if precision == "bfloat16":
            return cls(precision, w.to(torch.bfloat16).contiguous(), b)
        if precision in ("int8", "w8a8"):  # the same weights; w8a8 rounds the activations too
            scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            return cls(precision, q, b, scale.contiguous())
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    def dequantized(self) -> torch.Tensor:
        """The fp32 matrix this packing computes with: the weight after its rounding."""
        if self._full is None:
            self._full = (self.weight.float() * self.scale[:, None] if self.scale is not None
                          else self.weight.float()).contiguous()
        return self._full



HUGE_PAGE = 2 << 20


def _in_huge_pages(packed: dict[str, list[Packed]]) -> bool:
    """Move the packed weights into one block of memory that the kernel may back with
    2 MB pages (Linux's transparent huge pages, asked for with madvise). A decode step
    streams every weight once, and with 4 KB pages that is a TLB miss every 4 KB
    (bench/huge_pages.py; bench/results/huge-pages-*.json). False, and nothing moved,
    where the system cannot."""
    import mmap

    if not hasattr(mmap, "MADV_HUGEPAGE") or platform.system() != "Linux":
        return False
    items = [p for ps in packed.values() for p in ps]
    sizes = [p.weight.numel() * p.weight.element_size() for p in items]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // 64) * 64  # each weight on a cache line of its own
    try:
        block = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return False
    raw = torch.frombuffer(block, dtype=torch.uint8)  # keeps the mapping alive while any view is
    start = (-raw.data_ptr()) % HUGE_PAGE  # the first huge page boundary in the block
    for p, off, n in zip(items, offsets, sizes):
        home = raw[start + off:start + off + n].view(p.weight.dtype).view(p.weight.shape)
        home.copy_(p.weight)
        p.weight = home
    return True

def _add_bias(y: torch.Tensor, p: Packed) -> torch.Tensor:
    return y if p.bias is None else y + p.bias


def _torch(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """torch's GEMM. bf16 runs oneDNN's bf16 kernel only where the CPU has native
    bf16 (elsewhere it is a reference loop, 0.03x fp32); otherwise, and for int8
    (PyTorch's _weight_int8pack_mm took 11-140 ms for the head on the CPUs we
    tried), it multiplies the rounded weights in fp32: the same model, at fp32's
    speed."""
    if p.precision == "bfloat16" and _NATIVE_BF16:
        return _add_bias(F.linear(x.to(torch.bfloat16), p.weight).float(), p)
    if p.precision == "float32":
        return F.linear(x, p.weight, p.bias)
    return F.linear(x, p.dequantized(), p.bias)


def _torch_wt(x: torch.Tensor, p: Packed) -> torch.Tensor:
    rows = x.shape[0]
    w = p.weight if p.precision == "float32" or _NATIVE_BF16 else p.dequantized()
    h = x.to(w.dtype)
    if rows == 1:
        h = h.repeat(2, 1)
    return _add_bias((w @ h.T)[:, :rows].T.float().contiguous(), p)


def _skinny(x: torch.Tensor, p: Packed) -> torch.Tensor:
    x = x.contiguous()
    R, K = x.shape
    N = p.weight.shape[0]
    y = torch.empty(R, N, dtype=torch.float32)
    b = None if p.bias is None else p.bias.data_ptr()
    th = torch.get_num_threads()
    if p.precision == "float32":
        SKINNY.lib.skinny_f32(x.data_ptr(), p.weight.data_ptr(), b, y.data_ptr(), R, N, K, th)
    elif p.precision == "bfloat16":
        SKINNY.lib.skinny_bf16(x.data_ptr(), p.weight.data_ptr(), b, y.data_ptr(), R, N, K, th)
    elif p.precision == "int8":
        SKINNY.lib.skinny_int8(x.data_ptr(), p.weight.data_ptr(), p.scale.data_ptr(), b, y.data_ptr(), R, N, K, th)
    else:
        SKINNY.lib.skinny_w8a8(x.data_ptr(), p.weight.data_ptr(), p.scale.data_ptr(), b, y.data_ptr(), R, N, K, th)
    return y


CANDIDATES: dict[str, Callable[[torch.Tensor, Packed], torch.Tensor]] = {
    "torch": _torch, "torch_wt": _torch_wt, "skinny": _skinny}


def available(precision: str) -> list[str]:
    if precision == "w8a8":
        # Only the C kernel rounds activations: batched rows must round as one sequence's do.
        return ["skinny"] if SKINNY.load() else ["torch"]
    names = ["torch"]
    if precision != "int8":
        names.append("torch_wt")
    if SKINNY.load():
        names.append("skinny")
    return names


def bucket(rows: int) -> int:
    """The row bucket whose kernel runs a product of ``rows`` rows: the
    smallest that holds them, or the last for more."""
    return next((b for b in ROW_BUCKETS if b >= rows), ROW_BUCKETS[-1])


class LinearKernel:
    """One weight, packed once, with the kernel chosen for each row bucket."""

    def __init__(self, packed: Packed, table: dict[int, str]):
        self.packed = packed
        self.table = table
        self._by_rows = {b: CANDIDATES[table[b]] for b in ROW_BUCKETS}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        h = x.reshape(rows, x.shape[-1])
        if h.dtype != torch.float32:
            h = h.float()
        y = self._by_rows[bucket(rows)](h, self.packed)
        return y.reshape(*x.shape[:-1], self.packed.shape[0])


_WTYPE = {"float32": 0, "bfloat16": 1, "int8": 2, "w8a8": 3}
# KV cache element types the fused block reads -> its kv_bf16 flag.
KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# The KV cache's element type at each precision. Below fp32 it is bf16 (as
# llama.cpp keeps f16 by default): at a few hundred tokens of context a decode
# step's attention reads the cache about a fifth as many bytes as the weights
# (bench/results/kernels-*.json), and bf16 halves that. Its rounding is part
# of what each precision's quality check measures.
KV_CACHE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.bfloat16, "w8a8": torch.bfloat16}


class FusedBlock:
    """A whole transformer block of a decode step in one call (csrc/skinny.c's
    ``gpt_block``): LayerNorms, the four products with the skinny kernel,
    the cache writes, attention and GELU, without ~25 torch ops' overhead.
    Installed where the plan chose the skinny kernel for the trunk; rows
    in a bucket where it did not go through the module path instead."""

    def __init__(self, block, kernels: dict, config):
        self.C, self.H = config.n_embd, config.n_head
        self.eps, self.tanh = float(config.layer_norm_eps), int(config.activation == "gelu_tanh")
        mods = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        self.packed = [kernels[m].packed for m in mods]
        self.wtype = _WTYPE[self.packed[0].precision]
        self.weights = [_Weight(p.weight.data_ptr(), None if p.scale is None else p.scale.data_ptr(),
                                None if p.bias is None else p.bias.data_ptr()) for p in self.packed]
        self._weight_refs = [ctypes.byref(w) for w in self.weights]  # built once, not per call
        self.ln = [t.detach().float().contiguous() if t is not None else None
                   for t in (block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias)]
        self.ln_ptr = [None if t is None else t.data_ptr() for t in self.ln]
        self.rows = {b for b, c in kernels[mods[0]].table.items() if c == "skinny"}
        self._work: torch.Tensor | None = None

    def handles(self, rows: int, segments) -> bool:
        if bucket(rows) not in self.rows:
            return False
        first = segments[0].cache
        return all(s.cache.max_len == first.max_len and s.cache.batch_size == 1
                   and s.cache.dtype == first.dtype in KV_DTYPES for s in segments)

    def __call__(self, x: torch.Tensor, layer: int, segments) -> torch.Tensor:
        B, T, C = x.shape
        y = x.reshape(T, C).float().clone()
        need = T * 8 * C + 8
        if self._work is None or self._work.numel() < need:
            self._work = torch.empty(need)
        kc, vc, pos = [], [], []
        for s in segments:
            k, v = s.cache.k[layer], s.cache.v[layer]
            n = s.rows.stop - s.rows.start
            kc += [k.data_ptr()] * n
            vc += [v.data_ptr()] * n
            pos += s.pos.tolist()
        max_len = segments[0].cache.max_len
        P = ctypes.c_void_p * T
        SKINNY.lib.gpt_block(
            y.data_ptr(), T, C, self.H, self.wtype, self.eps, self.tanh, *self.ln_ptr,
            *self._weight_refs, P(*kc), P(*vc), KV_DTYPES[segments[0].cache.dtype], (ctypes.c_long * T)(*pos), max_len,
            self._work.data_ptr(), torch.get_num_threads())
        return y.reshape(B, T, C)


class FusedTrunk:
    """The embedding, every block, the final exit's LayerNorm and, where the
    plan runs the head with the C kernel for that many rows, the head of a
    decode step in one call (csrc/skinny.c's ``gpt_trunk``), over the blocks'
    ``FusedBlock`` weights, with the model's skip connections and DWA
    between the blocks (their learned weights copied at plan time, like the
    rest). Each Python step of a forward costs more than its nominal time:
    streaming the weights evicts the interpreter's own data from the caches."""

    def __init__(self, model, blocks: list[FusedBlock], head: "LinearKernel | None" = None):
        c = model.config
        self.blocks = blocks
        self.C, self.H, self.L = c.n_embd, c.n_head, c.n_layer
        self.n_exits = len(c.exit_layers)
        slot = {layer: i for i, layer in enumerate(c.exit_layers[:-1])}
        self.exit_slot = (ctypes.c_long * self.L)(*[slot.get(i + 1, -1) for i in range(self.L)])
        self.weights = (_Weight * (4 * self.L))(*[w for b in blocks for w in b.weights])
        self.ln = (ctypes.c_void_p * (4 * self.L))(*[p for b in blocks for p in b.ln_ptr])
        self.wte, self.wpe = model.wte.weight.detach(), model.wpe.weight.detach()
        lnf = model.exit_ln[-1]
        self.lnf = [lnf.weight.detach().float().contiguous(),
                    None if lnf.bias is None else lnf.bias.detach().float().contiguous()]
        self.eps, self.tanh, self.wtype = blocks[0].eps, blocks[0].tanh, blocks[0].wtype
        self.head = head
        if head is not None:
            p = head.packed
            self.head_weight = _Weight(p.weight.data_ptr(), None if p.scale is None else p.scale.data_ptr(),
                                       None if p.bias is None else p.bias.data_ptr())
            self.head_ref = ctypes.byref(self.head_weight)
            self.head_wtype, self.V = _WTYPE[p.precision], p.shape[0]
        self._mixing_arrays = self._mixing(model)
        self._work: torch.Tensor | None = None

    def _mixing(self, model) -> dict[str, torch.Tensor] | None:
        """The skips' and DWA's weights as csrc/skinny.c's Mixing arrays (None: a plain model)."""
        from .gpt import dwa_sources

        c, L = model.config, self.L
        if not (c.embed_skip or c.unet_skip or c.dwa):
            return None
        arrays: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if c.embed_skip:  # blocks 2..L (0-based 1..L-1) mix in x0
                ab = torch.stack([torch.tensor([1.0, 0.0])] + [w.detach().float() for w in model.embed_skip_weights])
                arrays["embed"] = torch.tensor([0] + [1] * (L - 1), dtype=torch.int32)
                arrays["a"], arrays["b"] = ab[:, 0].contiguous(), ab[:, 1].contiguous()
            if c.unet_skip:
                src, w = [-1] * L, [0.0] * L
                for dst, (j, s) in model._unet_into.items():
                    src[dst - 1], w[dst - 1] = s - 1, float(model.unet_weights[j])
                arrays["unet_src"], arrays["unet_w"] = torch.tensor(src, dtype=torch.long), torch.tensor(w)
            if c.dwa:
                n, off, idx, w = [0] * L, [0] * L, [], []
                for block, k in model._dwa_index.items():
                    srcs = dwa_sources(block, c.dwa_dilation)
                    n[block - 1], off[block - 1] = len(srcs), len(idx)
                    idx += srcs
                    w += model.dwa_weights[k].detach().float().tolist()
                arrays.update(dwa_n=torch.tensor(n, dtype=torch.long), dwa_off=torch.tensor(off, dtype=torch.long),
                              dwa_idx=torch.tensor(idx, dtype=torch.long), dwa_w=torch.tensor(w))
        return arrays

    def _mixing_for(self, T: int):
        """The Mixing struct with a history buffer for T rows (None for a plain model)."""
        if self._mixing_arrays is None:
            return None, None
        hist = torch.empty((self.L + 1) * T * self.C)
        m = _Mixing(**{k: v.data_ptr() for k, v in self._mixing_arrays.items()}, hist=hist.data_ptr())
        return m, hist

    def runs_head(self, rows: int) -> bool:
        """Whether the plan runs the head with the C kernel for ``rows`` rows."""
        return self.head is not None and self.head.table[bucket(rows)] == "skinny"

    @staticmethod
    def fits(model) -> bool:
        w = (model.wte.weight, model.wpe.weight)
        return all(t.dtype == torch.float32 and t.is_contiguous() for t in w)

    def handles(self, rows: int, segments) -> bool:
        return self.blocks[0].handles(rows, segments)

    def __call__(self, idx: torch.Tensor, segments, head_from: int | None = None):
        """(hidden (1, T, C), [exit stream (1, T, C)], logits (1, T - head_from, V) or None):
        logits for rows head_from.. when asked and the plan runs the head in C for them."""
        T, C = idx.numel(), self.C
        if head_from is not None and not self.runs_head(T - head_from):
            head_from = None
        ids = idx.reshape(T).to(torch.long).contiguous()
        pos = torch.cat([s.pos for s in segments]) if len(segments) > 1 else segments[0].pos
        kc, vc = [], []
        for layer in range(self.L):
            for s in segments:
                n = s.rows.stop - s.rows.start
                kc += [s.cache.k[layer].data_ptr()] * n
                vc += [s.cache.v[layer].data_ptr()] * n
        need = T * 8 * C + 8
        if self._work is None or self._work.numel() < need:
            self._work = torch.empty(need)
        x, hidden = torch.empty(T, C), torch.empty(T, C)
        exits = torch.empty(max(self.n_exits - 1, 1), T, C)
        P = ctypes.c_void_p * (self.L * T)
        g, b = self.lnf
        logits = None if head_from is None else torch.empty(T - head_from, self.V)
        mixing, _hist = self._mixing_for(T)  # _hist: alive until the call returns
        SKINNY.lib.gpt_trunk(
            ids.data_ptr(), self.wte.data_ptr(), self.wpe.data_ptr(), x.data_ptr(), T, C, self.H, self.L,
            self.wtype, self.eps, self.tanh, self.ln, self.weights, P(*kc), P(*vc),
            KV_DTYPES[segments[0].cache.dtype], pos.data_ptr(),
            segments[0].cache.max_len, self.exit_slot, exits.data_ptr(), g.data_ptr(),
            None if b is None else b.data_ptr(), hidden.data_ptr(),
            None if logits is None else self.head_ref, self.head_wtype if logits is not None else 0,
            self.V if logits is not None else 0, head_from or 0, None if logits is None else logits.data_ptr(),
            None if mixing is None else ctypes.byref(mixing), self._work.data_ptr(), torch.get_num_threads())
        return hidden[None], [exits[e][None] for e in range(self.n_exits - 1)], \
            (None if logits is None else logits[None])


# --- the plan -------------------------------------------------------------------------

@dataclass
class KernelPlan:
    """What ``plan()`` chose, and the timings it chose by."""

    precision: str
    threads: int
    cpu: dict
    # group ("trunk" or "head") -> row bucket -> chosen candidate
    choices: dict[str, dict[int, str]]
    # group -> row bucket -> candidate -> median ms (one pass over the group's weights)
    timings: dict[str, dict[int, dict[str, float]]]
    skinny: str  # "ok: <path>" or why it is unavailable
    seconds: float
    reason: str = ""
    precision_ms: dict[str, float] = field(default_factory=dict)  # with auto: one-row pass per precision
    kv_cache: str = "float32"  # the KV cache's element type (KV_CACHE)
    fused: str = "none"  # "trunk" (one C call a decode step), "blocks" (one per block) or "none"
    huge_pages: bool = False  # the packed weights asked for 2 MB pages (_in_huge_pages)
    # decode bucket -> how many weight rows ahead its C products ask for (_choose_prefetch)
    prefetch: dict[int, int] = field(default_factory=dict)
    prefetch_ms: dict = field(default_factory=dict)  # bucket -> rows ahead -> best pass, ms
    busy: float | None = None  # share of the CPUs other processes used while timing (CpuShare)

    def describe(self) -> str:
        one = {g: self.choices[g][1] for g in self.choices}
        many = {g: self.choices[g][8] for g in self.choices}
        return (f"kernels: {self.precision} on {self.threads} thread(s) of {self.cpu['model']} "
                f"({', '.join(self.cpu['flags']) or 'no AVX'}); 1 row: {one}, 8 rows: {many}; "
                f"fused: {self.fused}; KV cache {self.kv_cache}; "
                f"weights in {'2 MB' if self.huge_pages else '4 KB'} pages; "
                f"prefetch ahead at rows {[b for b, a in self.prefetch.items() if a] or 'none'}; "
                f"chosen by timing in {self.seconds:.1f} s" + (f"; {self.reason}" if self.reason else "")
                + (f"; {self.busy_warning()}" if self.busy_warning() else ""))

    def busy_warning(self) -> str:
        if self.busy is None or self.busy <= BUSY_SHARE:
            return ""
        return (f"other processes kept {self.busy:.0%} of the CPUs busy while these kernels were timed, so the "
                "choices may not be the fastest once the machine is free: restart the server then, or pin --dtype "
                "(docs/performance.md, 'Sharing the CPU')")

    def to_dict(self) -> dict:
        return {"precision": self.precision, "threads": self.threads, "cpu": self.cpu,
                "choices": {g: {str(b): c for b, c in t.items()} for g, t in self.choices.items()},
                "timings_ms": {g: {str(b): t for b, t in bt.items()} for g, bt in self.timings.items()},
                "skinny": self.skinny, "seconds": round(self.seconds, 2), "reason": self.reason,
                "precision_ms": self.precision_ms, "kv_cache": self.kv_cache, "fused": self.fused,
                "huge_pages": self.huge_pages, "prefetch": {str(b): a for b, a in self.prefetch.items()},
                "prefetch_ms": {str(b): {str(a): v for a, v in t.items()} for b, t in self.prefetch_ms.items()},
                "busy": None if self.busy is None else round(self.busy, 3)}


Measure = Callable[[str, int, str, list[Packed]], float]


def time_pass(group: str, rows: int, candidate: str, weights: list[Packed], reps: int | None = None) -> float:
    """Median ms of one pass of ``candidate`` over ``weights`` (in forward order,
    so each weight comes from memory as in a real forward) with ``rows`` rows.
    The last bucket's passes are long (tens of ms), and fewer of them bound the
    time a load spends timing."""
    reps = reps or (7 if rows < ROW_BUCKETS[-1] else 3)
    fn = CANDIDATES[candidate]
    xs = {K: torch.randn(rows, K) for K in {p.shape[1] for p in weights}}
    for p in weights:  # warm-up: page in, build caches
        fn(xs[p.shape[1]], p)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for p in weights:
            fn(xs[p.shape[1]], p)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _groups(model) -> dict[str, list[tuple[torch.nn.Module | None, torch.Tensor, torch.Tensor | None]]]:
    from .gpt import Linear

    trunk = [(m, m.weight, m.bias) for m in model.blocks.modules() if isinstance(m, Linear)]
    head = [(None, model.exit_heads[-1].weight, None)]
    return {"trunk": trunk, "head": head}


def _choose(groups_packed: dict[str, list[Packed]], precision: str, measure: Measure,
            buckets: tuple[int, ...] = ROW_BUCKETS):
    """Per group, the kernel for each row bucket. The buckets of one sequence's
    decode steps (1 row, or a verify step's up to DECODE_ROWS) share one kernel
    that gives a row the same result whatever rows come with it: otherwise a
    verify step could round differently from the one-token forwards and flip
    a token, and speculation would no longer be lossless (with bf16 weights on
    a random tiny model it did). The skinny kernel has that property by
    construction (csrc/skinny.c), so it takes those buckets wherever it
    builds, and only it is timed there (for the report, and for auto's
    choice of precision); without it, the candidate fastest over those
    buckets together. Larger buckets (batched forwards of several requests,
    prompt chunks) take whichever is fastest for each."""
    names = available(precision)
    choices, timings = {}, {}
    decode = [b for b in buckets if b <= DECODE_ROWS]
    for g, packed in groups_packed.items():
        choices[g], timings[g] = {}, {}
        for b in buckets:
            timed = ["skinny"] if b in decode and "skinny" in names else names
            t = {c: measure(g, b, c, packed) for c in timed}
            timings[g][b] = {c: round(v, 4) for c, v in t.items()}
            choices[g][b] = min(t, key=t.get)
        one = "skinny" if "skinny" in names else min(names, key=lambda c: sum(timings[g][b][c] for b in decode))
        for b in decode:
            choices[g][b] = one
    return choices, timings


# Plain English prose for the load-time quality check (written for it).
_PROSE = (
    "The river was high that spring, and the ferry ran only in the mornings. People from the farms "
    "came down early with their carts and waited on the bank, talking about the weather, the price "
    "of seed and the new school that was to open in the autumn. Nobody was in a hurry. When the boat "
    "came back across the water, the ferryman tied it to the old post, counted the passengers with a "
    "nod, and took the coins without a word. On the far side the road climbed between hedges to the "
    "market town, where the bell in the square had struck eight long before the first of them arrived. "
    "It was, everyone agreed, a slow way to travel, but it was the only way they had, and most of them "
    "would not have changed it for anything.")


def quality_samples(tokenizer, max_tokens: int = 256) -> dict[str, list[int]]:
    """Two short texts to check a precision's quality at load without the
    training data: code (the start of the standard library's textwrap.py,
    which every Python carries) and the prose paragraph above."""
    import inspect
    import textwrap

    texts = {"code": inspect.getsource(textwrap), "prose": _PROSE}
    return {d: tokenizer.encode(t)[:max_tokens] for d, t in texts.items()}


@torch.no_grad()
def sample_logprobs(model, samples: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Next-token log-probabilities at each position of each sample, through
    the kernels installed: fed DECODE_ROWS tokens at a time, so it measures the
    kernels decode steps run (w8a8 rounds activations there only)."""
    out = {}
    for domain, ids in samples.items():
        x = torch.tensor([ids], device=model.wte.weight.device)
        cache = model.new_cache(max_len=len(ids))
        logits = torch.cat([model.forward_step(x[:, s:min(s + DECODE_ROWS, len(ids) - 1)], s, cache).logits[0]
                            for s in range(0, len(ids) - 1, DECODE_ROWS)]).float()
        out[domain] = F.log_softmax(logits[:, :model.config.vocab_size], dim=-1)
    return out


def sample_loss(model, samples: dict[str, list[int]]) -> dict[str, float]:
    """Mean next-token loss on each sample, through the kernels installed."""
    return {d: F.nll_loss(lp, torch.tensor(samples[d][1:], device=lp.device)).item()
            for d, lp in sample_logprobs(model, samples).items()}


def quality_cost(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean KL(base || other) per token, per domain, in nats: the loss a
    precision adds on text the float32 model itself would write. Not the loss
    on the sample's own tokens: where the sample is foreign to the model (a
    prose check on a model of Shakespeare) float32 already pays 15 nats on
    some tokens, and rounding moves those far-tail logits most. On the 6 x 256
    default the prose sample's loss rose 0.026 nats under w8a8, its KL 0.0013,
    and on held-out Shakespeare the loss rose 0.0015 and the KL 0.0014
    (bench/results/precision-quality-default-amd-avx2.json)."""
    return {d: F.kl_div(other[d], base[d], log_target=True, reduction="batchmean").item() for d in base}


# The distance tried: the gain did not depend on it between 2 and 16 rows on the
# AVX2 EPYC; whether to ask at all, for how many input rows, is timed on the
# serving machine (bench/prefetch.py, bench/results/prefetch-*.json).
PREFETCH_ROWS = 4
_PREFETCH_TABLE = 65  # csrc/skinny.c's PREFETCH_TABLE: products of up to 64 rows


def _prefetch_none() -> None:
    for r in range(_PREFETCH_TABLE):
        SKINNY.lib.skinny_set_prefetch(r, 0)


def _choose_prefetch(packed: dict[str, list[Packed]], choices, measure: Measure,
                     reps: int = 2) -> tuple[dict[int, int], dict[int, dict[int, float]]]:
    """For each decode bucket where the C kernel runs every group, whether its products
    should ask for weight rows PREFETCH_ROWS ahead: a pass over the groups timed with and
    without (alternating, best of ``reps``), and the faster set for the rows of that bucket
    (larger products never prefetch: ``plan`` turned it off everywhere before timing
    anything). Results are the same either way. The setting is the C library's,
    process-wide: with several models in one process the last plan's holds for all (a
    server plans one). Returns (bucket -> rows ahead, bucket -> rows ahead -> ms)."""
    buckets = [b for b in ROW_BUCKETS if b <= DECODE_ROWS and all(choices[g][b] == "skinny" for g in packed)]
    chosen, timed, lo = {}, {}, 0
    for b in buckets:
        ms: dict[int, list[float]] = {0: [], PREFETCH_ROWS: []}
        for _ in range(reps):
            for ahead in ms:
                SKINNY.lib.skinny_set_prefetch(b, ahead)
                ms[ahead].append(sum(measure(g, b, "skinny", packed[g]) for g in packed))
        timed[b] = {k: round(min(v), 4) for k, v in ms.items()}
        chosen[b] = PREFETCH_ROWS if timed[b][PREFETCH_ROWS] < timed[b][0] else 0
        for r in range(lo + 1, b + 1):
            SKINNY.lib.skinny_set_prefetch(r, chosen[b])
        lo = b
    return chosen, timed


def plan(model, precision: str = "auto", *, measure: Measure | None = None, samples: dict[str, list[int]] | None = None,
         log: Callable[[str], None] | None = None) -> KernelPlan:
    """Choose and install the inference kernels of ``model`` on this machine.

    ``precision``: float32, bfloat16, int8, or auto: the fastest one-row pass
    measured here among the precisions whose predictions on ``samples`` (token
    ids per domain, ``quality_samples``) stay within QUALITY_BOUNDS of float32's
    (``quality_cost``: the mean KL from float32's).
    Without samples auto chooses between float32 and bfloat16 by speed alone
    where bfloat16 is native, as its cost is far inside the bound on every
    model we measured. ``measure`` replaces the timer (tests use a stub).
    Works on the CPU only; on other devices the model keeps torch's kernels
    and the plan says so.
    """
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    t0 = time.perf_counter()
    share = CpuShare()
    device = model.wte.weight.device
    measure = measure or time_pass
    reason = ""
    if device.type != "cpu":
        model.set_kernels(None)
        p = "float32" if precision == "auto" else precision
        return KernelPlan(p, torch.get_num_threads(), cpu_summary(), {}, {}, "cpu only", 0.0,
                          reason=f"on {device.type} the model runs torch's kernels in its own dtype",
                          kv_cache=str(model.wte.weight.dtype).removeprefix("torch."))
    groups = _groups(model)
    if SKINNY.load():  # precisions and buckets are timed without prefetching; it is chosen last
        _prefetch_none()
    if precision == "bfloat16" and not native_bf16() and not SKINNY.load():
        warnings.warn("treespec: this CPU has no native bf16 dot products (AVX-512 BF16 or AMX) and the "
                      "skinny kernel did not build: bfloat16 weights run through fp32 arithmetic here, "
                      "no faster than --dtype float32", RuntimeWarning, stacklevel=2)
    precision_ms: dict[str, float] = {}
    if precision == "auto":
        # bf16 and int8 weights pay where something reads them without
        # widening them first in memory: the skinny kernel, or native bf16.
        skinny = SKINNY.load()
        tried = ["float32"] + (["bfloat16"] if skinny or native_bf16() else []) + (
            ["int8"] + (["w8a8"] if SKINNY.lib.skinny_has_w8a8() else []) if skinny and samples else [])
        results = {}
        for p in tried:  # one-row passes decide; the other buckets are timed for the winner only
            packed = {g: [Packed.of(w, b, p) for _, w, b in items] for g, items in groups.items()}
            results[p] = (packed, *_choose(packed, p, measure, buckets=(1,)))
            precision_ms[p] = round(sum(results[p][2][g][1][results[p][1][g][1]] for g in groups), 4)
        notes = [", ".join(f"{p} {ms:.2f} ms" for p, ms in precision_ms.items()) + " for a one-row pass"]
        precision = "float32"
        base = None
        for p in sorted(precision_ms, key=precision_ms.get):
            if p == "float32":
                break
            if not samples:
                precision = p
                break
            if base is None:
                model.set_kernels(None)
                base = sample_logprobs(model, samples)
            # The samples run in decode-sized chunks, so the one-row choice (the
            # row-independent kernel) stands in for every bucket.
            _install(model, groups, results[p][0], {g: dict.fromkeys(ROW_BUCKETS, c[1])
                                                     for g, c in results[p][1].items()})
            cost = quality_cost(base, sample_logprobs(model, samples))
            ok = all(c <= QUALITY_BOUNDS[p] for c in cost.values())
            notes.append(f"{p} costs " + ", ".join(f"{d} {c:+.4f}" for d, c in cost.items())
                         + f" nats/token of KL ({'within' if ok else 'over'} {QUALITY_BOUNDS[p]})")
            if ok:
                precision = p
                break
        if not samples:
            notes.append("int8 and w8a8 only with a quality check (--dtype to force one)")
        reason = "auto: " + "; ".join(notes)
        packed = results[precision][0]
    else:
        packed = {g: [Packed.of(w, b, precision) for _, w, b in items] for g, items in groups.items()}
    huge = _in_huge_pages(packed)
    choices, timings = _choose(packed, precision, measure)
    prefetch, prefetch_ms = _choose_prefetch(packed, choices, measure) if SKINNY.lib is not None else ({}, {})
    _install(model, groups, packed, choices)
    fused = "trunk" if model.fused_trunk is not None else "blocks" if model.blocks[0].fused is not None else "none"
    result = KernelPlan(precision, torch.get_num_threads(), cpu_summary(), choices, timings,
                        f"ok: {SKINNY.path()}" if SKINNY.lib is not None else (SKINNY.error or "not built"),
                        time.perf_counter() - t0, reason, precision_ms,
                        str(model.kv_dtype).removeprefix("torch."), fused, huge, prefetch, prefetch_ms,
                        share.others())
    if log:
        log(result.describe())
    if result.busy_warning():
        warnings.warn(f"treespec: {result.busy_warning()}", RuntimeWarning, stacklevel=2)
    return result


def _install(model, groups, packed, choices) -> None:
    kernels = {}
    for g, items in groups.items():
        for (module, _, _), p in zip(items, packed[g]):
            kernels[module if module is not None else "head"] = LinearKernel(p, choices[g])
    fused = {}
    if SKINNY.lib is not None and "skinny" in choices["trunk"].values():
        fused = {block: FusedBlock(block, kernels, model.config) for block in model.blocks}
    trunk = FusedTrunk(model, list(fused.values()), kernels["head"]) if fused and FusedTrunk.fits(model) else None
    model.set_kernels(kernels, fused, trunk)
    model.kv_dtype = KV_CACHE[packed["head"][0].precision]


DTYPE_CHOICES = ("auto", *PRECISIONS)
_CUDA_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}


def load_for_inference(path, dtype: str = "auto", device: str = "cpu", log: Callable[[str], None] | None = None,
                       measure: Measure | None = None):
    """Load a bundle to serve it: verified weights, then kernels planned for
    this machine in ``dtype`` (auto, float32, bfloat16 or int8). Returns
    (bundle, KernelPlan). On CUDA the model is cast to ``dtype`` instead
    (int8 has no CUDA kernel here and is refused). ``measure`` replaces the
    planner's timer (``plan``); the server's gives up when it is stopped."""
    from .bundle import load_bundle

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if torch.device(device).type != "cpu":
        if dtype not in _CUDA_DTYPES:
            raise ValueError(f"dtype {dtype} has no kernel on {device}; use float32 or bfloat16 there")
        bundle = load_bundle(path, device=device, dtype=_CUDA_DTYPES[dtype])
        return bundle, plan(bundle.model, dtype, log=log)
    bundle = load_bundle(path)
    samples = quality_samples(bundle.tokenizer, min(256, bundle.config.block_size)) if dtype == "auto" else None
    return bundle, plan(bundle.model, dtype, samples=samples, log=log, measure=measure)


__all__ = ["bucket", "DTYPE_CHOICES", "load_for_inference", "PRECISIONS", "QUALITY_BOUNDS", "quality_cost", "quality_samples", "sample_logprobs", "sample_loss", "ROW_BUCKETS", "KernelPlan", "LinearKernel", "Packed", "plan", "native_bf16",
           "cpu_summary", "cpu_model", "cpu_slug", "CpuShare", "other_share", "available", "time_pass", "SKINNY"]
