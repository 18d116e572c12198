"""run_sft_with_peft.py end to end on a tiny model: the reference command, outputs, learning, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf.sft.stage import build_sft_loss
from run_sft_with_peft import main

# The step-1 command of the reference README, flag for flag (paths are filled in by the tests).
SEED_FLAGS = """
--model_type llama --model_name_or_path {model} --dataset_dir {data} --split_ratio 0.01
--data_cache_dir {cache} --block_size 512 --per_device_train_batch_size 2 --per_device_eval_batch_size 2
--dataloader_num_workers 16 --gradient_accumulation_steps 8 --do_train --do_eval --seed 512 --fp16
--num_train_epochs 1 --logging_steps 10 --eval_steps 100 --save_steps 500 --learning_rate 1e-4
--lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0 --logging_strategy steps --save_strategy steps
--evaluation_strategy steps --save_total_limit 1 --output_dir {out} --overwrite_output_dir --ddp_timeout 30000
--logging_first_step True --lora_rank 8 --lora_alpha 32
--lora_target q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj --lora_dropout 0.05
--modules_to_save None --torch_dtype float16 --report_to wandb
"""


def seed_argv(model: Path, data: Path, out: Path, cache: Path, **overrides: str) -> list[str]:
    argv = SEED_FLAGS.format(model=model, data=data, out=out, cache=cache).split()
    for flag, value in overrides.items():
        i = argv.index(f"--{flag}")
        argv[i + 1] = value
    return argv


def quick_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset_dir", str(data), "--output_dir", str(out),
        "--do_train", "--per_device_train_batch_size", "8", "--max_steps", "4", "--learning_rate", "1e-2",
        "--report_to", "none", "--save_strategy", "no", "--split_ratio", "0", "--logging_steps", "1",
        "--data_cache_dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def test_seed_command_under_torchrun_trains_a_loadable_lora_adapter(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "sft_lora"
    argv = seed_argv(tiny_llama, repo_root / "sft_data", out, tmp_path / "cache")
    cmd = torchrun(1)
    cmd += [str(repo_root / "run_sft_with_peft.py"), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("need a GPU") == 1 and "--fp16 and --torch_dtype float16" in proc.stderr
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json"):
        assert (out / name).is_file(), name
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [row["loss"] for row in state["log_history"] if "loss" in row]
    assert len(losses) >= 2 and all(loss > 0 for loss in losses)
    assert any("eval_loss" in row for row in state["log_history"])
    assert list((out / "wandb").glob("offline-run-*")), "wandb did not log offline into <output_dir>/wandb"

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # lora_B starts at zero
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {
        "q_proj",
        "v_proj",
        "k_proj",
        "o_proj",
        "gate_proj",
        "down_proj",
        "up_proj",
    }
    assert not config["modules_to_save"]


def test_full_fine_tuning_saves_a_plain_model_and_freezes_nothing(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "full"
    main(quick_argv(tiny_llama, repo_root / "sft_data", out, "--lora_rank", "-1", "--fp16", "--packing"))
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    before = load_file(tiny_llama / "model.safetensors")
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), set(before) - set(changed)


def test_lora_changes_only_adapter_weights_and_peft_path_continues(tiny_llama, repo_root, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    main(
        quick_argv(
            tiny_llama, repo_root / "sft_data", out, "--lora_rank", "4", "--lora_target", "q_proj,v_proj"
        )
    )
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), out
    ).merge_and_unload()
    before = load_file(tiny_llama / "model.safetensors")
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed

    first = load_file(out / "adapter_model.safetensors")
    out2 = tmp_path / "lora2"
    main(quick_argv(tiny_llama, repo_root / "sft_data", out2, "--peft_path", str(out)))
    second = load_file(out2 / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_checkpoints_and_resume(tiny_llama, repo_root, tmp_path, trainer_steps):
    out = tmp_path / "ckpt"
    argv = quick_argv(tiny_llama, repo_root / "sft_data", out, "--lora_rank", "4")
    argv[argv.index("--save_strategy") + 1] = "steps"
    main([*argv, "--save_steps", "2", "--save_total_limit", "1"])
    trainer_steps.clear()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]
    assert not list(out.glob(".*.tmp"))  # no staging folder left behind
    ckpt = out / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    argv[argv.index("--max_steps") + 1] = "6"
    main([*argv, "--save_steps", "2", "--resume_from_checkpoint", str(ckpt)])
    assert trainer_steps == [4, 5]  # steps 5 and 6 only: resumed, not restarted
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 2, 3, 4, 5, 6]
    # a resume from step 4 of a 6-step run ends with that run's model: weights, optimizer, schedule and
    # data order restored
    whole, again = tmp_path / "whole", tmp_path / "again"
    argv6 = quick_argv(tiny_llama, repo_root / "sft_data", whole, "--lora_rank", "4", "--max_steps", "6")
    argv6[argv6.index("--save_strategy") + 1] = "steps"
    main([*argv6, "--save_steps", "2"])
    shutil.copytree(whole / "checkpoint-4", again / "checkpoint-4")
    trainer_steps.clear()
    argv6[argv6.index("--output_dir") + 1] = str(again)
    main([*argv6, "--save_steps", "2", "--resume_from_checkpoint", str(again / "checkpoint-4")])
    assert trainer_steps == [4, 5]
    resumed, uninterrupted = (
        load_file(again / "adapter_model.safetensors"),
        load_file(whole / "adapter_model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_full_fine_tuning_learns_the_toy_task(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "learn"
    argv = quick_argv(tiny_llama, repo_root / "sft_data", out, "--lora_rank", "-1", "--packing")
    argv[argv.index("--max_steps") + 1] = "40"
    argv[argv.index("--learning_rate") + 1] = "3e-3"
    argv[argv.index("--per_device_train_batch_size") + 1] = "16"
    main([*argv, "--logging_steps", "5", "--logging_first_step", "True", "--warmup_steps", "0.1"])
    losses = [
        row["loss"]
        for row in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss" in row
    ]
    assert losses[-1] < losses[0] / 2, losses


def logged_losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in row]  # fmt: skip


@pytest.mark.parametrize("num_items", [None, 11])
def test_label_smoothed_fused_loss_equals_the_trainer_label_smoother(tiny_llama, num_items):
    from transformers.trainer_pt_utils import LabelSmoother

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    head = model.lm_head  # with a bias too, which Llama's head lacks
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    model.lm_head.weight.data.copy_(head.weight.data)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    divisor = None if num_items is None else torch.tensor(num_items)
    loss_fn = build_sft_loss(model, "torch", 0.3)
    fused = loss_fn(model(ids, **loss_fn.model_kwargs(ids.device)), labels, divisor)
    fused_grads = torch.autograd.grad(
        fused, [model.lm_head.weight, model.lm_head.bias, model.model.norm.weight]
    )
    plain = LabelSmoother(epsilon=0.3)(model(ids), labels, shift_labels=True, num_items_in_batch=divisor)
    plain_grads = torch.autograd.grad(
        plain, [model.lm_head.weight, model.lm_head.bias, model.model.norm.weight]
    )
    torch.testing.assert_close(fused, plain)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected)


def test_label_smoothing_applies_with_the_default_fused_loss(tiny_llama, repo_root, tmp_path):
    losses = {}
    for name, extra in [("plain", []), ("smoothed", ["--label_smoothing_factor", "0.5"]),
                        ("unfused", ["--label_smoothing_factor", "0.5", "--fused_loss", "off"])]:  # fmt: skip
        argv = quick_argv(tiny_llama, repo_root / "sft_data", tmp_path / name, "--lora_rank", "-1", *extra)
        argv[argv.index("--max_steps") + 1] = "2"
        main(argv)
        losses[name] = logged_losses(tmp_path / name)
    assert losses["smoothed"] != losses["plain"]
    assert losses["smoothed"] == pytest.approx(losses["unfused"], rel=1e-4)


def test_router_loss_counts_once_per_step_whatever_the_accumulation(tiny_model_factory, repo_root, tmp_path):
    """A mixtral with its router (load-balancing) loss on: at learning rate 0 (the same weights every step)
    the logged loss of 4 examples is the same as 4 x 1, 2 x 2 or 1 x 4 micro-batches, fused loss or the
    model's own (the Trainer took the router loss of each micro-batch as already divided)."""
    model = tmp_path / "mixtral"
    shutil.copytree(tiny_model_factory("mixtral"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(output_router_logits=True, router_aux_loss_coef=1.0)
    (model / "config.json").write_text(json.dumps(config))
    losses = {}
    for fused in ("torch", "off"):
        for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
            out = tmp_path / f"{fused}-{batch}x{accumulation}"
            argv = quick_argv(model, repo_root / "sft_data", out, "--lora_rank", "-1", "--fused_loss", fused,
                              "--gradient_accumulation_steps", str(accumulation))  # fmt: skip
            for flag, value in (
                ("--per_device_train_batch_size", batch),
                ("--max_steps", 1),
                ("--learning_rate", 0),
            ):
                argv[argv.index(flag) + 1] = str(value)
            main(argv)
            losses[fused, batch] = logged_losses(out)[0]
    for fused in ("torch", "off"):
        assert losses[fused, 2] == pytest.approx(losses[fused, 4], rel=1e-4), losses
        assert losses[fused, 1] == pytest.approx(losses[fused, 4], rel=1e-4), losses
    assert losses["off", 4] == pytest.approx(losses["torch", 4], rel=1e-4), losses


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Hi"}\n',
            'bad.jsonl:2: missing field "output"',
        ),
        ('{"instruction": "Hi", "output": "Hello"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
    ],
)
def test_malformed_data_is_one_line_and_trains_nothing(tiny_llama, tmp_path, capsys, content, expected):
    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.jsonl").write_text(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(quick_argv(tiny_llama, data, out))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1]
    assert not out.exists() or not any(out.iterdir())


