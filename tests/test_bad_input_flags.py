"""Bad flags found by review: each is one ConfigError line naming the flag (or the config file's key),
raised by ``parse_args`` before any model or data is loaded, never a traceback or a run that does nothing."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from rlhf.args import DataArguments, LoraArguments, ModelArguments, parse_args
from rlhf.errors import ConfigError

SFT_GROUPS = (ModelArguments, DataArguments, LoraArguments, TrainingArguments)


def sft_flags(tmp_path, *extra: str) -> list[str]:
    return ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "nothing to do: pass --do_train to train"),
        (["--do_predict"], "nothing to do: pass --do_train to train"),
        (
            ["--do_train", "--num_train_epochs", "0"],
            "nothing to train: --max_steps -1, --num_train_epochs 0 ",
        ),
        (
            ["--do_train", "--num_train_epochs", "-2"],
            "nothing to train: --max_steps -1, --num_train_epochs -2 ",
        ),
        (["--do_train", "--max_steps", "0", "--num_train_epochs", "0"], "nothing to train: --max_steps 0, "),
        (["--do_eval", "--split_ratio", "0"], "nothing to do: --do_eval without --do_train evaluates the"),
    ],
)
def test_a_run_that_would_do_nothing_is_a_config_error(tmp_path, flags, message):
    """Without --do_train and --do_eval the stage loaded everything and exited 0; with zero epochs it
    trained 0 steps and logged "saved the final model"."""
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message)):
        parse_args(SFT_GROUPS, sft_flags(tmp_path, *flags))


@pytest.mark.parametrize(
    "flags",
    [
        ["--do_train"],
        ["--do_eval"],
        ["--eval_strategy", "steps"],  # sets --do_eval
        ["--do_train", "--num_train_epochs", "0", "--max_steps", "3"],  # --max_steps wins over epochs
        ["--do_train", "--max_steps", "-1", "--num_train_epochs", "0.5"],
        ["--do_train", "--max_steps", "0"],  # by epochs, as Trainer (and the PPO stages)
        ["--do_train", "--learning_rate", "0"],
    ],
)
def test_runs_that_do_something_are_accepted(tmp_path, flags):
    parse_args(SFT_GROUPS, sft_flags(tmp_path, *flags))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--learning_rate", "-1", "--learning_rate must be a finite number >= 0, got -1.0"),
        ("--learning_rate", "nan", "--learning_rate must be a finite number >= 0, got nan"),
        ("--weight_decay", "-0.1", "--weight_decay must be a finite number >= 0, got -0.1"),
        ("--max_grad_norm", "-1", "--max_grad_norm must be a finite number >= 0, got -1.0"),
        ("--adam_beta1", "1", "--adam_beta1 must be in [0, 1), got 1.0"),
        ("--adam_beta2", "-0.5", "--adam_beta2 must be in [0, 1), got -0.5"),
        ("--adam_epsilon", "-1e-8", "--adam_epsilon must be a finite number >= 0, got -1e-08"),
    ],
)
def test_optimizer_values_torch_refuses_are_config_errors(tmp_path, flag, value, message):
    """torch's ``ValueError: Invalid learning rate`` came as a traceback after the model and data loaded."""
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message) + "$"):
        parse_args(SFT_GROUPS, sft_flags(tmp_path, "--do_train", f"{flag}={value}"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--block_size", "0"], "--block_size must be a positive number, got 0"),
        (["--preprocessing_num_workers", "-1"], "--preprocessing_num_workers must be 0 or more"),
    ],
)
def test_data_flags_datasets_would_refuse_late_are_config_errors(tmp_path, flags, message):
    """``datasets.map(num_proc=-1)`` raised its ValueError after the model loaded; a PPO ``--block_size 0``
    divided by zero when the pretraining text was cut into blocks."""
    from rlhf.ppo.config import PPODataArguments

    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message)):
        parse_args(SFT_GROUPS, sft_flags(tmp_path, "--do_train", *flags))
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message)):
        parse_args((PPODataArguments,), ["--dataset_dir", "d", *flags])


