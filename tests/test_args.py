"""Shared flags: legacy names, GPU-only precision flags on CPU, comma lists, wandb offline."""

from __future__ import annotations

import os

import pytest
from transformers import TrainingArguments

from rlhf.args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    check_output_dir,
    check_positive_flags,
    configure_reporting,
    cpu_processes_flag,
    normalize_argv,
    parse_args,
    split_comma_list,
    stage_defaults,
)
from rlhf.errors import ConfigError
from rlhf.models.lora import LoraSpec


def test_legacy_flags_are_renamed():
    argv = normalize_argv(["--evaluation_strategy", "steps", "--warmup_ratio=0.03"], has_gpu=True)
    assert argv == ["--eval_strategy", "steps", "--warmup_steps=0.03"]


def test_fp16_dropped_without_gpu_and_kept_with_one():
    assert normalize_argv(["--fp16", "--seed", "1"], has_gpu=False) == ["--seed", "1"]
    assert normalize_argv(["--bf16", "True", "--x"], has_gpu=False) == ["--x"]
    assert normalize_argv(["--fp16"], has_gpu=True) == ["--fp16"]


def test_comma_lists_and_none():
    assert split_comma_list("q_proj, v_proj,") == ["q_proj", "v_proj"]
    assert split_comma_list("None") == [] and split_comma_list(None) == []
    lora = LoraArguments(lora_rank=-1, modules_to_save="None")
    assert not lora.lora_spec().use_lora and lora.extra_modules == []


def test_lora_flags_make_one_lora_spec():
    spec = LoraArguments(
        lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_target="q_proj, v_proj"
    ).lora_spec()
    assert spec == LoraSpec(rank=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj"])
    assert spec.use_lora and not LoraArguments(lora_rank=0).lora_spec().use_lora
    assert LoraArguments().lora_spec() == LoraSpec()  # flag defaults are the spec's defaults


def test_parse_reference_style_flags(tmp_path):
    argv = ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", str(tmp_path),
            "--evaluation_strategy", "steps", "--eval_steps", "5", "--warmup_ratio", "0.03", "--fp16",
            "--lora_target", "q_proj,v_proj", "--modules_to_save", "None", "--torch_dtype", "float16",
            "--report_to", "none", "--logging_first_step", "True", "--ddp_timeout", "30000"]  # fmt: skip
    model, data, lora, training = parse_args(
        (ModelArguments, DataArguments, LoraArguments, TrainingArguments), argv
    )
    assert training.eval_strategy == "steps" and training.warmup_steps == pytest.approx(0.03)
    assert lora.lora_spec().targets == ["q_proj", "v_proj"] and lora.extra_modules == []
    assert model.torch_dtype == "float16" and data.dataset_dir == "d"


SFT_GROUPS = (ModelArguments, DataArguments, LoraArguments, TrainingArguments)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_means_what_its_flags_mean(tmp_path, monkeypatch, suffix):
    """Legacy names renamed, --fp16 dropped without a GPU, YAML's ``1e-5`` (a string to YAML 1.1) read as
    a number, a list as several values, null as the default; wandb goes offline as with the flags."""
    import json

    import yaml

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", "")  # unset to the code; restored (absent) after the test
    config = {"model_name_or_path": "m", "dataset_dir": "d", "output_dir": str(tmp_path / "out"),
              "evaluation_strategy": "steps", "eval_steps": 5, "warmup_ratio": 0.03, "learning_rate": "1e-5",
              "fp16": not __import__("torch").cuda.is_available(), "report_to": ["wandb"],
              "lora_target": "q_proj,v_proj", "peft_path": None, "logging_first_step": True}  # fmt: skip
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(config) if suffix == ".json" else yaml.safe_dump(config))
    model, data, lora, training = parse_args(SFT_GROUPS, [str(path)])
    assert training.eval_strategy == "steps" and training.warmup_steps == pytest.approx(0.03)
    assert training.learning_rate == pytest.approx(1e-5) and training.logging_first_step is True
    assert not training.fp16 or __import__("torch").cuda.is_available()
    assert training.report_to == ["wandb"] and os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_DIR"] == str(tmp_path / "out")  # <output_dir>/wandb, as PPO's
    assert lora.lora_spec().targets == ["q_proj", "v_proj"] and model.peft_path is None


