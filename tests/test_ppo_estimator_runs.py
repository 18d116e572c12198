"""--advantage_estimator end to end on both backends: gae reproduces the metrics recorded before the
estimators existed; critic-free runs build, run and save no critic; a group stays on one process and
whitening is over all processes (torchrun, gloo); resume is bit-exact with K > 1 (TP: by re-running the
command); each critic-free estimator learns a rule reward; flag errors are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from safetensors.torch import load_file
from test_ppo_run import one_thread, sft_tiny_model  # noqa: F401 (one_thread: autouse fixture)

import rlhf.ppo.batch as batch_module
import run_ppo_with_peft
from rlhf.models.lora import LoraSpec
from rlhf.ppo.config import PPOArguments
from rlhf.ppo.peft_models import PeftPolicyModels, build_peft_policy_models

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((Path(__file__).parent / "ppo_gae_reference.json").read_text())
VALUE_KEYS = {"loss/value", "value/clipfrac", "value/explained_variance", "lr/critic", "grad_norm/critic"}
# the keys of a gae row (tests/ppo_gae_reference.json) plus the timings. Every test runs on one thread
# (test_ppo_run's autouse one_thread): the reference rows were recorded so, and a matmul's sums depend on it.
TIMINGS = {"time/rollout_s", "time/train_s", "time/generate_per_rollout_s", "samples_per_s"}
GAE_KEYS = set(REFERENCE["peft"][0]) | TIMINGS
# The rows were recorded on torch 2.13 and come out the same on 2.11 and 2.14; torch 2.6 draws other
# mini-batch shuffles and dropout masks from the same seed (the first update's policy loss has the other sign).
SAME_RANDOM_STREAM = pytest.mark.skipif(
    torch.__version__ < "2.11",
    reason="the recorded rows' random stream is torch >= 2.11's",
)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def hf_generate() -> list[str]:
    """The PEFT reference rows were sampled by Hugging Face generate, whose default top-k of 50 applied then
    (``--top_k 0`` reached it as ``None``): pin both (the engine flag where it exists). On the recording
    code ``--top_k 50`` gives the recorded rows bit for bit."""
    engine = ["--generation_engine", "hf"] if "generation_engine" in PPOArguments.__dataclass_fields__ else []
    return ["--top_k", "50", *engine]


def assert_rows_match(rows: list[dict], reference: list[dict]) -> None:
    """Every recorded value (timings aside) within float rounding: other generation engines or log-prob
    chunking may move the last bits; a change in the math moves them by far more."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference):
        assert set(row) == set(ref) | TIMINGS
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (row["step"], key)


def peft_argv(model: Path, reward: str, out: Path, *extra: str) -> list[str]:
    return [
        "--sft_model_path", str(model), "--reward_fn", reward, "--dataset_dir", str(REPO / "sft_data"),
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--per_device_mini_train_batch_size", "2",
        "--ppo_epochs", "2", "--gradient_accumulation_steps", "2", "--max_response_length", "8",
        "--max_steps", "3", "--logging_steps", "1", "--save_steps", "100", "--seed", "7", "--target_kl", "0.05",
        "--actor_lr", "1e-2", "--critic_lr", "1e-2", "--disable_tqdm", "true",
        "--actor_lora_dropout", "0.05", "--critic_lora_dropout", "0.05",  # the defaults when it was recorded
        *extra,
    ]  # fmt: skip


def tp_argv(model: Path, reward: str, train_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--actor_ckpt_dir", str(model), "--reward_fn", reward, "--train_file", str(train_file),
        "--max_batch_size", "2", "--max_buffer_size", "4", "--max_gen_len", "6", "--max_steps", "3",
        "--lora_rank", "4", "--logging_steps", "1", "--save_steps", "100", "--actor_lr", "1e-2",
        "--critic_lr", "1e-2", "--seed", "5", "--ppo_epochs", "2", "--actor_save_dir", str(out / "a"), *extra,
    ]  # fmt: skip


@SAME_RANDOM_STREAM
def test_gae_reproduces_the_metrics_recorded_before_the_estimators_peft(
    tiny_llama, length_reward, tmp_path, monkeypatch
):
    """The same command as the one recorded in tests/ppo_gae_reference.json, default --advantage_estimator,
    at the rollout's full width as then (fitted mini-batches draw other LoRA dropout masks: another random
    stream from the second rollout on; tests/test_ppo_fitted_batches.py compares fitted and full runs)."""
    monkeypatch.setattr(batch_module, "WIDTH_MULTIPLE", 10**9)
    out = tmp_path / "gae"
    run_ppo_with_peft.main(peft_argv(tiny_llama, length_reward, out, *hf_generate()))
    assert_rows_match(read_metrics(out / "metrics.jsonl"), REFERENCE["peft"])
    assert (out / "critic" / "value_head.safetensors").is_file()