def test_data_cache_dir_that_is_a_file_is_a_config_error(tmp_path):
    from rlhf.data import load_dataset_dir

    file = tmp_path / "cache.txt"
    file.write_text("not a dir")
    with pytest.raises(ConfigError, match=f"^--data_cache_dir {file} is a file, not a directory$"):
        parse_args(SFT_GROUPS, sft_flags(tmp_path, "--do_train", "--data_cache_dir", str(file)))
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(ConfigError, match=f"^--data_cache_dir {file / 'sub'}: {file} is a file"):
        load_dataset_dir(data, "sft", str(file / "sub"))  # was FileExistsError


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_may_give_a_comma_list_flag_as_a_list(tmp_path, suffix):
    """``lora_target: [q_proj, v_proj]`` failed with ``error: unknown flags: v_proj``."""
    import json

    import yaml

    config = {"model_name_or_path": "m", "dataset_dir": "d", "output_dir": str(tmp_path / "out"),
              "do_train": True, "lora_target": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens"],
              "report_to": ["none"], "label_names": ["labels", "margin"]}  # fmt: skip
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(config) if suffix == ".json" else yaml.safe_dump(config))
    _, _, lora, training = parse_args(SFT_GROUPS, [str(path)])
    assert lora.lora_spec().targets == ["q_proj", "v_proj"] and lora.extra_modules == ["embed_tokens"]
    assert training.report_to == [] and training.label_names == ["labels", "margin"]  # list flags: unchanged


def test_a_config_file_list_for_a_one_value_flag_is_a_config_error_naming_the_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "model_name_or_path: m\ndataset_dir: d\noutput_dir: o\ndo_train: true\nreport_to: [wandb, tensorboard]\n"
    )
    with pytest.raises(
        ConfigError, match=f"^{path}: report_to is a list of 2 values, but --report_to takes one value$"
    ):
        parse_args(SFT_GROUPS, [str(path)])


def test_a_ppo_config_file_may_give_its_comma_lists_as_lists(tmp_path):
    import yaml

    from rlhf.ppo.config import PPOArguments, PPODataArguments, PPOModelArguments, PPOTrainingArguments

    config = {"sft_model_path": "m", "dataset_dir": "d", "output_dir": str(tmp_path / "out"),
              "actor_lora_target": ["q_proj", "v_proj"], "critic_lora_target": ["k_proj"],
              "report_to": ["tensorboard", "wandb"]}  # fmt: skip
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(config))
    models, _, _, train = parse_args((PPOModelArguments, PPODataArguments, PPOArguments, PPOTrainingArguments),
                                     [str(path)])  # fmt: skip
    assert models.actor_lora_target == "q_proj,v_proj" and models.critic_lora_target == "k_proj"
    assert train.report_to == "tensorboard,wandb"


def test_logging_defaults_to_10_and_evaluation_keeps_its_cadence(tmp_path):
    """--logging_steps 10 (TRL's default, not Trainer's 500); Trainer evaluates every --logging_steps when
    --eval_steps is not given, so without either flag --eval_steps stays at the old 500."""

    def steps(*flags: str) -> tuple[int, float | None]:
        *_, args = parse_args(
            SFT_GROUPS, sft_flags(tmp_path, "--do_train", "--eval_strategy", "steps", *flags)
        )
        return args.logging_steps, args.eval_steps

    assert steps() == (10, 500)
    assert steps("--logging_steps", "50") == (50, 50)  # Trainer's rule: evaluation follows the logging
    assert steps("--eval_steps=20") == (10, 20)
    assert steps("--logging_steps", "5", "--eval_steps", "7") == (5, 7)


def test_batch_eval_metrics_and_bad_lora_flags_fail_at_parse_time(tmp_path):
    """Both came after the data was tokenized (and a bad LoRA flag after --overwrite_output_dir had
    removed the old checkpoints); --batch_eval_metrics as a traceback from Trainer."""
    with pytest.raises(ConfigError, match="^--batch_eval_metrics is not supported"):
        parse_args(SFT_GROUPS, sft_flags(tmp_path, "--do_train", "--batch_eval_metrics"))
    with pytest.raises(ConfigError, match="^--lora_alpha must be > 0"):
        parse_args(SFT_GROUPS, sft_flags(tmp_path, "--do_train", "--lora_rank", "4", "--lora_alpha", "0"))


def test_reward_metrics_read_per_batch_predictions():
    """--eval_do_concat_batches False hands the metrics a list of per-batch arrays."""
    import numpy as np
    from transformers import EvalPrediction

    from rlhf.reward.trainer import reward_metrics

    rows = np.array([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    whole = reward_metrics(EvalPrediction(predictions=rows, label_ids=None))
    split = reward_metrics(EvalPrediction(predictions=[rows[:2], rows[2:]], label_ids=None))
    assert whole == split and whole["accuracy"] == 0.75
