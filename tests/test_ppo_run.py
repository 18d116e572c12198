"""run_ppo_with_peft.py end to end: the reference command, learning, bit-exact resume, re-runs, metrics rows, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import GLOO_THREADS_AFTER, freed_process_groups, script_env, torchrun
from safetensors.torch import load_file
from test_ppo_models import build_rm_adapter
from transformers import AutoModelForCausalLM

import run_ppo_with_peft
from rlhf.data import load_dataset_dir, tokenize_prompt
from rlhf.errors import ConfigError
from rlhf.models import load_tokenizer
from rlhf.ppo.rewards import reward_values

REPO = Path(__file__).resolve().parents[1]
TARGETS = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
METRIC_KEYS = [
    "step", "reward/score", "reward/score_std", "objective/kl", "objective/rlhf_reward", "loss/policy",
    "loss/value", "loss/pretrain", "policy/clipfrac", "policy/approxkl", "policy/entropy", "value/clipfrac",
    "value/explained_variance", "response/length_mean", "response/eos_frac", "lr/actor", "lr/critic",
    "time/rollout_s", "time/train_s", "samples_per_s",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and other tests share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rm_adapter(tiny_llama, tmp_path_factory) -> Path:
    return build_rm_adapter(tiny_llama, tmp_path_factory.mktemp("ppo-rm") / "rm")


def reference_command(sft: Path, rm: Path, out: Path) -> list[str]:
    """Step 3 of the peft-rlhf README, verbatim but for the paths."""
    return [
        "--model_type", "llama", "--sft_model_path", str(sft), "--reward_lora_path", str(rm),
        "--dataset_dir", str(REPO / "sft_data"), "--pretrain_dataset_dir", str(REPO / "pt_data"),
        "--per_device_train_batch_size", "2", "--per_device_mini_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--do_train", "--num_train_epochs", "1", "--seed", "512",
        "--lr_scheduler_type", "cosine", "--actor_lr", "1e-4", "--critic_lr", "1e-4", "--logging_steps", "10",
        "--save_steps", "10", "--dataloader_num_workers", "16", "--output_dir", str(out / "actor"),
        "--critic_output_dir", str(out / "critic"), "--actor_lora_rank", "8", "--actor_lora_alpha", "32",
        "--actor_lora_target", TARGETS, "--actor_lora_dropout", "0.05", "--critic_lora_rank", "8",
        "--critic_lora_alpha", "32", "--critic_lora_target", TARGETS, "--critic_lora_dropout", "0.05",
        "--max_prompt_length", "256", "--max_response_length", "256", "--ppo_epochs", "1", "--gamma", "1",
        "--lam", "0.95", "--kl_penalty_beta", "0.02", "--reward_score_clip", "10", "--value_clip", "0.2",
        "--ratio_clip", "0.2", "--actor_loss_weight", "1", "--critic_loss_weight", "2",
        "--pretrain_loss_weight", "0.1", "--pretrain_warmup_steps", "500", "--report_to", "wandb",
        "--torch_dtype", "float16", "--fp16",
    ]  # fmt: skip


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_reference_command_under_accelerate_launch(tiny_llama, rm_adapter, tmp_path):
    argv = reference_command(tiny_llama, rm_adapter, tmp_path)
    argv += ["--max_steps", "2", "--logging_steps", "1", "--save_steps", "2", "--max_response_length", "48"]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "default_config.yaml"]
    proc = subprocess.run(
        cmd + ["run_ppo_with_peft.py", *argv], cwd=REPO, env=script_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    actor, critic = tmp_path / "actor", tmp_path / "critic"
    assert (actor / "adapter_model.safetensors").is_file() and (actor / "tokenizer.json").is_file()
    assert (critic / "adapter_model.safetensors").is_file() and (critic / "value_head.safetensors").is_file()
    assert (actor / "checkpoint-2" / "optimizer.pt").is_file()
    assert (critic / "tokenizer.json").is_file()
    assert not list(actor.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # staging dirs all published
    lines = read_metrics(actor / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2]
    assert all(key in lines[0] for key in METRIC_KEYS)
    assert "optimizer steps" in proc.stderr and "--fp16 and --torch_dtype float16 need a GPU" in proc.stderr
    assert list((actor / "wandb").glob("offline-run-*")), "wandb logs offline into the output dir"
    # the actor moved away from the SFT model, the frozen base did not change
    weights = load_file(actor / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def sft_tiny_model(base: Path, out: Path, steps: int = 150) -> Path:
    """A short full-parameter SFT pass (plain torch loop) so the random tiny model writes sentences."""
    tokenizer = load_tokenizer(str(base))
    examples = []
    for row in load_dataset_dir(str(REPO / "sft_data"), "sft"):
        prompt = tokenize_prompt(row, tokenizer)
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        examples.append((prompt + response, [-100] * len(prompt) + response))
    return full_fine_tune(base, examples, out, steps)


def full_fine_tune(base: Path, examples: list[tuple[list[int], list[int]]], out: Path, steps: int) -> Path:
    """``steps`` AdamW steps (lr 3e-3) of the whole model ``base`` on batches of 32 random ``examples``
    ((input ids, labels with -100 on the prompt)); saves the model and ``base``'s tokenizer to ``out``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows = [examples[i] for i in torch.randint(len(examples), (32,)).tolist()]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    load_tokenizer(str(base)).save_pretrained(out)
    return out


