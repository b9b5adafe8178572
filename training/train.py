"""Train a multi-exit GPT from scratch (or on from a bundle), end to end (the command is
``treespec train``, treespec/cli/train.py).

One process on a CPU or GPU, or several under ``torchrun`` (DistributedDataParallel;
each rank samples its own batches, rank 0 alone evaluates, logs and saves).

A run's folder holds ``ckpt.pt`` (everything ``--resume`` needs to continue
bit for bit), ``metrics.jsonl``, ``loss.png`` and, at the end, ``bundle/``
(the servable model) with ``training_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..model.bundle import _DTYPES, BundleError, load_bundle, save_bundle
from ..model.gpt import GPT
from .config import TrainConfig, TrainConfigError
from .data import load_meta, load_split

CKPT_FILE = "ckpt.pt"
CKPT_VERSION = 1


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """A run's ``ckpt.pt``, checked: our own file, but still loaded as tensors and
    plain containers only (``weights_only``), never arbitrary pickles."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a foreign pickle, a truncated file: say which, never run it
        raise TrainConfigError(f"{path}: not a readable treespec checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ck, dict) or "model_config" not in ck or "model" not in ck:
        hint = "; for nanoGPT's ckpt.pt use --from nanogpt" if isinstance(ck, dict) and "model_args" in ck else ""
        raise TrainConfigError(f"{path}: not a treespec training checkpoint{hint}")
    if ck.get("version") != CKPT_VERSION:
        raise TrainConfigError(f"{path}: checkpoint version {ck.get('version')} is not {CKPT_VERSION}, "
                               f"which this treespec reads")
    return ck


# --- data --------------------------------------------------------------------

class Batcher:
    """Random training windows; its generator state is part of the checkpoint,
    so a resumed run draws exactly the batches the uninterrupted run would."""

    def __init__(self, data, batch_size: int, seq_len: int, seed: int):
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        if len(data) <= seq_len + 1:
            raise TrainConfigError(f"training split has {len(data)} tokens, fewer than seq_len+1={seq_len + 1}")
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        rows = [torch.from_numpy(self.data[i:i + self.seq_len + 1].astype("int64")) for i in ix.tolist()]
        xy = torch.stack(rows)
        return xy[:, :-1], xy[:, 1:]


def eval_windows(data, span: dict, seq_len: int, n_tokens: int) -> torch.Tensor:
    """Evenly spaced, fixed windows over one domain's span: the same every eval."""
    start, end = span["start"], span["end"]
    avail = end - start - seq_len - 1
    n = max(1, min(n_tokens // seq_len, avail // seq_len if avail > 0 else 1))
    if avail <= 0:
        offsets = [start]
    else:
        offsets = [start + (avail * k) // max(1, n - 1) if n > 1 else start for k in range(n)]
    rows = [torch.from_numpy(data[o:o + seq_len + 1].astype("int64")) for o in offsets
            if o + seq_len + 1 <= len(data)]
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model: GPT, data, split_meta: dict, cfg: TrainConfig, device: torch.device) -> dict:
    """Mean loss per exit per domain: {"exit_4": {"stdlib": 2.1, ...}, ...}."""
    was_training = model.training
    model.eval()
    layers = model.config.exit_layers
    out = {f"exit_{l}": {} for l in layers}
    for domain, span in split_meta["domains"].items():
        windows = eval_windows(data, span, cfg.seq_len, cfg.eval_tokens)
        sums = [0.0] * len(layers)
        for i in range(0, len(windows), cfg.batch_size):
            xy = windows[i:i + cfg.batch_size].to(device)
            res = model(xy[:, :-1], xy[:, 1:], return_logits=False)
            for e, l in enumerate(res.exit_losses):
                sums[e] += l.item() * len(xy)
        for e, l in enumerate(layers):
            out[f"exit_{l}"][domain] = sums[e] / len(windows)
    model.train(was_training)
    return out


# --- learning rate -----------------------------------------------------------

def scheduled_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class HypergradientLR:
    """Hypergradient descent on the learning rate (Baydin et al., ICLR 2018).

    The loss after step t-1 depends on the learning rate α through that
    step's update, θ_t = θ_{t-1} + α·d_{t-1}, where d is the update direction
    AdamW chose (its update is linear in α). So ∂L(θ_t)/∂α = g_t · d_{t-1}, and
    gradient descent on α gives  α_t = α_{t-1} − β · g_t · d_{t-1}:  when the
    new gradient still points along the last step (g·d < 0) the step was too
    short and α grows; when it points back (g·d > 0) it overshot and α shrinks.
    We read d off the parameters themselves, d = (θ_t − θ_{t-1}) / α, and keep
    α inside [lr_min, lr_max]. Warmup runs first, on the fixed schedule.
    """

    def __init__(self, cfg: TrainConfig):
        self.beta = cfg.hypergrad_beta
        self.lo, self.hi = cfg.hypergrad_lr_min, cfg.hypergrad_lr_max
        self.lr = cfg.lr
        self.prev_dir: list[torch.Tensor] | None = None
        self.last_h = 0.0

    def update(self, params: list[torch.Tensor]) -> float:
        """Before the optimizer step: move α using the current gradients."""
        if self.prev_dir is not None:
            h = sum(torch.dot(p.grad.flatten().float(), d.flatten()) for p, d in zip(params, self.prev_dir)
                    if p.grad is not None)
            self.last_h = float(h)
            self.lr = min(self.hi, max(self.lo, self.lr - self.beta * self.last_h))
        return self.lr

    def record(self, before: list[torch.Tensor], params: list[torch.Tensor], lr_used: float) -> None:
        """After the optimizer step: remember the direction it took."""
        self.prev_dir = [(p.detach().float() - b) / lr_used for p, b in zip(params, before)]

    def state_dict(self) -> dict:
        return {"lr": self.lr, "prev_dir": self.prev_dir, "last_h": self.last_h}

    def load_state_dict(self, s: dict) -> None:
        self.lr, self.prev_dir, self.last_h = s["lr"], s["prev_dir"], s["last_h"]


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, DWA weights)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


# --- the run -------------------------------------------------------------------

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices natively (so autocast pays)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # torch.cpu's probes are private: absent ones mean "no"
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def use_bf16_autocast(mode: str, device: torch.device) -> bool:
    return mode == "on" or (mode == "auto" and native_bf16(device))


def hardware_summary(device: torch.device, world: int) -> dict:
    d = {"device": str(device), "world_size": world, "torch": torch.__version__,
         "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
         "threads": torch.get_num_threads()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


class Run:
    """One training run: state, the loop, checkpoints and outputs."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, command_line: str | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.command_line = command_line or shlex.join(sys.argv)
        # distributed setup: torchrun sets these
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.ddp = self.world > 1
        self.device = resolve_device(cfg.device, self.local_rank)
        if self.ddp and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.master = self.rank == 0
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals made CPU backward passes ~20x slower
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True

        self.bf16 = use_bf16_autocast(cfg.autocast_bf16, self.device)
        torch.manual_seed(cfg.seed)
        self.gpt_config = cfg.gpt_config()
        self.model = GPT(self.gpt_config).to(self.device)
        self.init_info: dict | None = None
        if cfg.init_from and not resume:  # a resumed run's weights come from its checkpoint
            self.init_info = self._init_from_bundle(cfg.init_from)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.hyper = HypergradientLR(cfg) if cfg.lr_schedule == "hypergradient" else None
        self.meta = load_meta(cfg.data_dir)
        self.train_data = load_split(cfg.data_dir, "train")
        self.val_data = load_split(cfg.data_dir, "val")
        self.batcher = Batcher(self.train_data, cfg.batch_size, cfg.seq_len, cfg.seed + self.rank)
        self.exit_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1000 + self.rank)
        self.step = 0
        self.tokens_seen = 0
        self.wall_time = 0.0
        self.last_eval: dict | None = None
        self.stop_requested = False

        if resume:
            self._load_checkpoint()
        elif self.master and (self.out / CKPT_FILE).exists():
            raise TrainConfigError(f"{self.out / CKPT_FILE} exists: pass --resume to continue it, "
                                   f"or choose another out_dir")

        self.train_model: torch.nn.Module = self.model
        if cfg.compile and self.device.type == "cuda":
            self.train_model = torch.compile(self.model)
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_model = DDP(self.train_model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def _init_from_bundle(self, path: str) -> dict:
        """Copy a bundle's weights into the fresh model; say what it was."""
        try:
            bundle = load_bundle(path)
        except BundleError as e:
            raise TrainConfigError(f"init_from: {e}") from None
        self.model.load_state_dict(bundle.model.state_dict())
        info = {"bundle": str(path), "weights_sha256": bundle.weights_sha256}
        summary = Path(path) / "training_summary.json"
        if summary.is_file():  # so the new summary can say how much training the weights had before
            prior = json.loads(summary.read_text())
            info.update({k: prior[k] for k in ("tokens_seen", "steps", "wall_time_s") if k in prior})
            info["total_tokens_seen"] = prior.get("total_tokens_seen", prior.get("tokens_seen", 0))
        return info

    # --- checkpoints -----------------------------------------------------------

    def _checkpoint_state(self) -> dict:
        return {
            "version": CKPT_VERSION,
            "train_config": self.cfg.to_dict(),
            "model_config": self.gpt_config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "hyper": self.hyper.state_dict() if self.hyper else None,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wall_time": self.wall_time,
            "batcher_rng": self.batcher.gen.get_state(),
            "exit_rng": self.exit_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "last_eval": self.last_eval,
            "init_from": json.dumps(self.init_info),  # a string: weights_only loads plain types only
        }

    def save_checkpoint(self) -> None:
        if not self.master:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (CKPT_FILE + ".tmp")
        torch.save(self._checkpoint_state(), tmp)
        os.replace(tmp, self.out / CKPT_FILE)  # atomic: a kill mid-save leaves the old one

    def _load_checkpoint(self) -> None:
        path = self.out / CKPT_FILE
        if not path.exists():
            raise TrainConfigError(f"--resume: no checkpoint at {path}")
        ck = read_checkpoint(path, self.device)
        if ck["model_config"] != self.gpt_config.to_dict():
            raise TrainConfigError(f"{path}: the checkpoint's model config differs from this run's; "
                                   f"resume with the same preset and --model.* overrides")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.hyper and ck["hyper"]:
            self.hyper.load_state_dict(ck["hyper"])
        self.step, self.tokens_seen, self.wall_time = ck["step"], ck["tokens_seen"], ck["wall_time"]
        self.last_eval = ck["last_eval"]
        self.init_info = json.loads(ck.get("init_from") or "null")
        if self.world == 1:  # each rank's own streams are only in a single-process checkpoint
            self.batcher.gen.set_state(ck["batcher_rng"])
            self.exit_gen.set_state(ck["exit_rng"])
        else:  # re-derive per-rank streams deterministically from the step
            self.batcher.gen.manual_seed(self.cfg.seed + self.rank + 7919 * self.step)
            self.exit_gen.manual_seed(self.cfg.seed + 1000 + self.rank + 7919 * self.step)
        torch.set_rng_state(ck["torch_rng"].cpu())
        if ck["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), self.device)
        # Drop log records from after the checkpoint: the resumed run rewrites them.
        log = self.out / "metrics.jsonl"
        if self.master and log.exists():
            keep = [l for l in log.read_text().splitlines() if l and json.loads(l).get("step", 0) <= self.step]
            log.write_text("".join(k + "\n" for k in keep))

    # --- one optimizer step -------------------------------------------------------

    def accumulate_gradients(self) -> tuple[float, list[float]]:
        """Forward/backward over grad_accum micro-batches, leaving the gradient
        of the mean loss in ``.grad`` (under DDP: averaged over all ranks).
        Returns the mean loss and the mean loss of each exit on this rank."""
        cfg = self.cfg
        exit_losses = None
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = self.batcher.next()
            x, y = x.to(self.device), y.to(self.device)
            sync = contextlib.nullcontext()
            if self.ddp and micro < cfg.grad_accum - 1:
                sync = self.train_model.no_sync()  # all-reduce once, on the last micro-batch
            amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                   else contextlib.nullcontext())
            with sync, amp:
                out = self.train_model(x, y, exit_sample_frac=cfg.exit_sample_frac, generator=self.exit_gen,
                                       return_logits=False)
                (out.loss / cfg.grad_accum).backward()
            total += out.loss.item() / cfg.grad_accum
            el = [l.item() / cfg.grad_accum for l in out.exit_losses]
            exit_losses = el if exit_losses is None else [a + b for a, b in zip(exit_losses, el)]
        return total, exit_losses

    def train_step(self) -> dict:
        """One optimizer step: accumulate gradients, clip, set the LR, AdamW."""
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        total, exit_losses = self.accumulate_gradients()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if cfg.grad_clip > 0 else 0.0

        if self.hyper and self.step >= cfg.warmup_steps:
            lr = self.hyper.update(params)
        else:
            lr = scheduled_lr(self.step, cfg)
            if self.hyper:
                self.hyper.lr = cfg.lr  # hypergradient takes over from the peak lr after warmup
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        before = [p.detach().float().clone() for p in params] if self.hyper else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.hyper:
            self.hyper.record(before, params, lr)
        self.step += 1
        self.tokens_seen += cfg.tokens_per_step(self.world)
        rec = {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen}
        rec.update({f"loss_exit_{l}": v for l, v in zip(self.gpt_config.exit_layers, exit_losses)})
        if self.hyper:
            rec["hypergradient"] = self.hyper.last_h
        return rec

    # --- outputs --------------------------------------------------------------------

    def log(self, rec: dict) -> None:
        if not self.master:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run_eval(self) -> dict:
        res = evaluate(self.model, self.val_data, self.meta["splits"]["val"], self.cfg, self.device)
        self.last_eval = res
        self.log({"step": self.step, "tokens": self.tokens_seen, "val": res})
        return res

    @contextlib.contextmanager
    def _signals_stop_training(self):
        """SIGINT/SIGTERM finish the current step, checkpoint and return.

        The previous handlers come back afterwards, so a caller (a test, a
        notebook) keeps its own Ctrl-C. Signal handlers can only be set from
        the main thread; elsewhere the caller stops a run via stop_requested.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self.stop_requested = True
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def train(self) -> dict:
        cfg = self.cfg
        if self.master:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        with self._signals_stop_training():
            return self._train_loop()

    def _train_loop(self) -> dict:
        cfg = self.cfg
        self.model.train()
        if self.master:  # the log of a run resumed over several sessions says where each part began
            c = self.gpt_config
            print(f"{'resuming' if self.step else 'training'} {self.out} at step {self.step} of {cfg.max_steps} "
                  f"({cfg.tokens_per_step(self.world):,} tokens a step): "
                  f"{self.model.num_params(non_embedding=False) / 1e6:.1f}M parameters, {c.n_layer} layers x "
                  f"{c.n_embd}, on {self.device} ({_count(torch.get_num_threads(), 'thread')}, "
                  f"{_count(self.world, 'process', 'processes')})",
                  flush=True)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and self.master),
                   desc="train", unit="step", dynamic_ncols=True)
        t_last, tok_last = time.time(), self.tokens_seen
        while self.step < cfg.max_steps and not self.stop_requested:
            t0 = time.time()
            rec = self.train_step()
            self.wall_time += time.time() - t0
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                now = time.time()
                rec["tokens_per_s"] = (self.tokens_seen - tok_last) / max(1e-9, now - t_last)
                t_last, tok_last = now, self.tokens_seen
                self.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
                if bar.disable and self.master:  # a log file (nohup) still shows where the run is
                    print(progress_line(self.step, cfg.max_steps, rec, cfg.tokens_per_step(self.world)),
                          flush=True)
            bar.update(1)
            if self.master and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps):
                res = self.run_eval()
                final = res[f"exit_{self.gpt_config.n_layer}"]
                bar.write(f"step {self.step}: val " + ", ".join(f"{d} {v:.3f}" for d, v in final.items()))
                plot_run(self.out)
            if self.step % cfg.ckpt_interval == 0 and not self.stop_requested:
                self.save_checkpoint()  # (a stop saves once, below)
            if self.ddp:
                dist.barrier()
        bar.close()
        if self.stop_requested:
            self.save_checkpoint()
            if self.master:
                print(f"stopped at step {self.step}; checkpoint in {self.out / CKPT_FILE} (continue with --resume)")
            return {"stopped_at": self.step}
        self.save_checkpoint()
        return self.finish() if self.master else {}

    def finish(self) -> dict:
        """Write the bundle and training_summary.json."""
        bundle_dir = self.out / "bundle"
        save_bundle(bundle_dir, self.model, dtype=_DTYPES[self.cfg.save_dtype])
        test_data = load_split(self.cfg.data_dir, "test")
        summary = {
            "command_line": self.command_line,
            "train_config": self.cfg.to_dict(),
            "model_config": self.gpt_config.to_dict(),
            "parameters": self.model.num_params(non_embedding=False),
            "tokens_seen": self.tokens_seen,
            "steps": self.step,
            "wall_time_s": round(self.wall_time, 1),
            "tokens_per_s": round(self.tokens_seen / max(1e-9, self.wall_time), 1),
            "hardware": {**hardware_summary(self.device, self.world), "bf16_autocast": self.bf16},
            "data": {"sources": self.meta["sources"],
                     "train_tokens": self.meta["splits"]["train"]["tokens"]},
            "final_val_loss": self.last_eval or self.run_eval(),
            "final_test_loss": evaluate(self.model, test_data, self.meta["splits"]["test"], self.cfg, self.device),
        }
        if self.init_info is not None:
            summary["init_from"] = self.init_info
            summary["total_tokens_seen"] = self.init_info.get("total_tokens_seen", 0) + self.tokens_seen
        (bundle_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_run(self.out)
        return summary


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def progress_line(step: int, max_steps: int, rec: dict, tokens_per_step: float) -> str:
    """What ``--progress=false`` prints every ``log_interval`` steps, as nanoGPT
    prints each iteration: the loss, the learning rate, the speed and the
    time left at that speed."""
    left_s = (max_steps - step) * tokens_per_step / max(1e-9, rec["tokens_per_s"])
    h, m = divmod(round(left_s / 60), 60)
    return (f"step {step}/{max_steps}: loss {rec['loss']:.3f}, lr {rec['lr']:.2e}, "
            f"{rec['tokens_per_s']:.0f} tokens/s, {f'{h}h{m:02d}m' if h else f'{m}m'} left")


# --- a bundle from a run in progress ---------------------------------------------------

def bundle_from_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                           dtype: torch.dtype | None = None,
                           tokenizer: str | os.PathLike | None = None) -> Path:
    """A run's ``ckpt.pt`` (or the run's folder) -> a bundle of the model as of that step.

    Every exit is kept, so the bundle serves, benches and ``draft-fit``s like the one
    the run writes at its end; the run itself is not touched and may keep going.
    ``dtype`` defaults to the run's ``save_dtype``."""
    from ..model.config import ConfigError, GPTConfig
    from ..model.interop import InteropError, atomic_dir
    from ..model.tokenizer import find_ranks_file

    src = Path(src)
    ckpt = src / CKPT_FILE if src.is_dir() else src
    if not ckpt.is_file():
        raise InteropError(f"{src}: no training checkpoint there; --from checkpoint takes a run's "
                           f"folder (treespec train --out_dir) or its {CKPT_FILE}")
    try:
        ck = read_checkpoint(ckpt)
    except TrainConfigError as e:
        raise InteropError(str(e)) from None
    try:
        config = GPTConfig.from_dict(ck["model_config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise InteropError(f"{ckpt}: {e}") from None
    model = GPT(config)
    model.load_state_dict(ck["model"])
    if dtype is None:
        dtype = _DTYPES[ck["train_config"].get("save_dtype", "float32")]
    ranks = find_ranks_file(tokenizer)
    meta = {"imported_from": {"format": "checkpoint", "path": str(ckpt.resolve()), "step": ck["step"],
                              "tokens_seen": ck["tokens_seen"],
                              # the run's latest evaluation, at or before ``step``
                              "last_val_loss": ck.get("last_eval")}}
    with atomic_dir(Path(out), force) as tmp:
        save_bundle(tmp, model, tokenizer_ranks=ranks, dtype=dtype, extra_meta=meta)
    return Path(out)


# --- plots ---------------------------------------------------------------------------

def plot_run(out_dir: str | os.PathLike) -> Path | None:
    """loss.png beside metrics.jsonl: train loss per exit, val loss per exit, and the LR."""
    out_dir = Path(out_dir)
    log = out_dir / "metrics.jsonl"
    if not log.exists():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val" in r]
    if not train:
        return None
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    exits = sorted({k for r in train for k in r if k.startswith("loss_exit_")}, key=lambda k: int(k.split("_")[-1]))
    for k in exits:
        ax.plot([r["tokens"] for r in train], [r[k] for r in train], lw=1, alpha=0.6, label=f"train {k[5:]}")
    for ex in (val[-1]["val"] if val else {}):
        for domain in val[-1]["val"][ex]:
            ax.plot([r["tokens"] for r in val], [r["val"][ex][domain] for r in val], marker="o", ms=3,
                    label=f"val {ex} {domain}")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax_lr.plot([r["tokens"] for r in train], [r["lr"] for r in train], color="k", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
