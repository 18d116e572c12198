"""Shared fixtures: tiny models built once per test session, and the repository paths."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def same_random_state():
    """Every test starts from the same global random state, whatever ran before it: a test that draws
    unseeded inputs gets the same ones alone, in the suite, or in another order."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """Forget Accelerate's process-wide state before and after a test that sets a mixed precision
    in-process: an ``Accelerator()`` refuses to change the precision an earlier one set."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory) -> Callable[..., Path]:
    """``factory(arch="llama", **overrides) -> model dir``, each variant built once per session."""
    from rlhf.tiny_models import build_tiny_model

    cache: dict[tuple, Path] = {}

    def factory(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in cache:
            name = "-".join([arch] + [f"{k}{v}" for k, v in sorted(overrides.items())])
            cache[key] = build_tiny_model(arch, tmp_path_factory.mktemp(name), **overrides)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def llama3_rope_copy(tiny_model_factory) -> Callable[..., Path]:
    """``copy(out, original_max_position_embeddings) -> dir``: the tiny llama with llama-3 RoPE scaling in
    its config.json, written the transformers 4.x way (``rope_scaling`` + ``rope_theta``)."""

    def copy(out: Path, original_max_position_embeddings: int) -> Path:
        shutil.copytree(tiny_model_factory("llama"), out)
        config = json.loads((out / "config.json").read_text())
        config.pop("rope_parameters")
        config["rope_theta"] = 500000.0
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max_position_embeddings,
        }
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return out

    return copy


@pytest.fixture
def trainer_steps(monkeypatch) -> list[int]:
    """The global step of each micro-batch the SFT and reward-model Trainers run in this process, in order:
    a resumed run's first entry is its checkpoint's step (a silent restart's is 0)."""
    from rlhf.training.guard import FiniteLossMixin

    seen: list[int] = []
    original = FiniteLossMixin.training_step

    def counted(self, *args, **kwargs):
        seen.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FiniteLossMixin, "training_step", counted)
    return seen


@pytest.fixture
def world_of_one():
    """A tensor-parallel group of one process (gloo on CPU) for the test, torn down afterwards."""
    from rlhf.tp.distributed import init_model_parallel, shutdown

    init_model_parallel()
    yield
    shutdown()


# a rule reward (a --reward_fn file) and GSM8K rows for the PPO runs of both backends
LENGTH_REWARD = "def score(prompts, responses):\n    return [float(len(r) % 3) - 1.0 for r in responses]\n"
GSM8K_ROWS = [
    {"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
    for a, b in [(2, 2), (3, 5), (1, 6), (4, 4)]
]


@pytest.fixture(scope="session")
def length_reward(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reward") / "length_reward.py"
    path.write_text(LENGTH_REWARD)
    return f"{path}:score"


@pytest.fixture(scope="session")
def gsm8k_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gsm8k") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return path