@SAME_RANDOM_STREAM
def test_gae_reproduces_the_metrics_recorded_before_the_estimators_tp(
    tiny_llama, length_reward, gsm8k_file, tmp_path, world_of_one
):
    from rlhf.tp import ppo_train

    critic = ["--critic_ckpt_dir", str(tiny_llama), "--critic_save_dir", str(tmp_path / "c")]
    ppo_train.main(tp_argv(tiny_llama, length_reward, gsm8k_file, tmp_path, *critic))
    assert_rows_match(read_metrics(tmp_path / "a_run" / "metrics.jsonl"), REFERENCE["tp"])
    assert (tmp_path / "c" / "params.json").is_file()


def test_critic_free_bundle_allocates_no_critic(tiny_llama):
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    with_critic = build_peft_policy_models(
        str(tiny_llama), actor=spec, critic=spec, reward_adapter=None, critic_init="sft"
    )
    free = build_peft_policy_models(
        str(tiny_llama), actor=spec, critic=None, reward_adapter=None, critic_init="sft"
    )
    assert with_critic.has_critic and not free.has_critic
    assert set(free.parameter_groups()) == {"actor"} and list(free.lm.peft_config) == ["actor"]
    assert free.value_head is None and free.critic_full is None
    assert not [n for n, _ in free.named_parameters() if "critic" in n or "value_head" in n]
    critic_size = sum(p.numel() for p in with_critic.parameter_groups()["critic"])
    total = {
        name: sum(p.numel() for p in m.parameters()) for name, m in (("with", with_critic), ("free", free))
    }
    assert critic_size > 0 and total["with"] - total["free"] == critic_size
    with pytest.raises(ValueError, match="no critic"):
        free.values(None)


