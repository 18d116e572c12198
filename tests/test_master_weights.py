"""AdamW on half-precision parameters (rlhf/optimizer.py MasterWeightAdamW): the steps land on float32
master copies, so a bfloat16 model trained at lr 1e-5 moves as a float32 one does; stepping the bfloat16
tensors themselves (plain AdamW) rounded most updates away."""

from __future__ import annotations

import copy

import torch

from rlhf.optimizer import MasterWeightAdamW, build_adamw

LR = 1e-5


def weights_and_grads(steps: int, shape=(64, 64)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    init = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    return init, [torch.randn(shape, generator=gen).bfloat16() for _ in range(steps)]


def train(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        param.grad = grad.to(param.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_bfloat16_parameters_step_as_float32_ones():
    init, grads = weights_and_grads(10)
    reference = torch.nn.Parameter(init.float())
    train(reference, torch.optim.AdamW([reference], lr=LR), grads)  # float32 AdamW from the same start
    half = torch.nn.Parameter(init.clone())
    optimizer = MasterWeightAdamW([half], lr=LR)
    train(half, optimizer, grads)
    master = optimizer.state[half]["master"]
    assert half.dtype == torch.bfloat16 and master.dtype == torch.float32
    assert torch.equal(master, reference.detach())  # the same float32 arithmetic, bit for bit
    assert torch.equal(half.detach(), master.bfloat16())  # the model holds the master, rounded
    assert optimizer.state[half]["exp_avg"].dtype == torch.float32

    plain = torch.nn.Parameter(init.clone())
    train(plain, torch.optim.AdamW([plain], lr=LR), grads)
    moved = (master != init.float()).float().mean().item()
    moved_plain = (plain.detach() != init).float().mean().item()
    assert moved > 0.99 and moved_plain < 0.5, (moved, moved_plain)  # why the masters exist


def test_float32_parameters_step_exactly_as_adamw():
    init, grads = weights_and_grads(4)
    ours, theirs = torch.nn.Parameter(init.float()), torch.nn.Parameter(init.float())
    optimizer = MasterWeightAdamW([ours], lr=1e-3, weight_decay=0.1)
    train(ours, optimizer, grads)
    train(theirs, torch.optim.AdamW([theirs], lr=1e-3, weight_decay=0.1), grads)
    assert torch.equal(ours.detach(), theirs.detach())
    assert "master" not in optimizer.state[ours]


def test_state_dict_resumes_bit_identically_with_mixed_dtypes():
    init, grads = weights_and_grads(8)
    full = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.float() * 2)]
    optimizer = MasterWeightAdamW(full, lr=1e-3)

    def step(params, opt, grad):
        for param in params:
            param.grad = grad.to(param.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for grad in grads[:4]:
        step(full, optimizer, grad)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in full]
    resumed_optimizer = MasterWeightAdamW(resumed, lr=1e-3)
    resumed_optimizer.load_state_dict(saved)
    assert resumed_optimizer.state[resumed[0]]["master"].dtype == torch.float32  # not cast to bfloat16
    assert resumed_optimizer.state[resumed[0]]["exp_avg_sq"].dtype == torch.float32
    for grad in grads[4:]:
        step(full, optimizer, grad)
        step(resumed, resumed_optimizer, grad)
    for a, b in zip(full, resumed):
        assert a.dtype == b.dtype and torch.equal(a.detach(), b.detach())
    assert torch.equal(optimizer.state[full[0]]["master"], resumed_optimizer.state[resumed[0]]["master"])


def test_a_resume_in_float32_drops_the_masters():
    """bfloat16 -> float32 -> bfloat16 resumes: the float32 run steps the parameter itself, so the master
    saved by the first run must not survive it (the third run would restart from its stale values)."""
    init, grads = weights_and_grads(6)
    half = torch.nn.Parameter(init.clone())
    optimizer = MasterWeightAdamW([half], lr=1e-3)
    train(half, optimizer, grads[:2])
    full = torch.nn.Parameter(half.detach().float())
    full_optimizer = MasterWeightAdamW([full], lr=1e-3)
    full_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert "master" not in full_optimizer.state[full]
    train(full, full_optimizer, grads[2:4])
    again = torch.nn.Parameter(full.detach().bfloat16())
    again_optimizer = MasterWeightAdamW([again], lr=1e-3)
    again_optimizer.load_state_dict(copy.deepcopy(full_optimizer.state_dict()))
    train(again, again_optimizer, grads[4:5])
    # the step went from the weights the float32 run left (as loaded, in bfloat16), as float32 AdamW does
    reference = torch.nn.Parameter(full.detach().bfloat16().float())
    reference_optimizer = torch.optim.AdamW([reference], lr=1e-3)
    reference_optimizer.load_state_dict(copy.deepcopy(full_optimizer.state_dict()))
    train(reference, reference_optimizer, grads[4:5])
    assert torch.equal(again_optimizer.state[again]["master"], reference.detach())


def test_build_adamw_says_it_keeps_masters(caplog):
    half = torch.nn.Parameter(torch.zeros(10, 10, dtype=torch.bfloat16))
    with caplog.at_level("INFO", logger="rlhf.optimizer"):
        optimizer, _ = build_adamw(
            [half], lr=LR, weight_decay=0.0, scheduler="constant", warmup=0, total_steps=3
        )
    assert isinstance(optimizer, MasterWeightAdamW)
    assert "float32 master copies of 1 half-precision parameter tensor(s)" in caplog.text
    assert "bfloat16" in caplog.text