@pytest.mark.slow
def test_policy_learns_rule_reward(tiny_llama, tmp_path):
    """With the rollout engine (``--generation_engine auto`` on CPU) and top-50 sampling: the tiny SFT model
    puts most of its probability on a long tail of its 512 tokens, and sampling from all of it (``--top_k
    0``) makes the reward curve depend on the seed (3 of 5 seeds ended below this bar). Against a control run
    of the same seed with ``--actor_lr 0``: its score drifts by sampling noise alone (first three logs -0.06,
    last three 0.69 on this seed), which cleared a bar on the rise alone."""
    sft = sft_tiny_model(tiny_llama, tmp_path / "sft")

    def late_score(actor_lr: str) -> tuple[float, float, list[float]]:
        out = tmp_path / f"ppo-lr{actor_lr}"
        run_ppo_with_peft.main([
            "--sft_model_path", str(sft), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out),
            "--per_device_train_batch_size", "16", "--per_device_mini_train_batch_size", "8", "--ppo_epochs", "2",
            "--max_response_length", "16", "--max_steps", "48", "--logging_steps", "4", "--save_steps", "1000",
            "--actor_lr", actor_lr, "--critic_lr", "1e-3", "--kl_penalty_beta", "0.02", "--seed", "1",
            "--top_k", "50", "--disable_tqdm", "true",
        ])  # fmt: skip
        scores = [m["reward/score"] for m in read_metrics(out / "metrics.jsonl")]
        return sum(scores[:3]) / 3, sum(scores[-6:]) / 6, scores

    first, last, scores = late_score("1e-3")
    _, control, control_scores = late_score("0")
    # positivity_reward is in [-2, 2]; the SFT model answers half positively, half negatively
    assert last > 1.0 and last > first + 0.7, scores
    assert last > control + 0.5, (scores, control_scores)


def resume_argv(sft: Path, rm: Path, out: Path) -> list[str]:
    return [
        "--sft_model_path", str(sft), "--reward_lora_path", str(rm), "--dataset_dir", str(REPO / "sft_data"),
        "--pretrain_dataset_dir", str(REPO / "pt_data"), "--block_size", "32", "--pretrain_warmup_steps", "2",
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--per_device_mini_train_batch_size", "2",
        "--ppo_epochs", "3", "--gradient_accumulation_steps", "4", "--max_response_length", "12",
        "--max_steps", "4", "--save_steps", "2", "--logging_steps", "3", "--lr_scheduler_type", "cosine",
        "--actor_lora_target", "q_proj,v_proj", "--critic_lora_target", "q_proj,v_proj", "--seed", "3",
        "--target_kl", "0.01", "--disable_tqdm", "true", "--generation_engine", "static",
    ]  # fmt: skip


