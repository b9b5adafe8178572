import os
from pathlib import Path

import pytest
import torch

from treespec.model import GPT, GPTConfig
from treespec.model.tokenizer import find_ranks_file

REPO = Path(__file__).resolve().parents[1]

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # tiny models: more threads only add OpenMP spin and contention


def tiny_config(**kw) -> GPTConfig:
    """A network small enough that a forward takes milliseconds."""
    base = dict(n_layer=4, n_head=2, n_embd=32, block_size=64, exit_layers=(2, 3, 4), dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


def tiny_model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**kw)).eval()


@pytest.fixture(scope="session")
def ranks_path() -> Path:
    return find_ranks_file()


@pytest.fixture
def tiny_bundle(tmp_path, ranks_path):
    from treespec.model import save_bundle

    model = tiny_model()
    return save_bundle(tmp_path / "bundle", model, ranks_path)