def test_critic_free_run_runs_and_saves_no_critic(tiny_llama, length_reward, tmp_path, monkeypatch):
    """grpo, K = 2: the critic is never run (its forward raises here), nothing is written for it, the
    checkpoint holds the actor's weights and optimizer only, and the rows carry exactly the grpo keys."""

    def no_critic_forward(self, batch):
        raise AssertionError("a critic-free run ran a critic forward")

    monkeypatch.setattr(PeftPolicyModels, "critic_token_values", no_critic_forward)
    out = tmp_path / "grpo"
    argv = peft_argv(
        tiny_llama, length_reward, out, "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2"
    )
    argv[argv.index("--save_steps") + 1] = "1"
    argv += ["--critic_output_dir", str(tmp_path / "critic")]
    state = run_ppo_with_peft.main(argv)
    assert state["step"] == 3 and state["samples"] == 8  # one rollout of 4 prompts x 2 samples
    assert not (tmp_path / "critic").exists() and not (out / "critic").exists()
    checkpoint = out / "checkpoint-1"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "actor", "optimizer.pt", "rank_0", "tokenizer", "trainable.safetensors", "trainer_state.json",
    ]  # fmt: skip
    assert all(".actor." in key for key in load_file(checkpoint / "trainable.safetensors"))
    states = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert list(states["optimizers"]) == list(states["schedulers"]) == ["actor"]
    buffer = load_file(checkpoint / "rank_0" / "buffer.safetensors")
    assert "old_values" not in buffer and "returns" not in buffer and "ref_logprobs" not in buffer
    assert buffer["group_ids"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    rows = read_metrics(out / "metrics.jsonl")
    expected = (GAE_KEYS - VALUE_KEYS) | {"reward/score_group_std", "reward/frac_zero_std"}
    assert all(set(row) == expected for row in rows), set(rows[0]) ^ expected


def test_resume_is_bit_identical_with_groups_and_the_kl_in_the_loss(tiny_llama, length_reward, tmp_path):
    """rloo, K = 2, --use_kl_loss: the checkpoint at step 2 falls inside a rollout whose buffer holds the
    group ids and reference log-probs; the resumed run ends with the same weights and rows."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def argv(out: Path) -> list[str]:
        args = peft_argv(tiny_llama, length_reward, out, "--advantage_estimator", "rloo", "--num_samples_per_prompt",
                         "2", "--use_kl_loss", "--actor_lora_dropout", "0.1", "--kl_penalty_beta", "0.5")  # fmt: skip
        for flag, value in (("--max_steps", "4"), ("--save_steps", "2"), ("--logging_steps", "3")):
            args[args.index(flag) + 1] = value
        return args

    run_ppo_with_peft.main(argv(full))
    buffer = load_file(full / "checkpoint-2" / "rank_0" / "buffer.safetensors")  # mid-rollout
    assert {"group_ids", "ref_logprobs"} <= buffer.keys() and int(buffer["cursor"]) == 4
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    run_ppo_with_peft.main(argv(resumed))  # resumes from the checkpoint in its --output_dir
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [3, 4]  # every 3 steps, and the last
    for row_a, row_b in zip(rows_a, rows_b):
        for key in row_a:
            if not key.startswith(("time/", "samples_per_s")):
                assert row_a[key] == row_b[key], key
    assert rows_a[0]["loss/kl"] > 0 and "loss/value" not in rows_a[0]


def test_tp_critic_free_rerun_resumes_bit_exact(
    tiny_llama, length_reward, gsm8k_file, tmp_path, world_of_one, capsys
):
    """rlhf.tp.ppo_train with reinforce_pp_baseline, K = 2 and no critic flags: no critic is loaded or
    saved; re-running the command with a larger --max_steps resumes from the newest checkpoint in its
    --output_dir (inside a rollout) and ends bit-identical to an uninterrupted run."""
    from rlhf.tp import ppo_train

    def argv(out: Path, steps: int) -> list[str]:
        args = tp_argv(tiny_llama, length_reward, gsm8k_file, out, "--advantage_estimator", "reinforce_pp_baseline",
                       "--num_samples_per_prompt", "2", "--max_buffer_size", "8", "--lora_dropout", "0.1")  # fmt: skip
        for flag, value in (("--max_steps", str(steps)), ("--save_steps", "3"), ("--ppo_epochs", "1")):
            args[args.index(flag) + 1] = value
        return args + ["--lr_scheduler_type", "constant"]  # the same schedule whatever --max_steps

    full = ppo_train.main(argv(tmp_path / "full", 6))
    assert full.models.critic is None and set(full.optimizers) == {"actor"}
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["a", "a_run"]  # no critic dir
    ppo_train.main(argv(tmp_path / "parts", 3))
    assert (tmp_path / "parts" / "a_run" / "checkpoint-3" / "rank_0" / "buffer.safetensors").is_file()
    capsys.readouterr()
    again = ppo_train.main(argv(tmp_path / "parts", 6))
    assert f"resuming from {tmp_path / 'parts' / 'a_run' / 'checkpoint-3'}" in capsys.readouterr().err
    before, after = full.models.trainable_state(), again.models.trainable_state()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def untimed(path: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if not k.startswith(("time/", "samples_per_s"))}
            for r in read_metrics(path)
        ]

    rows = untimed(tmp_path / "parts" / "a_run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows == untimed(tmp_path / "full" / "a_run" / "metrics.jsonl")
    assert "reward/score_group_std" in rows[0] and not VALUE_KEYS & rows[0].keys()


@pytest.mark.slow
def test_groups_stay_on_one_process_and_whitening_is_global(tiny_llama, length_reward, tmp_path):
    """Two processes (torchrun, gloo), reinforce_pp_baseline with K = 2: in each rank's rollout buffer the
    responses of a group share one prompt and the groups of the two ranks are disjoint; the advantages are
    whitened over the response tokens of both processes (mean 0, variance 1 together, not each alone)."""
    out = tmp_path / "ddp"
    argv = peft_argv(tiny_llama, length_reward, out, "--advantage_estimator", "reinforce_pp_baseline",
                     "--num_samples_per_prompt", "2", "--max_response_length", "12")  # fmt: skip
    for flag, value in (("--per_device_train_batch_size", "2"), ("--max_steps", "1"), ("--save_steps", "1")):
        argv[argv.index(flag) + 1] = value
    proc = subprocess.run(
        [*torchrun(2), "run_ppo_with_peft.py", *argv], cwd=REPO, env=script_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    buffers = [load_file(out / "checkpoint-1" / f"rank_{r}" / "buffer.safetensors") for r in (0, 1)]
    groups = []
    for buffer in buffers:
        prompt_len = int(buffer["prompt_len"])
        ids, mask = buffer["input_ids"][:, :prompt_len], buffer["attention_mask"][:, :prompt_len]
        labels = buffer["group_ids"].tolist()
        assert len(labels) == 4 and all(labels.count(g) == 2 for g in labels)
        for g in set(labels):
            rows = [i for i, x in enumerate(labels) if x == g]
            assert all(torch.equal(ids[rows[0]][mask[rows[0]] > 0], ids[i][mask[i] > 0]) for i in rows)
        groups.append(set(labels))
    assert not groups[0] & groups[1]
    tokens = [b["advantages"][b["attention_mask"][:, int(b["prompt_len"]) :] > 0].double() for b in buffers]
    together = torch.cat(tokens)
    assert abs(float(together.mean())) < 1e-5 and abs(float(together.var()) - 1.0) < 1e-4
    assert any(abs(float(t.mean())) > 1e-3 or abs(float(t.var()) - 1.0) > 1e-3 for t in tokens)


@pytest.fixture(scope="module")
def sft_model(tiny_llama, tmp_path_factory) -> Path:
    return sft_tiny_model(tiny_llama, tmp_path_factory.mktemp("sft") / "sft")


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator",
    ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline",
     "dr_grpo:seq-mean-token-sum-norm", "grpo:seq-mean-token-mean"],
)  # fmt: skip
def test_critic_free_estimator_learns_a_rule_reward(sft_model, estimator, tmp_path):
    """12 rollouts of 8 prompts x 4 samples, a fully trained actor: the positivity score rises clearly
    (``name:mode`` also sets ``--loss_agg_mode``: Dr. GRPO's and the GRPO paper's loss aggregations)."""
    estimator, _, agg_mode = estimator.partition(":")
    out = tmp_path / estimator
    run_ppo_with_peft.main([
        "--sft_model_path", str(sft_model), "--reward_fn", "rlhf.toy_task:positivity_reward",
        "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(out), "--advantage_estimator", estimator,
        "--num_samples_per_prompt", "4", "--per_device_train_batch_size", "8",
        "--per_device_mini_train_batch_size", "16", "--ppo_epochs", "2", "--max_response_length", "16",
        "--max_steps", "48", "--logging_steps", "4", "--save_steps", "1000", "--actor_lr", "5e-4",
        "--actor_lora_rank", "-1", "--kl_penalty_beta", "0.02", "--seed", "1", "--disable_tqdm", "true",
        "--loss_agg_mode", agg_mode or "token-mean",
    ])  # fmt: skip
    scores = [m["reward/score"] for m in read_metrics(out / "metrics.jsonl")]  # one row per rollout
    first, last = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
    # positivity_reward is in [-2, 2]; the SFT model answers about half positively, half negatively
    assert last > first + 0.6 and last > 1.2, scores


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--advantage_estimator", "grpo"],
      "--advantage_estimator grpo compares the responses to one prompt: pass --num_samples_per_prompt 2 or more (got 1)"),
     (["--advantage_estimator", "rloo", "--num_samples_per_prompt", "1"],
      "--advantage_estimator rloo compares the responses to one prompt: pass --num_samples_per_prompt 2 or more"),
     (["--num_samples_per_prompt", "0"], "--num_samples_per_prompt must be a positive number, got 0"),
     (["--advantage_estimator", "reinforce_pp", "--whiten_rewards"],
      "--whiten_rewards applies to --advantage_estimator gae only (got reinforce_pp)"),
     (["--num_samples_per_prompt", "3", "--per_device_mini_train_batch_size", "4"],
      "--per_device_mini_train_batch_size 4 must divide the rollout size --per_device_train_batch_size x "
      "--rollout_batches x --num_samples_per_prompt = 6")],
)  # fmt: skip
def test_estimator_flags_fail_up_front(flags, message, tmp_path, capsys):
    assert_fails_up_front(flags, message, tmp_path, capsys)


def assert_fails_up_front(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    """One line, exit code 2, before any model loads (the --sft_model_path does not even exist)."""
    argv = ["--sft_model_path", str(tmp_path / "missing"), "--reward_fn", "rlhf.toy_task:positivity_reward",
            "--dataset_dir", str(REPO / "sft_data"), "--output_dir", str(tmp_path / "out"), *flags]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_ppo_with_peft.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: " + message in err, err
    assert err.count("error: ") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [([], "--advantage_estimator gae trains a critic: pass --critic_ckpt_dir and --critic_save_dir"),
     (["--advantage_estimator", "dr_grpo"], "--advantage_estimator dr_grpo compares the responses to one prompt"),
     (["--advantage_estimator", "grpo", "--num_samples_per_prompt", "4", "--max_batch_size", "2",
       "--max_buffer_size", "12"], "--max_buffer_size 12 must be a multiple of --max_batch_size 2 x "
      "--num_samples_per_prompt 4")],
)  # fmt: skip
def test_tp_estimator_flags_fail_up_front(flags, message, tmp_path, capsys):
    from rlhf.tp import ppo_train

    argv = ["--actor_ckpt_dir", str(tmp_path / "missing"), "--actor_save_dir", str(tmp_path / "a"),
            "--train_file", str(tmp_path / "missing.jsonl"), "--reward_fn", "gsm8k", *flags]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        ppo_train.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: " + message in err, err