def count_rollouts(monkeypatch) -> list[int]:
    """The step each rollout of the PPO loop starts at, in order (a resume's first is its checkpoint's)."""
    from rlhf.ppo import loop

    started, original = [], loop.collect_rollout

    def counted(s, state, metrics):
        started.append(state.step)
        return original(s, state, metrics)

    monkeypatch.setattr(loop, "collect_rollout", counted)
    return started


@pytest.mark.slow
def test_resume_is_bit_identical(tiny_llama, rm_adapter, tmp_path, monkeypatch):
    """A checkpoint taken inside a rollout (6 mini-batches per rollout, 4 per step), with dropout,
    pretraining batches, an adaptive KL coefficient and metrics pending between logs; the rollouts come
    from the static engine (eager on CPU), sampling from the checkpointed RNG state."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    rollouts = count_rollouts(monkeypatch)
    run_ppo_with_peft.main(resume_argv(tiny_llama, rm_adapter, full))
    assert rollouts == [0, 1, 3]  # 16 mini-batches in 4 steps, 6 per rollout
    assert (full / "checkpoint-2" / "rank_0" / "buffer.safetensors").is_file()  # mid-rollout
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")  # holds step 3 too: must be dropped
    rollouts.clear()
    run_ppo_with_peft.main(
        resume_argv(tiny_llama, rm_adapter, resumed)
        + ["--resume_from_checkpoint", str(resumed / "checkpoint-2")]
    )
    assert rollouts == [3]  # the second rollout's rest from the checkpoint's buffer, then the third
    for name in (
        "adapter_model.safetensors",
        "critic/adapter_model.safetensors",
        "critic/value_head.safetensors",
    ):
        a, b = load_file(full / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [3, 4]  # every 3 steps, and the last
    for row_a, row_b in zip(a, b):
        for key in METRIC_KEYS:
            if not key.startswith(("time/", "samples_per_s")):
                assert row_a[key] == row_b[key], key


@pytest.mark.slow
def test_two_processes_with_torchrun(tiny_llama, rm_adapter, tmp_path):
    out = tmp_path / "ddp"
    argv = resume_argv(tiny_llama, rm_adapter, out)
    argv[argv.index("--max_steps") + 1] = "2"
    argv[argv.index("--logging_steps") + 1] = "1"
    cmd = [*torchrun(2), str(GLOO_THREADS_AFTER), "run_ppo_with_peft.py", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert freed_process_groups(proc.stderr, 2), proc.stderr[-3000:]
    assert "x 2 processes" in proc.stderr
    checkpoint = out / "checkpoint-2"
    states = [json.loads((checkpoint / f"rank_{r}" / "state.json").read_text()) for r in (0, 1)]
    assert states[0]["weights_checksum"] == states[1]["weights_checksum"]  # replicas stayed identical
    rngs = [torch.load(checkpoint / f"rank_{r}" / "rng.pt", weights_only=True)["cpu"] for r in (0, 1)]
    assert not torch.equal(rngs[0], rngs[1])  # but sampled different responses
    lines = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[-1]["rollouts"] >= 1 and (out / "critic" / "value_head.safetensors").is_file()


def test_bad_reward_fn_and_non_finite_reward_exit_with_one_line(tiny_llama, tmp_path, capsys):
    base = ["--sft_model_path", str(tiny_llama), "--dataset_dir", str(REPO / "sft_data"),
            "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--max_response_length", "4",
            "--disable_tqdm", "true"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(base + ["--reward_fn", "rlhf.toy_task:no_such_function"])
    assert exc.value.code == 2 and "no function 'no_such_function'" in capsys.readouterr().err
    nan_fn = tmp_path / "nan_reward.py"
    nan_fn.write_text("def score(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(base + ["--reward_fn", f"{nan_fn}:score"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "non-finite" in err and "at step 1" in err
    none_fn = tmp_path / "none_reward.py"
    none_fn.write_text("def score(prompts, responses):\n    return None\n")
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(base + ["--reward_fn", f"{none_fn}:score"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"error: --reward_fn {none_fn}:score returned None" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("engine", ["DEEPSPEED", "FSDP"])
def test_a_sharding_accelerate_config_is_refused_not_ignored(
    engine, tiny_llama, tmp_path, monkeypatch, capsys, fresh_accelerate_state
):
    """`accelerate launch` with a DeepSpeed/FSDP config sets ACCELERATE_USE_* and a marker of its own; on CPU
    Accelerate then falls back to plain processes without a word. ACCELERATE_USE_* alone is what an
    Accelerator built earlier in this process (an SFT stage with --deepspeed) leaves behind: not a launch."""
    from accelerate.state import AcceleratorState

    def argv(out: Path) -> list[str]:
        return ["--sft_model_path", str(tiny_llama), "--dataset_dir", str(REPO / "sft_data"), "--reward_fn",
                "rlhf.toy_task:positivity_reward", "--output_dir", str(out), "--max_steps", "1",
                "--max_response_length", "4", "--disable_tqdm", "true"]  # fmt: skip

    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    assert run_ppo_with_peft.main(argv(tmp_path / "o"))["step"] == 1
    monkeypatch.setenv({"DEEPSPEED": "ACCELERATE_CONFIG_DS_FIELDS", "FSDP": "FSDP_VERSION"}[engine], "1")
    AcceleratorState._reset_state()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv(tmp_path / "p"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"error: the Accelerate config sets distributed_type: {engine}" in err
    assert "use distributed_type: MULTI_GPU" in err and not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("returned", "named"),
    [(None, "None (NoneType)"), (0.5, "0.5 (float)"), ("good", "'good' (str)"), (["good", "bad"], "'good' (str) at index 0"),
     ([1.0], "1 scores for 2 responses"), ({"a": 1.0, "b": 2.0}, "(dict)"), (torch.zeros(2, 1), "shape [2, 1]"),
     ([1.0, None], "None (NoneType) at index 1")],
)  # fmt: skip
def test_reward_fn_returning_the_wrong_thing_is_named(returned, named):
    with pytest.raises(ConfigError) as exc:
        reward_values(returned, 2, "f.py:score")
    message = str(exc.value)
    assert message.startswith("--reward_fn f.py:score returned ") and named in message, message
    assert "\n" not in message and message.endswith("expected a list of 2 floats, one per response")


def test_reward_fn_sequences_of_numbers_are_accepted():
    import numpy as np

    for returned in (
        [1, 2.5],
        (1, 2.5),
        np.array([1.0, 2.5]),
        torch.tensor([1.0, 2.5]),
        [np.float32(1), 2.5],
    ):
        assert reward_values(returned, 2, "f.py:score") == [1.0, 2.5]


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive number, got 0"),
     (["--per_device_mini_train_batch_size", "0"], "--per_device_mini_train_batch_size must be a positive number"),
     (["--rollout_batches", "0"], "--rollout_batches must be a positive number, got 0"),
     (["--ppo_epochs", "0"], "--ppo_epochs must be a positive number, got 0"),
     (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive number, got 0"),
     (["--output_dir", "FILE"], "--output_dir FILE is a file, not a directory"),
     (["--critic_output_dir", "FILE"], "--critic_output_dir FILE is a file, not a directory"),
     (["--critic_output_dir", "OUT"], "--critic_output_dir OUT is --output_dir: the critic's adapter would"),
     (["--resume_from_checkpoint", "FILE"], "--resume_from_checkpoint FILE: no such checkpoint directory"),
     (["--resume_from_checkpoint", "true"], "--resume_from_checkpoint true: no loadable checkpoint-N in"),
     (["--profile_step", "-1"], "--profile_step must be >= 0 (0: no profile), got -1")],
)  # fmt: skip
def test_bad_sizes_and_output_dirs_fail_up_front(flags, message, tmp_path, capsys):
    """One line, exit code 2, before any model loads (the --sft_model_path does not even exist)."""
    file = tmp_path / "a_file"
    file.write_text("not a directory")
    names = {"FILE": str(file), "OUT": str(tmp_path / "out")}
    flags = [names.get(f, f) for f in flags]
    for name, path in names.items():
        message = message.replace(name, path)
    argv = ["--sft_model_path", str(tmp_path / "missing"), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(tmp_path / "out"), *flags]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: " + message in err, err
    assert err.count("error: ") == 1 and "Traceback" not in err and "missing" not in err


@pytest.mark.parametrize("flag", ["--sft_model_path", "--dataset_dir", "--reward_model_path"])
def test_an_output_dir_that_is_an_input_fails_up_front(flag, tmp_path, capsys):
    """--output_dir equal to --sft_model_path ran, and its final save deleted the SFT model's files (the
    adapter written there then named its own dir as its base)."""
    inputs = {
        name: tmp_path / name.strip("-")
        for name in ("--sft_model_path", "--dataset_dir", "--reward_model_path")
    }
    for path in inputs.values():
        path.mkdir()
        (path / "keep.json").write_text("{}")
    argv = [arg for name, path in inputs.items() for arg in (name, str(path))]
    argv += ["--output_dir", str(inputs[flag])]
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2 and f"error: --output_dir {inputs[flag]} is {flag}: the run would write" in err
    ), err
    assert sorted(p.name for p in inputs[flag].iterdir()) == ["keep.json"]


ROLLOUT_KEYS = [
    "reward/score", "reward/score_std", "objective/kl", "objective/rlhf_reward", "objective/kl_coef",
    "value/explained_variance", "response/length_mean", "response/eos_frac", "time/generate_per_rollout_s",
]  # fmt: skip


def test_every_metrics_row_has_the_rollout_keys_of_the_rollout_it_trained_on(tiny_llama, tmp_path):
    """Two optimizer steps per rollout, a row per step: the second row of each rollout collected none,
    yet has the same keys, and both rows of one rollout report its statistics exactly."""
    out = tmp_path / "rows"
    run_ppo_with_peft.main([
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--per_device_mini_train_batch_size", "2", "--max_response_length", "6", "--max_steps", "4",
        "--logging_steps", "1", "--save_steps", "100", "--target_kl", "0.01", "--disable_tqdm", "true",
    ])  # fmt: skip
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["rollouts"] for r in rows] == [1, 1, 2, 2]
    assert all(r.keys() == rows[0].keys() for r in rows) and set(ROLLOUT_KEYS) <= rows[0].keys()
    for first, second in (rows[0:2], rows[2:4]):
        assert {k: first[k] for k in ROLLOUT_KEYS} == {k: second[k] for k in ROLLOUT_KEYS}
    assert rows[0]["objective/kl_coef"] != rows[2]["objective/kl_coef"]  # adaptive β: a new rollout
    # each row reports the β its rollout's rewards used: the first rollout's is the initial one
    assert rows[0]["objective/kl_coef"] == pytest.approx(0.02)
    for r in rows:
        shaped = r["reward/score"] - r["objective/kl_coef"] * r["objective/kl"]
        assert r["objective/rlhf_reward"] == pytest.approx(shaped, abs=1e-5)
    assert all(r["time/rollout_s"] > 0 for r in rows)  # each step carries its share of the rollout time
    assert rows[0]["time/rollout_s"] == rows[1]["time/rollout_s"]


def test_rerun_resumes_in_the_output_dir_or_starts_afresh_with_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "rerun"
    argv = [
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--per_device_mini_train_batch_size", "2", "--max_response_length", "6", "--logging_steps", "1",
        "--save_steps", "2", "--disable_tqdm", "true",
    ]  # fmt: skip
    first = run_ppo_with_peft.main([*argv, "--max_steps", "2"])
    assert first["step"] == 2 and (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    again = run_ppo_with_peft.main([*argv, "--max_steps", "4"])  # the same command, longer
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoint-2'} (pass --overwrite_output_dir to start afresh)" in err
    assert again["step"] == 4 and again["rollouts"] == 2  # one rollout before the checkpoint, one after
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    done = run_ppo_with_peft.main([*argv, "--max_steps", "4"])  # finished: says so, trains nothing
    assert done["step"] == 4 and "already reached step 4 of 4: nothing to train" in capsys.readouterr().err
    # resuming with another adapter shape or scaling: one line naming what differs, nothing trained
    for changed, message in (
        (["--actor_lora_rank", "4"], "has shape [8, 64], this run's [4, 64]"),
        (["--actor_lora_alpha", "8"], "--actor_lora_alpha 32.0 there, 8.0 now"),
    ):
        with pytest.raises(SystemExit) as exc:
            run_ppo_with_peft.main([*argv, "--max_steps", "6", *changed])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err and message in err, err
    fresh = run_ppo_with_peft.main([*argv, "--max_steps", "2", "--overwrite_output_dir"])
    err = capsys.readouterr().err
    assert "--overwrite_output_dir: starting afresh" in err and "removed 2 old checkpoint(s)" in err
    assert fresh["step"] == 2 and fresh["rollouts"] == 1 and "resuming" not in err
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_resuming_with_other_batch_sizes_is_refused_with_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    """The checkpoint's position in the prompts and its rollout split mean something else under other batch
    sizes: re-running with them names the flag instead of resuming silently, before any model loads;
    --max_steps may change."""
    out = tmp_path / "run"
    argv = [
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--per_device_mini_train_batch_size", "2", "--max_response_length", "4", "--save_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    run_ppo_with_peft.main([*argv, "--max_steps", "1"])
    monkeypatch.setattr(
        run_ppo_with_peft, "build_peft_session", lambda *a: pytest.fail("models loaded first")
    )
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main([*argv, "--max_steps", "2", "--per_device_mini_train_batch_size", "4"])
    err = capsys.readouterr().err
    assert (
        exc.value.code == 2
        and (
            f"{out / 'checkpoint-1'} was written by a run with other settings "
            "(--per_device_mini_train_batch_size 2 there, 4 now; "
        )
        in err
    )
    # the saved rollout's rewards hold the KL, and it kept no reference log-probs for a KL loss
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main([*argv, "--max_steps", "2", "--use_kl_loss"])
    assert exc.value.code == 2 and "(--use_kl_loss False there, True now)" in capsys.readouterr().err
    monkeypatch.undo()
    assert run_ppo_with_peft.main([*argv, "--max_steps", "2"])["step"] == 2  # a longer run: resumed


def test_resuming_after_the_prompts_changed_is_refused(tiny_llama, tmp_path, capsys):
    """Same number of prompts, other text: the checkpoint's place in the prompt order means other prompts
    now, so the files' signature (names, sizes, times) is part of the resume settings."""
    data, out = tmp_path / "prompts", tmp_path / "run"
    data.mkdir()
    rows = [{"instruction": f"Say something about {n}.", "output": "ok"} for n in range(8)]
    (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--max_response_length", "4", "--save_steps", "1", "--disable_tqdm", "true",
    ]  # fmt: skip
    run_ppo_with_peft.main([*argv, "--max_steps", "1"])
    rows[3]["instruction"] = "Something else entirely, and longer."
    (data / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main([*argv, "--max_steps", "2"])
    assert exc.value.code == 2 and "(the files of --dataset_dir changed)" in capsys.readouterr().err


def test_profile_step_writes_a_trace_and_a_summary_of_that_step(tiny_llama, tmp_path):
    from rlhf.ppo.profiling import kind_of

    assert [kind_of(n) for n in ("aten::addmm", "sm90_xmma_gemm_bf16", "fmha_cutlassF", "aten::mul")] == [
        "matmul", "matmul", "attention", "other",
    ]  # fmt: skip
    out = tmp_path / "profiled"
    run_ppo_with_peft.main([
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--per_device_mini_train_batch_size", "2", "--max_response_length", "6", "--max_steps", "3",
        "--save_steps", "100", "--disable_tqdm", "true", "--profile_step", "3",
    ])  # fmt: skip
    assert sorted(p.name for p in (out / "profile").iterdir()) == ["step_3.json", "step_3.txt"]
    summary = (out / "profile" / "step_3.txt").read_text()
    shares = {line.split()[0]: float(line.split()[1]) for line in summary.splitlines()[1:4]}
    assert shares.keys() == {"matmul", "attention", "other"} and shares["matmul"] > 0
    assert "Self CPU" in summary  # the operator table
    trace = (out / "profile" / "step_3.json").read_text()
    assert "ppo/rollout" in trace and "ppo/mini_batch" in trace  # step 3 collects its rollout


def test_adapters_trained_on_an_sft_adapter_dir_load_with_plain_peft(tiny_llama, tmp_path):
    """--sft_model_path an adapter dir: the base the actor and critic adapters apply to (the SFT adapter
    merged into its base) is written to <output_dir>/base_model and named in their configs, so the outputs
    and checkpoints load with plain peft as the model that was trained."""
    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    sft = tmp_path / "sft_adapter"
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(sft)
    load_tokenizer(str(tiny_llama)).save_pretrained(sft)
    out = tmp_path / "ppo"
    run_ppo_with_peft.main([
        "--sft_model_path", str(sft), "--reward_fn", "rlhf.toy_task:positivity_reward", "--dataset_dir",
        str(REPO / "sft_data"), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--max_response_length", "6", "--max_steps", "1", "--actor_lr", "1e-2", "--disable_tqdm", "true",
    ])  # fmt: skip
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), sft
    ).merge_and_unload()
    ids = torch.tensor([[1, 30, 31, 32, 33, 34]])
    with torch.no_grad():
        sft_logits = merged(ids).logits
        expected = PeftModel.from_pretrained(merged, out).eval()(ids).logits  # what PPO trained: SFT + actor
        for actor in (out, out / "checkpoint-1" / "actor"):
            assert json.loads((actor / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
                out / "base_model"
            )
            torch.testing.assert_close(AutoPeftModelForCausalLM.from_pretrained(actor)(ids).logits, expected)
        assert not torch.allclose(expected, sft_logits)  # the actor moved
    critic = json.loads((out / "critic" / "adapter_config.json").read_text())
    assert critic["base_model_name_or_path"] == str(out / "base_model")


def test_final_actor_replaces_an_earlier_actor_of_another_kind(tiny_llama, tmp_path):
    """A LoRA actor saved over a full-weight actor's output dir (--overwrite_output_dir) leaves no full
    weights behind that plain transformers would load instead, and the reverse; checkpoints stay."""
    out = tmp_path / "ppo"
    argv = [
        "--sft_model_path", str(tiny_llama), "--reward_fn", "rlhf.toy_task:positivity_reward", "--dataset_dir",
        str(REPO / "sft_data"), "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--max_response_length", "4", "--max_steps", "1", "--disable_tqdm", "true", "--overwrite_output_dir",
    ]  # fmt: skip
    run_ppo_with_peft.main([*argv, "--actor_lora_rank", "-1"])
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    run_ppo_with_peft.main(argv)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "checkpoint-1"} <= names
    assert not {"model.safetensors", "config.json"} & names, names
    run_ppo_with_peft.main([*argv, "--actor_lora_rank", "-1"])
    assert not (out / "adapter_config.json").exists() and not list(tmp_path.glob(".*.tmp"))