def test_bad_flags_are_one_line_errors(tiny_llama, repo_root, tmp_path, capsys):
    for extra, expected in [
        (["--model_type", "mistral"], "--model_type mistral expects a mistral checkpoint"),
        (["--lora_target", "nope"], "--lora_target nope matches no linear layer"),
        (
            ["--modules_to_save", "lm_head,lm_heads"],
            "--modules_to_save lm_heads matches no module of this model",
        ),
        (["--no_such_flag", "1"], "unknown flags: --no_such_flag"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(quick_argv(tiny_llama, repo_root / "sft_data", tmp_path / "o", *extra))
        assert exc.value.code == 2
        assert expected in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_torchrun(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "ddp"
    argv = quick_argv(tiny_llama, repo_root / "sft_data", out, "--lora_rank", "4", "--ddp_backend", "gloo")
    cmd = torchrun(2)
    cmd += [str(repo_root / "run_sft_with_peft.py"), *argv, "--save_strategy", "steps", "--save_steps", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-4").is_dir()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # both ranks wrote into the staging folder before it was published; nothing is left behind
    assert all((out / "checkpoint-4" / f"rng_state_{rank}.pth").is_file() for rank in (0, 1))
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_deepspeed_zero3_full_fine_tuning_saves_a_plain_model(tiny_llama, repo_root, tmp_path):
    out = tmp_path / "zero3"
    argv = quick_argv(tiny_llama, repo_root / "sft_data", out, "--lora_rank", "-1")
    argv += ["--deepspeed", str(repo_root / "configs" / "ds_zero3.json")]
    cmd = torchrun(1)
    proc = subprocess.run([*cmd, str(repo_root / "run_sft_with_peft.py"), *argv], cwd=tmp_path, env=script_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = load_file(tiny_llama / "model.safetensors")
    after = AutoModelForCausalLM.from_pretrained(
        out
    ).state_dict()  # ZeRO-3 gathered the 16-bit weights on save
    assert all(after[k].shape == v.shape and not torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_an_output_dir_that_is_the_input_model_is_refused(
    stage, tiny_model_factory, tmp_path, capsys, repo_root
):
    """--output_dir equal to --model_name_or_path trained, and the final save removed the base model's
    config.json and weights (the LoRA adapter written there named that same dir as its base)."""
    import run_rm_with_peft
    import run_sft_with_peft

    model = Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "model"))
    before = sorted(p.name for p in model.iterdir())
    main = run_sft_with_peft.main if stage == "sft" else run_rm_with_peft.main
    data = repo_root / ("sft_data" if stage == "sft" else "rm_data")
    with pytest.raises(SystemExit) as exc:
        main(quick_argv(model, data, model))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert f"error: --output_dir {model} is --model_name_or_path: the run would write its model over" in err
    assert sorted(p.name for p in model.iterdir()) == before
