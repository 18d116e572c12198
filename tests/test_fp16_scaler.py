"""The fp16 loss scaler in AccelerateBackend, on CPU (torch.amp.GradScaler("cpu") runs the same logic as
on a GPU): backward scales the loss, step unscales before clipping, an inf/nan gradient skips the step and
its scheduler, and the scaler's state survives a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.backend.accelerate import AccelerateBackend


def make_backend(init_scale: float = 1024.0) -> AccelerateBackend:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    return AccelerateBackend("no", grad_scaler=scaler)


def make_model() -> tuple[torch.nn.Parameter, dict, dict]:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = torch.optim.SGD([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return w, {"actor": optimizer}, {"actor": scheduler}


def test_backward_scales_and_step_unscales_before_clipping():
    backend = make_backend()
    w, optimizers, schedulers = make_model()
    target = torch.tensor([0.0, 0.0, 10.0])
    backend.backward(((w - target) ** 2).sum())  # true gradient 2·(w - target) = [2, -4, -14]
    true_grad = torch.tensor([2.0, -4.0, -14.0])
    assert torch.equal(w.grad, 1024.0 * true_grad)
    norms = backend.step(optimizers, schedulers, {"actor": [w]}, max_norm=1.0)
    assert norms["actor"] == pytest.approx(float(true_grad.norm()))  # the unscaled norm is reported
    expected = torch.tensor([1.0, -2.0, 3.0]) - 0.1 * true_grad / true_grad.norm()  # clipped to norm 1
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    assert w.grad is None and schedulers["actor"].last_epoch == 1


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_inf_or_nan_gradients_skip_the_step_and_the_scheduler_and_halve_the_scale(bad):
    backend = make_backend()
    w, optimizers, schedulers = make_model()
    critic = torch.nn.Parameter(torch.tensor([0.5]))
    optimizers["critic"] = torch.optim.SGD([critic], lr=0.1)
    schedulers["critic"] = torch.optim.lr_scheduler.LambdaLR(optimizers["critic"], lambda step: 1.0)
    backend.backward((w * torch.tensor([1.0, bad, 1.0])).sum() + critic.sum())
    norms = backend.step(optimizers, schedulers, {"actor": [w], "critic": [critic]}, max_norm=1.0)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 3.0])) and schedulers["actor"].last_epoch == 0
    assert not math.isfinite(norms["actor"])
    assert critic.item() == pytest.approx(0.5 - 0.1) and schedulers["critic"].last_epoch == 1  # finite: steps
    assert backend.scaler.get_scale() == 512.0 and w.grad is None
    backend.backward(w.sum())  # the next clean step goes through at the lower scale
    backend.step(optimizers, schedulers, {"actor": [w], "critic": [critic]}, max_norm=0.0)
    assert torch.allclose(w.detach(), torch.tensor([0.9, -2.1, 2.9])) and schedulers["actor"].last_epoch == 1


def test_scaler_state_survives_a_checkpoint(tmp_path):
    backend = make_backend(init_scale=8.0)
    w, optimizers, schedulers = make_model()
    for _ in range(2):  # growth_interval 2: two clean steps double the scale
        backend.backward(w.sum())
        backend.step(optimizers, schedulers, {"actor": [w]}, max_norm=0.0)
    assert backend.scaler.get_scale() == 16.0
    optimizer_state = {"optimizers": {"actor": optimizers["actor"].state_dict()}}
    backend.save_trainable(tmp_path, {"w": w.detach()}, optimizer_state)
    resumed = make_backend(init_scale=1024.0)
    tensors, state = resumed.load_trainable(tmp_path)
    assert resumed.scaler.state_dict() == backend.scaler.state_dict() and resumed.scaler.get_scale() == 16.0
    assert state.keys() == {"optimizers"} and torch.equal(tensors["w"], w.detach())
    plain = AccelerateBackend("no")  # without fp16 the scaler is off, and a checkpoint of it loads into fp16
    assert not plain.scaler.is_enabled() and plain.state_dict() == {"grad_scaler": {}}
    resumed.load_state_dict(plain.state_dict())
    assert resumed.scaler.get_scale() == 16.0


def test_prepare_keeps_trainable_float16_weights_in_float32_under_fp16():
    """A full-fine-tuning actor copied from a float16 base would hand the scaler float16 gradients, which
    it refuses ("Attempting to unscale FP16 gradients"): prepare upcasts what trains, not the frozen base."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)).half()
    model[0].requires_grad_(False)  # the frozen base
    make_backend().prepare(model)
    assert model[0].weight.dtype == torch.float16
    assert model[1].weight.dtype == model[1].bias.dtype == torch.float32
    plain = torch.nn.Linear(4, 1).half()
    AccelerateBackend("no").prepare(plain)  # no fp16 loss scaling: weights stay as loaded
    assert plain.weight.dtype == torch.float16
