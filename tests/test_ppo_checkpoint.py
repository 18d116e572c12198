"""PPO checkpoints through the backend seam: a round trip restores weights, optimizer and RNG; a truncated
``trainable.safetensors`` / ``optimizer.pt`` is named in one CheckpointError line; the newest checkpoint
whose files are whole is found for an implicit resume, skipping damaged ones with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rlhf.backend.state_files import check_file
from rlhf.errors import CheckpointError
from rlhf.ppo.checkpoint import (
    checkpoint_problem,
    load_buffer_tensors,
    load_checkpoint,
    newest_loadable_checkpoint,
    save_checkpoint,
)
from rlhf.ppo.policy_interface import TrainableGroups


class TwoLinears(TrainableGroups):
    """The smallest models bundle a checkpoint needs: an actor and a critic layer, exported as tensors."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.actor, self.critic = torch.nn.Linear(4, 3), torch.nn.Linear(4, 1)
        self._trainable = {
            name: [(f"{name}.{n}", p) for n, p in m.named_parameters()]
            for name, m in (("actor", self.actor), ("critic", self.critic))
        }

    def save_actor(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        torch.save(self.actor.state_dict(), directory / "actor.pt")

    def save_critic(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        torch.save(self.critic.state_dict(), directory / "critic.pt")


@pytest.fixture(scope="module")
def backend():
    from rlhf.backend.accelerate import AccelerateBackend

    return AccelerateBackend()


def train_one_step(models: TwoLinears, steps: int = 1, scale: float = 1.0):
    """AdamW and a schedule for each group, after ``steps`` steps on inputs ``scale`` x ones (the loss's
    gradient squares make the moments depend on the weights and the inputs)."""
    params = models.parameter_groups()
    optimizers = {k: torch.optim.AdamW(v, lr=0.1) for k, v in params.items()}
    schedulers = {
        k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for k, o in optimizers.items()
    }
    for _ in range(steps):
        x = torch.full((2, 4), scale)
        loss = models.actor(x).pow(2).sum() + models.critic(x).pow(2).sum()
        loss.backward()
        for name, optimizer in optimizers.items():
            optimizer.step()
            optimizer.zero_grad()
            schedulers[name].step()
    return optimizers, schedulers


def save(directory: Path, backend, models: TwoLinears, optimizers, schedulers, step: int) -> None:
    save_checkpoint(
        directory, backend=backend, models=models, optimizers=optimizers, schedulers=schedulers,
        shared_state={"step": step}, rank_state={"metrics": {}}, buffer=None,
    )  # fmt: skip


def test_round_trip_restores_weights_optimizer_and_rng(backend, tmp_path):
    models = TwoLinears(0)
    optimizers, schedulers = train_one_step(models)
    save(tmp_path / "checkpoint-1", backend, models, optimizers, schedulers, 1)
    assert not list(tmp_path.glob(".*")), "the staging dir was published"
    assert (tmp_path / "checkpoint-1" / "trainable.safetensors").is_file()  # replicated: one copy
    assert (tmp_path / "checkpoint-1" / "actor" / "actor.pt").is_file()  # the export ran on the main process
    expected_draw = torch.rand(3)

    fresh = TwoLinears(1)
    fresh_opt, fresh_sched = train_one_step(fresh, steps=2, scale=-3.0)  # other moments, steps, schedule
    shared, rank_state, buffer = load_checkpoint(
        tmp_path / "checkpoint-1", backend=backend, models=fresh, optimizers=fresh_opt, schedulers=fresh_sched
    )
    assert shared == {"step": 1} and rank_state == {"metrics": {}} and buffer is None
    before, after = models.trainable_state(), fresh.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name in ("actor", "critic"):
        saved, loaded = optimizers[name].state_dict()["state"], fresh_opt[name].state_dict()["state"]
        assert saved.keys() == loaded.keys()
        for i in saved:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(torch.as_tensor(saved[i][key]), torch.as_tensor(loaded[i][key])), (
                    name,
                    key,
                )
        assert (
            fresh_sched[name].state_dict()["last_epoch"] == schedulers[name].state_dict()["last_epoch"] == 1
        )
        assert fresh_sched[name].get_last_lr() == schedulers[name].get_last_lr()
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG is back where it was when saving


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt"])
def test_truncated_state_file_is_named(backend, tmp_path, name):
    models = TwoLinears(0)
    optimizers, schedulers = train_one_step(models)
    save(tmp_path / "checkpoint-2", backend, models, optimizers, schedulers, 2)
    bad = tmp_path / "checkpoint-2" / name
    truncate(bad)
    assert check_file(bad) is not None
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "checkpoint-2", backend=backend, models=models, optimizers=optimizers,
                        schedulers=schedulers)  # fmt: skip
    message = str(err.value)
    assert message.startswith(str(bad)) and "\n" not in message


def test_corrupt_optimizer_state_is_named_when_loaded(backend, tmp_path):
    """Picking a checkpoint reads no tensor data (each TP rank would read every rank's optimizer states),
    so a byte flipped inside ``optimizer.pt`` passes :func:`check_file`; loading it checks the CRCs
    (``torch.load`` does not) and names the file rather than resuming with wrong moments."""
    models = TwoLinears(0)
    optimizers, schedulers = train_one_step(models)
    save(tmp_path / "checkpoint-2", backend, models, optimizers, schedulers, 2)
    bad = tmp_path / "checkpoint-2" / "optimizer.pt"
    data = bytearray(bad.read_bytes())
    moments = next(o for o in optimizers.values()).state_dict()["state"][0]["exp_avg"]
    at = data.find(moments.numpy().tobytes())
    assert at > 0
    data[at] ^= 0x01  # the lowest bit of one float32 moment
    bad.write_bytes(bytes(data))
    assert check_file(bad) is None and checkpoint_problem(tmp_path / "checkpoint-2") is None
    with pytest.raises(CheckpointError, match="fails its CRC check") as err:
        load_checkpoint(tmp_path / "checkpoint-2", backend=backend, models=models, optimizers=optimizers,
                        schedulers=schedulers)  # fmt: skip
    assert str(err.value).startswith(f"{bad}: corrupt")


def test_check_file_accepts_whole_files_and_flags_bad_json(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(8)}, str(tmp_path / "ok.safetensors"))
    torch.save({"a": torch.ones(8)}, tmp_path / "ok.pt")
    (tmp_path / "bad.json").write_text('{"step": ')
    assert check_file(tmp_path / "ok.safetensors") is None and check_file(tmp_path / "ok.pt") is None
    assert check_file(tmp_path / "bad.json").startswith("unreadable")