@pytest.mark.parametrize(
    ("text", "message"),
    [("model_name_or_path: m\ndataset_dir: d\nmax_stepz: 3\n", "unknown flags: --max_stepz 3"),
     ("model_name_or_path: m\ndataset_dir: d\ndeepspeed: {stage: 2}\n", "deepspeed is a nested mapping"),
     ("- model_name_or_path\n", "expected a mapping of flag names to values, found list"),
     ("a: [1\n", "not valid YAML")],
)  # fmt: skip
def test_a_bad_config_file_is_one_config_error(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        parse_args(SFT_GROUPS, [str(path)])


def test_unknown_flag_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown flags: --bogus"):
        parse_args((DataArguments,), ["--dataset_dir", "d", "--bogus", "1"])
    from rlhf.ppo.config import PPOArguments, PPOModelArguments, PPOTrainingArguments

    groups = (PPOModelArguments, DataArguments, PPOArguments, PPOTrainingArguments)
    argv = [
        "--sft_model_path",
        "m",
        "--dataset_dir",
        "d",
        "--output_dir",
        str(tmp_path),
        "--deepspeed",
        "z.json",
    ]
    with pytest.raises(
        ConfigError, match=r"unknown flags: --deepspeed z.json \(this stage does not run under DeepSpeed"
    ):
        parse_args(groups, argv)


def test_wandb_goes_offline_without_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    configure_reporting(["--report_to", "wandb"])
    assert os.environ["WANDB_MODE"] == "offline"


def test_cpu_precision_fallback_is_one_warning_line(monkeypatch, caplog):
    import logging

    import rlhf.models.loading as loading

    monkeypatch.setattr(loading, "_precision_fallback_warned", False)
    with caplog.at_level(logging.WARNING):
        normalize_argv(["--fp16", "--torch_dtype", "float16"], has_gpu=False)
        if not __import__("torch").cuda.is_available():
            loading.resolve_dtype("float16")
    lines = [r.getMessage() for r in caplog.records if "GPU" in r.getMessage()]
    assert lines == ["--fp16 and --torch_dtype float16 need a GPU; none found, so float32 is used"]


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--per_device_train_batch_size", "0"),
        ("--per_device_train_batch_size", "-2"),
        ("--per_device_eval_batch_size", "0"),
        ("--gradient_accumulation_steps", "0"),
    ],
)
def test_non_positive_batch_flags_are_config_errors(tmp_path, flag, value):
    argv = ["--output_dir", str(tmp_path), flag, value]
    with pytest.raises(ConfigError, match=f"^{flag} must be a positive number, got {value}$"):
        parse_args((TrainingArguments,), argv)


def test_check_positive_flags_names_the_first_bad_flag():
    check_positive_flags({"--a": 1, "--b": 0.5})
    with pytest.raises(ConfigError, match="--b must be a positive number, got 0"):
        check_positive_flags({"--a": 1, "--b": 0, "--c": -1})


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    file = tmp_path / "out.txt"
    file.write_text("not a dir")
    with pytest.raises(ConfigError, match=f"^--output_dir {file} is a file, not a directory$"):
        parse_args((TrainingArguments,), ["--output_dir", str(file)])
    with pytest.raises(ConfigError, match=f"--save_path {file / 'sub'}: {file} is a file"):
        check_output_dir(file / "sub", "--save_path")
    check_output_dir(tmp_path / "new" / "dir", "--log_dir")  # missing dirs are created later: fine
    check_output_dir(None)


def test_several_cpu_processes_get_use_cpu_for_trainer_stages(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    stage = (DataArguments, TrainingArguments)
    assert cpu_processes_flag([], stage, has_gpu=False) == ["--use_cpu", "True"]
    assert cpu_processes_flag([], stage, has_gpu=True) == []
    assert cpu_processes_flag(["--use_cpu=False"], stage, has_gpu=False) == []
    assert cpu_processes_flag([], (DataArguments,), has_gpu=False) == []  # not a Trainer stage
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cpu_processes_flag([], stage, has_gpu=False) == []


def test_stage_defaults_know_both_spellings_of_a_flag():
    """HfArgumentParser takes --logging-steps and --eval-steps too: given either way, --eval_steps is not
    pinned to 500 (Trainer then evaluates every --logging_steps)."""
    assert stage_defaults([]) == ["--logging_steps", "10", "--eval_steps", "500"]
    for argv in (
        ["--logging_steps", "5"],
        ["--logging-steps", "5"],
        ["--eval-steps=7"],
        ["--eval_steps", "7"],
    ):
        assert stage_defaults(argv) == ["--logging_steps", "10"], argv


def test_hyphen_spelled_logging_steps_parse_as_the_underscore_ones(tmp_path):
    def steps(*flags: str) -> tuple[float, float | None]:
        argv = ["--model_name_or_path", "m", "--dataset_dir", "d", "--output_dir", str(tmp_path / "out"),
                "--do_train", "--eval_strategy", "steps", *flags]  # fmt: skip
        *_, training = parse_args(SFT_GROUPS, argv)
        return training.logging_steps, training.eval_steps

    assert steps() == (10, 500)
    assert steps("--logging-steps", "50") == steps("--logging_steps", "50") == (50, 50)
    assert steps("--eval-steps", "20") == steps("--eval_steps", "20") == (10, 20)


def test_help_shows_the_stage_default_of_logging_steps(capsys, monkeypatch):
    """--help of the SFT and reward-model stages shows the --logging_steps they run with (10), not Trainer's
    500."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        parse_args(SFT_GROUPS, ["--help"])
    text = capsys.readouterr().out
    # the entry goes on " LOGGING_STEPS, --logging-steps ..." or, on Python 3.13, ", --logging-steps ..."
    entry = text[text.index("\n  --logging_steps") :]
    entry = entry[: entry.index("\n  --", 1)]
    assert "(default: 10)" in entry and "500" not in entry


def test_a_tracker_that_is_not_installed_is_dropped_with_one_warning(tmp_path, caplog):
    """--report_to tensorboard without tensorboard was a traceback from the Trainer, after the stage had
    cleared --output_dir under --overwrite_output_dir."""
    import logging
    from unittest import mock

    with (
        mock.patch("transformers.integrations.get_available_reporting_integrations", return_value=["wandb"]),
        caplog.at_level(logging.WARNING),
    ):
        (training,) = parse_args((TrainingArguments,), ["--output_dir", str(tmp_path), "--do_train",
                                                        "--report_to", "tensorboard,wandb"])  # fmt: skip
    assert training.report_to == ["wandb"]  # the comma list split (transformers kept it as one name)
    assert "--report_to tensorboard: not an installed tracker" in caplog.text