def test_newest_loadable_checkpoint_skips_damaged_ones(backend, tmp_path, caplog):
    models = TwoLinears(0)
    optimizers, schedulers = train_one_step(models)
    for step in (1, 2, 10):
        save(tmp_path / f"checkpoint-{step}", backend, models, optimizers, schedulers, step)
    assert newest_loadable_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # numeric, not lexical order
    truncate(tmp_path / "checkpoint-10" / "optimizer.pt")
    (tmp_path / "checkpoint-2" / "rank_0" / "rng.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="rlhf.ppo.checkpoint"):
        assert newest_loadable_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert "checkpoint-10" in caplog.text and "optimizer.pt" in caplog.text
    assert "rng.pt: missing" in caplog.text
    assert checkpoint_problem(tmp_path / "checkpoint-1") is None
    truncate(tmp_path / "checkpoint-1" / "trainable.safetensors", keep=0.9)
    assert newest_loadable_checkpoint(tmp_path) is None
    assert newest_loadable_checkpoint(tmp_path / "nowhere") is None


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    """A run resumed from checkpoint-2 (past a damaged checkpoint-4 of an earlier run) saves checkpoint-3:
    --save_total_limit 1 keeps checkpoint-3, not the higher-numbered checkpoint-4."""
    from rlhf.checkpoint_dirs import rotate_checkpoints as prune_checkpoints

    for n in (2, 4, 3):
        (tmp_path / f"checkpoint-{n}").mkdir()
    prune_checkpoints(tmp_path, 2, tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    prune_checkpoints(tmp_path, 1, tmp_path / "checkpoint-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    prune_checkpoints(tmp_path, None, tmp_path / "checkpoint-3")  # no limit: nothing goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_a_rollout_buffer_loads_on_the_device_of_a_multi_process_cpu_run(tmp_path):
    """Under torchrun on CPU each process's device is ``cpu:0``, which safetensors refused: a checkpoint
    taken mid-rollout was reported corrupt and could not be resumed."""
    from safetensors.torch import save_file

    path = tmp_path / "buffer.safetensors"
    save_file({"rewards": torch.arange(4.0)}, str(path))
    tensors = load_buffer_tensors(path, torch.device("cpu", 0))
    assert torch.equal(tensors["rewards"], torch.arange(4.0))
